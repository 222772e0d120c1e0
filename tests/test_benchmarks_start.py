"""Every benchmark script starts: its imports (the benchmarks import each other's helpers) resolve and its
command line parses. The benchmarks themselves are not tests; a renamed helper must not wait for the next
person who runs one to be found."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))
SCRIPTS = [p for p in BENCHMARKS if "def main(" in p.read_text()]  # the others are their shared helpers


def test_the_benchmarks_are_found():
    assert {"speed.py", "strip_speed.py", "real_dev.py", "federation.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_a_benchmark_starts_and_prints_its_usage(script):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("usage:"), run.stdout[:500]
