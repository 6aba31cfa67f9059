"""Paired statistics: two fake techniques whose samples differ by a known shift from the same noise are told apart
by the paired, replicate-pooled interval, while their two independent intervals overlap."""

import math

import numpy as np
import torch

from genadapt.eval.paired import Z_95, PairedKID, pooled_difference


def unpaired_overlap(a_full: float, a_halves: np.ndarray, b_full: float, b_halves: np.ndarray) -> bool:
    """The weak test compare used before: do two independent 95% intervals overlap?"""
    se_a = math.sqrt(np.mean((a_halves - a_full) ** 2))
    se_b = math.sqrt(np.mean((b_halves - b_full) ** 2))
    return not (a_full + Z_95 * se_a < b_full - Z_95 * se_b or b_full + Z_95 * se_b < a_full - Z_95 * se_a)


def _replicates(delta: float, count: int = 3):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(200, 16, generator=generator)
    shift = torch.zeros(16)
    shift[0] = delta
    a, b = [], []
    for r in range(count):
        noise = torch.randn(64, 16, generator=generator)  # sample i of both techniques: the same seed
        scorer = PairedKID(reference, 64, seed=r)
        a.append(scorer.scores(noise))
        b.append(scorer.scores(noise + shift))
    return a, b


def test_paired_compare_separates_a_known_shift_the_unpaired_test_cannot():
    a, b = _replicates(0.5)
    result = pooled_difference(b, a)
    assert result["ci_low"] > 0  # B (shifted away from the reference) is worse, and the paired test says so
    assert all(unpaired_overlap(*x, *y) for x, y in zip(a, b))  # ...while every replicate's two intervals overlap
    assert abs(result["detectable"] - 2.801585 * result["se"]) < 1e-9  # (z_0.975 + z_0.8) standard errors


def test_identical_techniques_are_tied_with_a_zero_difference():
    a, _ = _replicates(0.0)
    result = pooled_difference(a, a)
    assert result["difference"] == 0 and result["ci_low"] == 0 == result["ci_high"]


def test_the_detectable_difference_shrinks_with_more_replicates():
    few = pooled_difference(*reversed(_replicates(0.5, 2)))
    many = pooled_difference(*reversed(_replicates(0.5, 8)))
    assert many["detectable"] < few["detectable"] and np.isfinite(many["se"])
