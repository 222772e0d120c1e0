"""The model registry and the `bayprano registry` commands (no Ray)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bayprano.cli import main
from bayprano.platform.errors import BaypranoError
from bayprano.platform.model.site import SiteModel
from bayprano.serve.registry import Registry, hash_token, parse_model_id


@pytest.fixture
def registry(tmp_path, checkpoint) -> Registry:
    reg, _ = Registry.init(tmp_path / "reg", checkpoint=checkpoint)
    return reg


_FILE_ACCESS: list[list[str]] = []  # the lists that the audit hook fills while files_touched() is active
_FILE_EVENTS = ("open", "os.listdir", "os.scandir")
_AUDIT_HOOK: list = []  # the hook, once installed


def _note_file_access(event: str, args: tuple) -> None:
    if _FILE_ACCESS and event in _FILE_EVENTS and isinstance(args[0], (str, bytes, os.PathLike)):
        _FILE_ACCESS[-1].append(os.fsdecode(args[0]))


@contextlib.contextmanager
def files_touched(root: Path) -> Iterator[list[str]]:
    """The files opened and folders listed under ``root`` while the block runs, as the interpreter's audit
    events report them (a hook cannot be removed, so one is installed once and idles outside the block)."""
    if not _AUDIT_HOOK:
        sys.addaudithook(_note_file_access)
        _AUDIT_HOOK.append(_note_file_access)
    seen: list[str] = []
    _FILE_ACCESS.append(seen)
    try:
        yield seen
    finally:
        _FILE_ACCESS.pop()
    seen[:] = [f for f in seen if Path(f).is_relative_to(root)]


def all_text(root: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def test_tokens_are_stored_hashed_and_checked_per_site(tmp_path, checkpoint):
    reg, admin = Registry.init(tmp_path / "reg", checkpoint=checkpoint)
    a, b = reg.add_site("plant-a"), reg.add_site("plant-b")
    assert len({a, b, admin}) == 3 and all(len(t) > 40 for t in (a, b, admin))
    text = all_text(reg.root)
    assert a not in text and b not in text and admin not in text
    assert hash_token(a) in text
    assert reg.check_token("plant-a", a) and reg.check_token("plant-b", b)
    assert not reg.check_token("plant-b", a) and not reg.check_token("plant-a", None)
    assert not reg.check_token("nowhere", a)
    assert reg.check_admin_token(admin) and not reg.check_admin_token(a)
    new = reg.rotate_token("plant-a")
    assert reg.check_token("plant-a", new) and not reg.check_token("plant-a", a)
    with pytest.raises(BaypranoError, match="already exists"):
        reg.add_site("plant-a")
    for bad in ("", "../etc", "a@b", "a" * 65, ".hidden"):
        with pytest.raises(BaypranoError, match="not valid"):
            reg.add_site(bad)


def test_publish_versions_current_pointer_and_rollback(registry, make_site_model, tmp_path):
    registry.add_site("plant-a")
    assert registry.current("plant-a") is None
    first = registry.publish("plant-a", make_site_model("wood", 1, 0.05), metrics={"fpr_measured": 0.04})
    folder = make_site_model("wood", 2, 0.1).save(tmp_path / "model")
    second = registry.publish("plant-a", folder, source="cli")
    assert (first.version, second.version) == ("v0001", "v0002")
    assert registry.current("plant-a") == "v0002" and registry.current_model_id("plant-a") == "plant-a@v0002"
    rec = first.record
    for key in ("created", "published", "support_size", "checkpoint_sha256", "threshold", "target_fpr", "metrics"):
        assert rec[key] is not None, key
    assert rec["support_size"] == 3 and rec["target_fpr"] == 0.05 and rec["metrics"]["fpr_measured"] == 0.04
    assert second.record["target_fpr"] == 0.1
    loaded = SiteModel.load(registry.model_path("plant-a", "v0002"))
    assert loaded.threshold == pytest.approx(second.record["threshold"])
    assert registry.rollback("plant-a") == "v0001" and registry.current("plant-a") == "v0001"
    with pytest.raises(BaypranoError, match="no version older"):
        registry.rollback("plant-a")
    assert registry.rollback("plant-a", "v0002") == "v0002"
    with pytest.raises(BaypranoError, match="no version v0009"):
        registry.rollback("plant-a", "v0009")
    detail = registry.describe("plant-a")
    assert [v["version"] for v in detail["versions"]] == ["v0001", "v0002"]
    assert [v["current"] for v in detail["versions"]] == [False, True]
    assert parse_model_id("plant-a@v0002") == ("plant-a", "v0002")


def test_a_corrupt_model_folder_is_refused_and_leaves_nothing(registry, make_site_model, tmp_path):
    registry.add_site("plant-a")
    folder = make_site_model().save(tmp_path / "model")
    data = bytearray((folder / "model.pt").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.pt").write_bytes(bytes(data))
    with pytest.raises(BaypranoError, match="corrupt"):
        registry.publish("plant-a", folder)
    with pytest.raises(BaypranoError, match="not a site model folder"):
        registry.publish("plant-a", tmp_path)
    versions = registry.root / "sites" / "plant-a" / "versions"
    assert list(versions.iterdir()) == [] and registry.current("plant-a") is None
    with pytest.raises(BaypranoError, match="unknown site"):
        registry.publish("plant-z", folder)


def test_init_refuses_a_non_empty_folder_and_open_refuses_a_non_registry(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(BaypranoError, match="not an empty folder"):
        Registry.init(tmp_path)
    with pytest.raises(BaypranoError, match="not a model registry"):
        Registry(tmp_path)
    reg, _ = Registry.init(tmp_path / "r")
    with pytest.raises(BaypranoError, match="names no meta-checkpoint"):
        reg.checkpoint_path()


def test_registry_commands(tmp_path, checkpoint, make_site_model, capsys):
    root = str(tmp_path / "reg")
    assert main(["registry", "init", "--registry", root, "--checkpoint", str(checkpoint)]) == 0
    admin = capsys.readouterr().out.split("admin token (shown once, stored hashed): ")[1].strip()
    assert Registry(root).check_admin_token(admin)
    assert main(["registry", "add-site", "--registry", root, "plant-a"]) == 0
    token = capsys.readouterr().out.split("token (shown once, stored hashed): ")[1].strip()
    assert Registry(root).check_token("plant-a", token)
    model = make_site_model().save(tmp_path / "model")
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"image_auroc": 0.9}))
    assert main(["registry", "publish", "--registry", root, "plant-a", str(model), "--metrics", str(metrics)]) == 0
    assert "as plant-a v0001 (now current)" in capsys.readouterr().out
    assert main(["registry", "publish", "--registry", root, "plant-a", str(model), "--no-activate"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", "--registry", root]) == 0
    out = capsys.readouterr().out
    assert "plant-a" in out and "v0001 *" in out and "v0002" in out and "v0002 *" not in out
    assert main(["registry", "rollback", "--registry", root, "plant-a", "--to", "v0002"]) == 0
    assert "v0001 -> v0002" in capsys.readouterr().out
    assert main(["registry", "list", "--registry", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["sites"][0]["current"] == "v0002"
    assert listed["sites"][0]["versions"][0]["metrics"]["image_auroc"] == 0.9
    assert main(["registry", "rotate-token", "--registry", root, "plant-a"]) == 0
    assert not Registry(root).check_token("plant-a", token)
    capsys.readouterr()
    assert main(["registry", "add-site", "--registry", root, "bad/name"]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(["registry", "list", "--registry", str(tmp_path / "none")]) == 2
    assert "not a model registry" in capsys.readouterr().err


def test_scopes_default_to_score_and_review_and_are_checked(registry):
    plain = registry.add_site("plant-a")
    adapter = registry.add_site("plant-b", scopes=("score", "review", "adapt"))
    assert registry.token_scopes("plant-a", plain) == ("score", "review")
    assert registry.token_scopes("plant-b", adapter) == ("score", "review", "adapt")
    assert registry.token_scopes("plant-b", plain) is None and registry.token_scopes("nowhere", plain) is None
    assert registry.site_of_token(adapter) == "plant-b" and registry.site_of_token("bp_nothing") is None
    rotated = registry.rotate_token("plant-b")
    assert registry.token_scopes("plant-b", rotated) == ("score", "review", "adapt")
    for bad in (("score", "delete"), ()):
        with pytest.raises(BaypranoError, match="not valid: choose from score, review, adapt"):
            registry.add_site("plant-c", scopes=bad)


def test_candidates_promote_and_the_cap_on_kept_versions(registry, make_site_model):
    registry.add_site("plant-a")
    model = make_site_model()
    registry.publish("plant-a", model)
    candidate = registry.publish("plant-a", model, make_current=False)
    assert candidate.version == "v0002" and registry.current("plant-a") == "v0001"
    assert registry.promote("plant-a") == "v0002" and registry.current("plant-a") == "v0002"
    assert registry.promote("plant-a", "v0001") == "v0001"
    with pytest.raises(BaypranoError, match="no version v0007"):
        registry.promote("plant-a", "v0007")
    for _ in range(3):
        registry.publish("plant-a", model, make_current=False, keep=3)
    # v0001 is current and stays; of the others only the newest ones are kept
    assert [v.version for v in registry.versions("plant-a")] == ["v0001", "v0004", "v0005"]
    registry.publish("plant-a", model, keep=2)
    assert [v.version for v in registry.versions("plant-a")] == ["v0005", "v0006"]
    assert registry.current("plant-a") == "v0006"
    assert not any(p.name.startswith(".") for p in (registry.root / "sites" / "plant-a" / "versions").iterdir())


def test_a_rewritten_model_folder_is_refused_naming_site_and_version(registry, make_site_model, tmp_path):
    registry.add_site("plant-a")
    info = registry.publish("plant-a", make_site_model("wood", 1))
    assert registry.check_version("plant-a", "v0001") == info.path
    other = make_site_model("fabric", 2).save(tmp_path / "other")
    for name in ("model.pt", "meta.json"):  # consistent with each other: SiteModel.load alone accepts them
        (info.path / name).write_bytes((other / name).read_bytes())
    assert SiteModel.load(info.path).info["model_sha256"] != info.record["model_sha256"]
    with pytest.raises(BaypranoError, match=r"site 'plant-a' version v0001: model.pt does not match the sha256") as e:
        registry.check_version("plant-a", "v0001")
    assert str(registry.root) not in str(e.value)


def test_publish_refuses_a_model_of_another_backbone(registry, make_site_model, tmp_path):
    registry.add_site("plant-a")
    folder = make_site_model().save(tmp_path / "model")
    meta = json.loads((folder / "meta.json").read_text())
    serving = meta["backbone_fingerprint"]
    assert registry.meta["checkpoint"]["backbone_fingerprint"] == serving
    meta["backbone_fingerprint"] = "random:0000000000000000"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        BaypranoError, match=f"adapted on backbone random:0000000000000000, but this registry serves {serving}"
    ):
        registry.publish("plant-a", folder)
    assert registry.versions("plant-a") == [] and registry.current("plant-a") is None


def test_set_checkpoint_rotate_admin_token_add_site_scopes_and_promote_commands(
    tmp_path, checkpoint, make_site_model, capsys
):
    from bayprano.platform.meta.checkpoint import load_checkpoint

    root = str(tmp_path / "reg")
    assert main(["registry", "init", "--registry", root]) == 0
    admin = capsys.readouterr().out.split("admin token (shown once, stored hashed): ")[1].strip()
    second = load_checkpoint(checkpoint)
    second.meta_config = {**second.meta_config, "note": "another run"}
    second.save(tmp_path / "second.pt")
    for path in (checkpoint, tmp_path / "second.pt"):
        assert main(["registry", "set-checkpoint", "--registry", root, str(path)]) == 0
        sha = load_checkpoint(path).sha256
        assert f"sha256 {sha[:12]}" in capsys.readouterr().out
        reg = Registry(root)
        assert reg.meta["checkpoint"]["sha256"] == sha
        assert reg.checkpoint_path().read_bytes() == Path(path).read_bytes()
    assert main(["registry", "set-checkpoint", "--registry", root, str(tmp_path / "none.pt")]) == 2
    assert Registry(root).meta["checkpoint"]["sha256"] == load_checkpoint(tmp_path / "second.pt").sha256
    capsys.readouterr()
    assert main(["registry", "rotate-token", "--registry", root, "--admin"]) == 0
    new_admin = capsys.readouterr().out.split("no longer works): ")[1].strip()
    assert Registry(root).check_admin_token(new_admin) and not Registry(root).check_admin_token(admin)
    assert main(["registry", "add-site", "--registry", root, "plant-a", "--scopes", "score,adapt"]) == 0
    out = capsys.readouterr().out
    token = out.split("token (shown once, stored hashed): ")[1].strip()
    assert "scopes: score, adapt" in out and Registry(root).token_scopes("plant-a", token) == ("score", "adapt")
    assert main(["registry", "add-site", "--registry", root, "plant-b", "--scopes", "score,root"]) == 2
    assert "'root'" in capsys.readouterr().err
    model = make_site_model().save(tmp_path / "model")
    assert main(["registry", "publish", "--registry", root, "plant-a", str(model)]) == 0
    assert main(["registry", "publish", "--registry", root, "plant-a", str(model), "--no-activate"]) == 0
    capsys.readouterr()
    assert main(["registry", "promote", "--registry", root, "plant-a"]) == 0
    assert "v0001 -> v0002" in capsys.readouterr().out and Registry(root).current("plant-a") == "v0002"
    assert main(["registry", "promote", "--registry", root, "plant-a", "v0009"]) == 2
    assert "no version v0009" in capsys.readouterr().err


def test_an_invalid_token_costs_no_file_read_and_changes_in_another_process_are_seen(tmp_path, checkpoint):
    """The server's Registry keeps token hashes in memory: a token that is nobody's reads nothing, however
    many sites there are; a change made through another Registry (the operator's command line) is seen by
    the next check."""
    reg, admin = Registry.init(tmp_path / "reg", checkpoint=checkpoint)
    tokens = {site: reg.add_site(site) for site in ("plant-a", "plant-b", "plant-c")}
    server = Registry(reg.root)
    assert server.site_of_token(tokens["plant-a"]) == "plant-a"  # the first checks build the index
    assert server.check_admin_token(admin)
    with files_touched(reg.root) as touched:
        for bad in ("bp_nothing", "x" * 300, tokens["plant-a"][:-1]):
            assert not server.check_admin_token(bad)
            assert server.token_scopes("plant-b", bad) is None
            assert server.site_of_token(bad) is None
    assert touched == []
    with files_touched(reg.root) as touched:  # another site's token: its own site.json is read, no other
        assert server.token_scopes("plant-b", tokens["plant-a"]) is None
        assert server.site_of_token(tokens["plant-a"]) == "plant-a"
    assert touched == [str(reg.root / "sites" / "plant-a" / "site.json")]

    operator = Registry(reg.root)  # as `bayprano registry ...` would, in its own process
    new_site = operator.add_site("plant-d")
    rotated = operator.rotate_token("plant-a")
    new_admin = operator.rotate_admin_token()
    assert server.token_scopes("plant-d", new_site) == ("score", "review")
    assert server.token_scopes("plant-a", rotated) == ("score", "review")
    assert server.token_scopes("plant-a", tokens["plant-a"]) is None
    assert server.site_of_token(tokens["plant-a"]) is None
    assert server.check_admin_token(new_admin) and not server.check_admin_token(admin)
    with files_touched(reg.root) as touched:
        assert server.site_of_token("bp_nothing") is None and not server.check_admin_token("bp_nothing")
    assert touched == []


def test_a_broken_site_json_fails_its_own_site_as_the_servers_fault_and_no_other(tmp_path, checkpoint):
    reg, _ = Registry.init(tmp_path / "reg", checkpoint=checkpoint)
    broken, fine = reg.add_site("plant-a"), reg.add_site("plant-b")
    server = Registry(reg.root)
    assert server.token_scopes("plant-a", broken) == ("score", "review")
    (reg.root / "sites" / "plant-a" / "site.json").write_text("{ not json")  # rewritten in place, not through reg
    with pytest.raises(BaypranoError, match="not valid JSON"):
        server.token_scopes("plant-a", broken)
    reg.add_site("plant-c")  # a change: the server rebuilds its index, and still refuses to guess
    with pytest.raises(BaypranoError, match="not valid JSON"):
        server.token_scopes("plant-a", broken)
    assert server.token_scopes("plant-b", fine) == ("score", "review") and server.site_of_token(fine) == "plant-b"
    assert server.site_of_token(broken) is None and server.token_scopes("plant-b", broken) is None
