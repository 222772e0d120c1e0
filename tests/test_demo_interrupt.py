"""Ctrl-C during the demo stops Ray and every process it started, and exits with status 130."""

from __future__ import annotations

import os
import queue
import signal
import subprocess

import pytest
import sys
import threading
from pathlib import Path

from waiting import poll, wait_until

pytestmark = pytest.mark.integration  # runs Ray in a child process

BAYPRANO = str(Path(sys.executable).with_name("bayprano"))


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _as_from_a_terminal() -> None:
    """The demo starts as a terminal starts it: SIGINT neither blocked nor ignored, whatever the state of
    the test process (it runs Ray and Serve for other tests) that forks it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(check, seconds: float, what: str, output: list[str]) -> None:
    wait_until(check, what, timeout=seconds, every=0.25, detail=lambda: f"the demo printed:\n{''.join(output)}")


def test_ctrl_c_during_federated_training_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [BAYPRANO, "demo", "--fast", "--sites", "2", "--shots", "3", "--out", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )
    lines: list[str] = []
    pending: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [pending.put(line) for line in proc.stdout], daemon=True)
    reader.start()

    def printed(text: str) -> bool:
        while not pending.empty():
            lines.append(pending.get())
        return any(text in line for line in lines)

    def training_processes() -> list[int]:
        return [
            p
            for p in _descendants(proc.pid)
            if "ray::FactorySite" in _cmdline(p) or "ray::CoordinatorActor" in _cmdline(p)
        ]

    try:
        _wait_for(lambda: printed("federated meta-training"), 300, "the demo reached federated training", lines)
        # the Coordinator and both Factories are up (each Ray worker names itself after its actor)
        _wait_for(lambda: len(training_processes()) >= 3, 120, "the Coordinator and 2 Factory actors started", lines)
        started = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    printed("")
    assert proc.returncode == 130, "".join(lines)
    assert any("interrupted" in line for line in lines), "".join(lines)
    poll(lambda: not any(_alive(p) for p in started), 30, every=0.5)
    left = {p: _cmdline(p)[:120] for p in started if _alive(p)}
    assert not left, f"processes left behind: {left}"
