"""The post-processing menu: each statistic by hand, and the choice on validation tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.methods.postprocess import STATISTICS, choose_statistic, statistic
from bayprano.platform.model.anomaly_map import anomaly_map


def test_each_statistic_by_hand():
    patches = torch.zeros(2, 10, 20)
    patches[0, 3, 4] = 5.0  # one hot patch
    patches[1, 2:4, 2:4] = 3.0  # four warm patches
    np.testing.assert_allclose(statistic(patches, "max", 40), [5.0, 3.0])
    np.testing.assert_allclose(statistic(patches, "top1_mean", 40), [2.5, 3.0])  # top 2 of 200 patches
    blurred = statistic(patches, "blur_max", (20, 40))
    np.testing.assert_allclose(blurred, anomaly_map(patches, (20, 40), sigma=4.0).flatten(1).amax(1).numpy(), rtol=1e-6)
    assert blurred[1] > blurred[0]  # blurring favours the extended defect over the isolated patch
    with pytest.raises(ConfigError, match="unknown image statistic 'median'"):
        statistic(patches, "median", 40)


def test_the_choice_is_the_best_pooled_auroc_on_the_validation_tasks():
    """Normal queries with one isolated hot patch, anomalies with a warm region: only blurring ranks them."""
    gen = torch.Generator().manual_seed(0)
    query = torch.rand(8, 10, 10, generator=gen) * 0.1
    query[:4, 5, 5] = 4.0
    query[4:, 3:7, 3:7] += 2.0
    labels = np.array([0] * 4 + [1] * 4)
    support = torch.zeros(2, 1, 10, 10)
    name, aurocs = choose_statistic([(support, query, labels)], lambda s, q: q, 40)
    assert set(aurocs) == set(STATISTICS)
    assert name == "blur_max" and aurocs["blur_max"] == 1.0 and aurocs["max"] == 0.0
    name, aurocs = choose_statistic([(support, query[:4], labels[:4])], lambda s, q: q, 40)
    assert name == "max" and all(np.isnan(v) for v in aurocs.values())


def test_a_meta_validation_set_holds_support_normal_and_anomalous_queries():
    from bayprano.platform.evaluate import meta_validation_set

    rng = np.random.default_rng(0)
    images = (rng.random((10, 32, 32, 3)) * 60 + 100).astype(np.uint8)

    def extract(ims):
        return torch.from_numpy(ims).float().permute(0, 3, 1, 2)

    support, query, labels = meta_validation_set(images, extract, n_support=3, seed=1)
    assert support.shape == (3, 3, 32, 32) and query.shape == (12, 3, 32, 32)  # 6 normal queries, 6 anomalies of them
    assert labels.tolist() == [0] * 6 + [1] * 6
    assert all((query[i] != query[i + 6]).any() for i in range(6))  # each anomaly changes its normal
    flat = {t.numpy().tobytes() for t in torch.cat([support, query[:6]])}
    assert len(flat) == 9  # support and normal queries are different images
    with pytest.raises(ConfigError, match="more than 10 good images"):
        meta_validation_set(images, extract, n_support=10)
