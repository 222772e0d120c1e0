"""The one anomaly-map module: patch score and its inverse, the heat level, the overlay."""

from __future__ import annotations

import numpy as np
import torch

from bayprano.platform.model.anomaly_map import anomaly_map, gaussian_blur, heat_level, overlay
from bayprano.platform.model.niw import StudentT, distance_from_patch_score, patch_score


def test_patch_score_is_minus_the_student_t_log_kernel_and_is_inverted_exactly():
    maha = torch.tensor([[0.0, 1.0, 10.0, 300.0]], dtype=torch.float64)
    t = StudentT(torch.zeros(1, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)[None], torch.tensor([7.0]))
    score = patch_score(maha, 7.0, 4)
    torch.testing.assert_close(score, -t.log_kernel(maha))
    np.testing.assert_allclose(distance_from_patch_score(score.numpy(), 7.0, 4), maha.numpy(), rtol=1e-12, atol=1e-12)


def test_heat_level_is_linear_in_the_distance_and_tops_at_the_statistic_over_the_threshold():
    maha = np.array([[0.0, 2.0], [4.0, 8.0]])
    level = heat_level(patch_score(torch.from_numpy(maha), 5.0, 3).numpy(), score=3.0, threshold=2.0, dim=3, df=5.0)
    np.testing.assert_allclose(level, maha / 8.0 * 1.5, atol=1e-12)
    assert heat_level(np.zeros((2, 2)), 1.0, None, 3, 5.0).max() == 0.0


def test_overlay_is_at_the_image_size_and_red_where_the_level_is_one():
    image = np.full((20, 30, 3), 128, np.uint8)
    level = np.zeros((4, 6), np.float32)
    level[:, 3:] = 1.0
    out = overlay(image, level)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[10, 28, 0] > out[10, 28, 2] and out[10, 1, 2] > out[10, 1, 0]  # red on the right, blue on the left


def test_the_map_operator_equals_upsampling_then_the_blur():
    scores = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up = torch.nn.functional.interpolate(scores[:, None], size=(20, 28), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(anomaly_map(scores, (20, 28), sigma=2.0), gaussian_blur(up, 2.0))
