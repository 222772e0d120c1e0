"""Flat parameter vectors: layout, flatten/unflatten/load, the wire format, communication counts."""

from __future__ import annotations

import pytest
import torch

from bayprano.platform.errors import DataError
from bayprano.platform.federated.state import (
    HEADER_BYTES,
    CommunicationLedger,
    ParameterLayout,
    decode_update,
    encode_update,
    encoded_num_bytes,
)
from bayprano.platform.model.bayes import BayesianPatchModel


def model(dim=6, seed=0) -> BayesianPatchModel:
    return BayesianPatchModel(in_channels=12, dim=dim, seed=seed)


def test_layout_holds_the_trainable_parameters_only_in_a_stable_order():
    layout = ParameterLayout.from_model(model())
    assert layout.names == tuple(name for name, _ in model().named_parameters())
    assert {"head.weight", "head.bias", "log_inner_lr", "raw_kappa0"} <= set(layout.names)
    assert "feature_mean" not in layout.names and "feature_std" not in layout.names
    assert layout.size == 6 * 12 + 6 + 10 == sum(p.numel() for p in model().parameters())
    assert ParameterLayout.from_model(model(seed=3)) == layout
    assert ParameterLayout.from_model(model(seed=3)).digest == layout.digest
    other = ParameterLayout.from_model(model(dim=8))
    assert other.digest != layout.digest
    assert layout.difference(other) == "parameter 'head.weight' has shape [8, 12, 1, 1], expected [6, 12, 1, 1]"


def test_flatten_unflatten_and_load_round_trip_without_touching_buffers():
    src, dst = model(seed=0), model(seed=1)
    dst.set_feature_statistics(torch.full((12,), 2.0), torch.full((12,), 3.0))
    layout = ParameterLayout.from_model(src)
    vec = layout.flatten(src)
    assert vec.dtype == torch.float32 and vec.shape == (layout.size,)
    torch.testing.assert_close(layout.flatten(src.state_dict()), vec)  # buffers in the state dict are ignored
    parts = layout.unflatten(vec)
    assert list(parts) == list(layout.names) and parts["head.weight"].shape == (6, 12, 1, 1)
    layout.load_into(dst, vec)
    for (name, a), b in zip(src.named_parameters(), dst.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    assert (dst.feature_mean == 2.0).all() and (dst.feature_std == 3.0).all()
    vec[0] += 1.0  # the loaded parameters do not alias the vector
    assert not torch.equal(layout.flatten(dst), vec)


def test_bad_vectors_and_models_are_refused_by_name():
    layout = ParameterLayout.from_model(model())
    with pytest.raises(DataError, match=rf"expected a 1-D vector of {layout.size} values, got shape \[3\]"):
        layout.unflatten(torch.zeros(3))
    bad = torch.zeros(layout.size)
    bad[5] = float("nan")
    with pytest.raises(DataError, match=rf"1 of {layout.size} values are NaN or infinite"):
        layout.unflatten(bad)
    state = model().state_dict()
    del state["pixel_bias"]
    with pytest.raises(DataError, match="parameter 'pixel_bias' is missing"):
        layout.flatten(state)
    with pytest.raises(
        DataError, match=r"does not match the parameter layout .*: parameter 'head.weight' has shape \[8"
    ):
        layout.load_into(model(dim=8), torch.zeros(layout.size))


def test_wire_format_round_trips_in_fp32_and_fp16_and_counts_its_bytes():
    layout = ParameterLayout.from_model(model())
    vec = torch.randn(layout.size, generator=torch.Generator().manual_seed(0)) * 0.1
    data = encode_update(vec, layout)
    assert len(data) == HEADER_BYTES + 4 * layout.size == encoded_num_bytes(layout) == layout.num_bytes()
    assert torch.equal(decode_update(data, layout), vec)
    half = encode_update(vec, layout, fp16=True)
    assert len(half) == HEADER_BYTES + 2 * layout.size == layout.num_bytes(fp16=True)
    torch.testing.assert_close(decode_update(half, layout), vec, rtol=1e-3, atol=1e-4)


def test_wire_format_refuses_foreign_damaged_or_unrepresentable_vectors():
    layout = ParameterLayout.from_model(model())
    data = encode_update(torch.zeros(layout.size), layout)
    with pytest.raises(DataError, match="encoded for parameter layout .*, this model's layout is"):
        decode_update(data, ParameterLayout.from_model(model(dim=8)))
    with pytest.raises(DataError, match=rf"{len(data) - 1} bytes, expected {len(data)} for {layout.size} float32"):
        decode_update(data[:-1], layout)
    with pytest.raises(DataError, match="shorter than the 32-byte header"):
        decode_update(data[:10], layout)
    with pytest.raises(DataError, match="not a bayprano parameter vector"):
        decode_update(b"XXXX" + data[4:], layout)
    big = torch.zeros(layout.size)
    big[0] = 1e5
    with pytest.raises(DataError, match="beyond float16's range"):
        encode_update(big, layout, fp16=True)


def test_communication_ledger_counts_per_site_and_round_and_round_trips():
    ledger = CommunicationLedger()
    ledger.record(0, "site-0", "down", 100)
    ledger.record(0, "site-0", "up", 60)
    ledger.record(0, "site-1", "down", 100)
    ledger.record(1, "site-0", "down", 100)
    assert (
        ledger.total() == 360 and ledger.total(round=0) == 260 and ledger.total(site="site-0", direction="down") == 200
    )
    assert ledger.per_site_round()[(0, "site-0")] == {"down": 100, "up": 60}
    copy = CommunicationLedger()
    copy.load_state_dict(ledger.state_dict())
    assert copy.per_site_round() == ledger.per_site_round()
    with pytest.raises(ValueError, match="direction must be one of down, up, got 'sideways'"):
        ledger.record(0, "site-0", "sideways", 1)
