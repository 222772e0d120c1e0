"""Federated meta-training on a real local Ray: three Factory actors (one per category) and the Coordinator.

The Factory actors of the module fixture are shared by the tests that leave them alone; a test that kills a
site has its own. Every reply a Factory sends is kept by the trainer (``received``) and inspected here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from bayprano.actors.coordinator import FederatedTrainer
from bayprano.actors.factory import FactorySite
from bayprano.cli import main
from bayprano.platform.errors import DataError
from bayprano.platform.data.imageio import load_image
from bayprano.platform.evaluation_data import load_category
from bayprano.platform.federated.messages import SiteSettings, UpdateReply, sent_fields
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.federated.secagg import MaskedUpdate
from bayprano.platform.federated.state import encode_update, encoded_num_bytes
from bayprano.platform.meta.calibration import choose_rules, episode_prior
from bayprano.platform.meta.checkpoint import load_checkpoint
from bayprano.platform.metrics import image_auroc
from bayprano.platform.model.site import adapt

from federation_helpers import SMALL_FLAGS, Gate, HeldBack, fed_cfg, quiet
from waiting import wait_until


def _arrays(value, path="reply"):
    """Every array-like leaf of a reply, with where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _arrays(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _arrays(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (bytes, bytearray, np.ndarray, torch.Tensor)):
        yield path, value


def _image_fingerprints(shard_dir: Path) -> list[bytes]:
    """Pieces of every image the sites hold: its PNG file's first 64 bytes after the header chunk, and a row
    of its pixels at the side the sites see (64 px)."""
    pieces = []
    for png in sorted((shard_dir.parent / "synth").rglob("*.png")):
        if "ground_truth" in png.parts:
            continue
        data = png.read_bytes()
        pieces.append(data[33:97])
        pixels = np.ascontiguousarray(load_image(png))
        pieces.append(pixels[pixels.shape[0] // 2].tobytes())
    return [p for p in pieces if len(set(p)) >= 8]  # not a run of one value, which a zero delta could hold


def assert_no_image_bytes(replies: list, shard_dir: Path) -> None:
    """No reply, serialised as it travels, carries a PNG or any image's bytes or pixels."""
    pieces = _image_fingerprints(shard_dir)
    assert len(pieces) > 50
    for i, reply in enumerate(replies):
        blob = pickle.dumps(reply, protocol=5)
        assert b"\x89PNG" not in blob and b"IHDR" not in blob and b"IDAT" not in blob, f"reply {i}: a PNG"
        leaked = [j for j, piece in enumerate(pieces) if piece in blob]
        assert not leaked, (
            f"reply {i} ({getattr(reply, 'site', type(reply).__name__)}): holds bytes of image(s) {leaked[:5]}"
        )


def test_a_secure_federated_run_writes_a_usable_checkpoint_and_sends_the_coordinator_only_masked_sums(
    factories, shard_dir, tmp_path
):
    ray.get([f.ping.remote() for f in factories.values()])
    wait_until(
        lambda: ray.available_resources().get("factory:site-000", 1) == pytest.approx(0.999),
        "site-000's Factory holds a share of the factory:site-000 resource (it is pinned to its node)",
        timeout=15,
        every=0.25,
    )
    cfg = fed_cfg(shard_dir, tmp_path / "fed.pt", secure_agg=True, server_opt="fedprox", fedprox_mu=0.01)
    trainer = FederatedTrainer(cfg, factories, log=quiet)
    summary = trainer.run()
    assert summary["rounds"] == 2 and summary["stop_reason"] == ""
    size = trainer.layout.size

    updates = [t["reply"] for t in trainer.transcript if t["stage"] == "update"]
    assert len(updates) == 6 and {r.site for r in updates} == set(trainer.sites)
    # and a validation reply per site and round, and after the last round the two calibration-rule sums
    assert len(trainer.received) == 6 + 2 * 3 + 2 * 3
    assert_no_image_bytes([t["reply"] for t in trainer.transcript], shard_dir)  # every reply of every stage
    for reply in trainer.received:
        for where, leaf in _arrays(reply):
            n = (
                len(leaf)
                if isinstance(leaf, (bytes, bytearray))
                else leaf.size
                if isinstance(leaf, np.ndarray)
                else leaf.numel()
            )
            assert n <= size + 2, f"{where}: {n} values, more than the parameter vector"
            if isinstance(leaf, (bytes, bytearray)):
                assert leaf.startswith(b"\x89PNG") is False and b"IHDR" not in leaf, f"{where}: image bytes"
            else:
                assert where.endswith(".masked.values"), f"{where}: an array other than the masked vector"
    for reply in updates:  # [weight * delta, weight, loss], masked
        assert isinstance(reply.masked, MaskedUpdate) and sent_fields(reply) == {"site", "masked", "round", "attempt"}
        assert reply.masked.values.dtype == np.uint64 and reply.masked.values.shape == (size + 2,)
    validations = [t["reply"] for t in trainer.transcript if t["stage"] == "validation"]
    assert len(validations) == 6 and all(sent_fields(r) == {"site", "masked"} for r in validations)
    for stage in ("calibration", "rules"):
        replies = [t["reply"] for t in trainer.transcript if t["stage"] == stage]
        assert len(replies) == 3 and all(sent_fields(r) == {"site", "masked"} for r in replies), stage

    shard_bytes = sum(ray.get([f.shard_bytes.remote() for f in factories.values()]))
    assert shard_bytes > 0 and summary["bytes"] == trainer.ledger.total() > 0
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.meta_config["federated"]["round"] == 2 and [h["round"] for h in ckpt.history] == [1, 2]
    assert ckpt.categories == sorted(c for i in trainer.infos.values() for c in i.categories)
    assert ckpt.image_size == 64 and ckpt.calibration.effective_patches > 0
    assert ckpt.normality is not None and 1 in ckpt.normality.table
    torch.testing.assert_close(trainer.layout.flatten(ckpt.model), trainer.global_vector)
    for h in ckpt.history:  # every site validated every round; under secure aggregation only the sum is seen
        assert h["site_auroc"] is None and np.isfinite(h["val_auroc"])

    # the shared model, adapted to two good images of a training category, ranks its defective test images
    # above its good ones (measured 0.67, 0.86, 0.86 on 6 + 6 test images per category at 64 px, mean 0.80;
    # a negated score would give 1 - AUROC, a mean of 0.20)
    aurocs = {}
    for category in ckpt.categories:
        data = load_category(shard_dir.parent / "synth", category, 64)
        site_model = adapt(ckpt, list(data.train_images[:2]))
        scores = np.array([r.score for r in site_model.score(list(data.test_images), maps=False)])
        aurocs[category] = image_auroc(data.test_labels, scores)
    assert np.mean(list(aurocs.values())) >= FLOOR, aurocs

    # the checkpoint's calibration rule, chosen from the two secure sums, is the rule that centralised
    # meta-training chooses on every site's calibration episodes pooled (made again here, in this process,
    # from the final model: the same seed and banks give the same episodes); the prior equals the pooled
    # one to the fixed point's precision
    chosen = {k: e["rule"] for k, e in ckpt.normality.table.items() if "rule" in e}
    assert set(chosen) == {1, 2} and ckpt.history[-1]["calibration_rule"].keys() == chosen.keys()
    data = encode_update(trainer.global_vector, trainer.layout, fp16=cfg.fp16)
    sites = [FactorySite(s, path, SiteSettings.from_config(cfg)) for s, path in cfg.site_paths().items()]
    digest = hashlib.sha256(data).hexdigest()
    pooled = [ep for site in sites for ep in site._calibration_episodes(digest, trainer.instruction(), data)]
    expected = choose_rules(pooled)
    prior = episode_prior(pooled)
    for k, rule in expected.items():
        got = chosen[k]
        assert got["categories"] == rule["categories"] == 3 and got["episodes"] == rule["episodes"]
        assert {f: got[f] for f in RULE_FIELDS} == {f: rule[f] for f in RULE_FIELDS}, k
        assert [c["pinball"] for c in got["candidates"]] == pytest.approx([c["pinball"] for c in rule["candidates"]])
        for field in ("mean", "within_var", "between_var", "loo_offset", "episode_within_var"):
            if field in prior.table[k]:
                assert ckpt.normality.table[k][field] == pytest.approx(prior.table[k][field], rel=1e-4), (k, field)
    # the rules' stage names the model by its digest: a site without episodes of that model says so
    with pytest.raises(DataError, match="site 'site-000': no calibration episodes for model 000000000000"):
        sites[0].calibration_rules("0" * 64, trainer.instruction(), np.zeros(3))
    with pytest.raises(DataError, match="no calibration episodes"):  # bytes that are not the named model
        FactorySite("site-000", cfg.site_paths()["site-000"]).calibration_rules(
            digest, trainer.instruction(), np.zeros(3), None, b"x"
        )


FLOOR = 0.65
RULE_FIELDS = ("use_covariate", "strength", "within", "loo_shift")


def test_secure_aggregation_on_and_off_give_the_same_aggregate(factories, shard_dir, tmp_path):
    deltas = {}
    for secure, fp16 in ((True, False), (False, False), (False, True)):
        trainer = FederatedTrainer(
            fed_cfg(shard_dir, tmp_path / f"{secure}{fp16}.pt", secure_agg=secure, fp16=fp16), factories, log=quiet
        )
        trainer.setup()
        result = trainer.run_round(1)
        assert result.sites == trainer.sites and result.attempt == 0
        assert len(trainer.received) == 3
        assert_no_image_bytes(trainer.received, shard_dir)
        deltas[secure, fp16] = result.delta
        if not secure:
            assert all(
                isinstance(r.update, bytes) and len(r.update) == encoded_num_bytes(trainer.layout, fp16)
                for r in trainer.received
            )
    plain = deltas[False, False]
    assert float(plain.abs().max()) > 0
    torch.testing.assert_close(deltas[True, False], plain, atol=1e-6, rtol=0)
    # float16 on the wire both ways: local training starts from a rounded global model, so only close
    assert float((deltas[False, True] - plain).norm()) < 0.25 * float(plain.norm())


def test_dp_stops_at_the_epsilon_target_with_the_reason_and_resume_continues_without_repeating_a_round(
    ray_session, shard_dir, tmp_path, capsys
):
    z, clip, delta, q = 1.0, 0.5, 1e-5, 1.0  # under DP the sites are Poisson-sampled: at q = 1, all of them
    direct = PrivacyAccountant(z, q, delta)
    eps = [direct.step() for _ in range(3)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, the third does not
    out = tmp_path / "dp.pt"
    flags = [
        "train",
        "--shards",
        str(shard_dir),
        "--sites-per-round",
        "1.0",
        "--local-steps",
        "1",
        "--dp-noise",
        str(z),
        "--dp-clip",
        str(clip),
        "--dp-delta",
        str(delta),
        "--secure-agg",
        "--server-opt",
        "fedadam",
        "--out",
        str(out),
        *SMALL_FLAGS,
    ]
    assert main([*flags, "--rounds", "3", "--target-epsilon", str(target)]) == 0
    captured = capsys.readouterr()
    assert "stopped before round 3" in captured.err and f"target {target:g}" in captured.err
    assert "2 federated round(s) of 3" in captured.out and "image bytes" in captured.out
    for site in ("site-000", "site-001", "site-002"):  # one line per site: what it sent against its images
        assert f"  {site}: sent " in captured.out and "% of its " in captured.out
    ckpt = load_checkpoint(out)
    state = ckpt.meta_config["federated"]
    assert state["round"] == 2 and "stopped before round 3" in state["stop_reason"]
    assert [h["round"] for h in ckpt.history] == [1, 2] and all("sites" not in h for h in ckpt.history)  # secret
    assert ckpt.history[-1]["epsilon"] == pytest.approx(eps[1], rel=1e-12)
    assert PrivacyAccountant(z, q, delta).load_state_dict(state["accountant"]).epsilon == pytest.approx(
        eps[1], rel=1e-12
    )
    assert state["server"]["name"] == "fedadam" and state["server"]["steps"] == 2

    assert main([*flags, "--rounds", "3", "--resume"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.meta_config["federated"]["round"] == 3
    assert [h["round"] for h in ckpt.history] == [1, 2, 3]
    assert ckpt.history[-1]["epsilon"] == pytest.approx(eps[2], rel=1e-12)
    assert ckpt.meta_config["federated"]["server"]["steps"] == 3  # FedAdam's moments carried over, not restarted


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
        (["--target-epsilon", "3", "--dp-clip", "1"], "--target-epsilon needs --dp-noise"),
        (["--server-opt", "fedsgd"], "--server-opt fedsgd"),
        (["--fedprox-mu", "0.1"], "--fedprox-mu is for --server-opt fedprox"),
        (["--sites-per-round", "1.5"], "--sites-per-round 1.5"),
        (["--resume"], "no checkpoint"),
        (["--pool-size", "0"], "--pool-size 0: must be greater than or equal to 1"),
        (["--min-sites", "4"], "--min-sites 4: more than the 3 site(s) sampled each round"),
        (["--round-timeout", "-1"], "--round-timeout -1: must be greater than 0"),
        (["--server-lr", "0"], "--server-lr 0: must be greater than 0"),
        (["--sites-per-round", "4"], "--sites-per-round 4: more than the 3 site(s) there are"),
    ],
)
def test_federated_flags_are_validated_before_anything_starts(shard_dir, tmp_path, capsys, argv, message):
    code = main(["train", "--shards", str(shard_dir), "--rounds", "1", "--out", str(tmp_path / "c.pt"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_federated_flags_need_shards(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--data-root",
                str(tmp_path),
                "--shots",
                "1",
                "--inner-steps",
                "0",
                "--episodes",
                "1",
                "--out",
                str(tmp_path / "c.pt"),
                "--secure-agg",
            ]
        )
        == 2
    )
    assert "give --shards" in capsys.readouterr().err


def test_a_late_site_is_dropped_for_that_round_and_takes_part_in_the_next(factories, shard_dir, tmp_path):
    """The late site computes its round-2 update as usual, but its reply is held back by a gate that only
    opens after the round: it is late however fast or loaded the machine is. The others have 20 s for a
    one-episode update that takes about one."""
    straggler = "site-002"
    gate = Gate.remote()
    sites = {**factories, straggler: HeldBack(factories[straggler], gate, held={2})}
    logged: list[str] = []
    cfg = fed_cfg(shard_dir, tmp_path / "late.pt", rounds=3, local_steps=1, round_timeout=20.0)
    trainer = FederatedTrainer(cfg, sites, log=logged.append)
    summary = trainer.run()
    ray.get(gate.open.remote())
    assert summary["rounds"] == 3 and summary["stop_reason"] == "", logged
    assert any(f"round 2 attempt 0: dropped {straggler} (late or dead)" in line for line in logged), logged
    rounds = {h["round"]: h for h in trainer.history}
    assert rounds[1]["sites"] == trainer.sites and rounds[3]["sites"] == trainer.sites
    assert rounds[2]["sites"] == ["site-000", "site-001"]
    assert [r.site for r in trainer.received if isinstance(r, UpdateReply)].count(straggler) == 2  # rounds 1 and 3


def test_a_killed_factory_is_dropped_for_the_round_which_the_others_complete_without_a_redo_and_it_rejoins(
    own_factories, shard_dir, tmp_path
):
    victim = "site-001"

    def kill_in_round_2(round, attempt, participants):
        if round == 2 and attempt == 0:
            ray.kill(own_factories[victim], no_restart=False)

    cfg = fed_cfg(shard_dir, tmp_path / "kill.pt", rounds=3, local_steps=1, secure_agg=True)
    logged = []
    trainer = FederatedTrainer(cfg, own_factories, log=logged.append, on_broadcast=kill_in_round_2)
    summary = trainer.run()
    assert summary["rounds"] == 3 and summary["stop_reason"] == "", logged
    assert any("update 2 attempt 0: site-001 dropped after sharing" in line for line in logged), logged
    rounds = {h["round"]: h for h in trainer.history}
    assert victim in rounds[1]["sites"]
    assert victim not in rounds[2]["sites"] and len(rounds[2]["sites"]) == 2 and rounds[2]["attempt"] == 0
    assert victim in rounds[3]["sites"] and rounds[3]["attempt"] == 0
    assert load_checkpoint(cfg.out).meta_config["federated"]["round"] == 3
