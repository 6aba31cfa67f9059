"""Defining properties of genadapt.eval.metrics on synthetic features (fast, CPU)."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from genadapt.eval import metrics as M


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- FID


def test_fid_matches_closed_form_of_true_gaussians():
    # Diagonal covariances commute, so the closed form is independent of the sqrt code:
    # FID = |mu_a - mu_b|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 3.669.
    d, n = 8, 4000
    var_a = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    var_b = torch.linspace(2.0, 0.5, d, dtype=torch.float64)
    mu_b = torch.full((d,), 0.5, dtype=torch.float64)
    true = float((mu_b**2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    a = _randn(0, n, d) * var_a.sqrt()
    b = _randn(1, n, d) * var_b.sqrt() + mu_b
    # Tolerance: the mean term alone has delta-method std 2*sqrt(D^T(S_a+S_b)D/N) = 0.07;
    # over 20 seeds the estimate's error had mean +0.03 (O(D/N) bias), std 0.09, max 0.18.
    # 0.4 is ~4 sigma, and still ~11 % of the value (a wrong sqrt term is off by > 1).
    assert M.fid(a, b) == pytest.approx(true, abs=0.4)
    assert M.frechet_distance(torch.zeros(d), torch.diag(var_a), mu_b, torch.diag(var_b)) == pytest.approx(true, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    d = 6
    q_a, q_b = _randn(2, d, d), _randn(3, d, d)
    cov_a, cov_b = q_a @ q_a.T + 0.1 * torch.eye(d, dtype=torch.float64), q_b @ q_b.T + 0.1 * torch.eye(d, dtype=torch.float64)
    mu_a, mu_b = _randn(4, d), _randn(5, d)
    sa, sb = cov_a.numpy(), cov_b.numpy()
    ref = float(((mu_a - mu_b) ** 2).sum()) + np.trace(sa) + np.trace(sb) - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb).real)
    assert M.frechet_distance(mu_a, cov_a, mu_b, cov_b) == pytest.approx(ref, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    x = _randn(6, 500, 16)
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_with_fewer_samples_than_dimensions_is_finite_symmetric_and_rotation_invariant():
    a, b = _randn(7, 10, 64), _randn(8, 12, 64) + 0.5
    value = M.fid(a, b)
    assert math.isfinite(value) and value > 0
    assert M.fid(a, a) == pytest.approx(0.0, abs=1e-8)
    # FID is symmetric although the sqrt uses S_a^(1/2) S_b S_a^(1/2), and invariant under a
    # shared orthogonal map: both fail if singular covariances are mishandled.
    assert M.fid(b, a) == pytest.approx(value, rel=1e-8)
    q, _ = torch.linalg.qr(_randn(9, 64, 64))
    assert M.fid(a @ q, b @ q) == pytest.approx(value, rel=1e-8)


# --------------------------------------------------------------------------- KID


def test_kid_equals_unbiased_mmd2_with_cubic_kernel_when_subset_is_the_whole_set():
    x, y = _randn(10, 7, 3).numpy(), (_randn(11, 7, 3) + 0.3).numpy()
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = 7
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2 * cross / m**2
    assert M.kid(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-10)


def test_kid_same_distribution_near_zero_and_ci_covers_zero():
    a, b = _randn(12, 300, 32), _randn(13, 300, 32)
    out = M.kid_with_ci(a, b, n_boot=40)
    assert abs(out["value"]) < 0.01
    assert out["ci_low"] <= 0.0 <= out["ci_high"]
    assert (out["n_a"], out["n_b"], out["subset_size"]) == (300, 300, 300)


def test_kid_shifted_distributions_positive_and_ci_excludes_zero():
    a, b = _randn(14, 300, 32), _randn(15, 300, 32) + 0.3
    out = M.kid_with_ci(a, b, n_boot=40)
    assert out["value"] > 0.1
    assert 0.0 < out["ci_low"] <= out["value"] <= out["ci_high"]


def test_kid_subset_adapts_to_few_shot_reference_and_rejects_single_sample():
    shots, gen = _randn(16, 5, 16), _randn(17, 200, 16)
    assert math.isfinite(M.kid(shots, gen))
    assert M.kid_with_ci(shots, gen, n_boot=10)["subset_size"] == 5
    with pytest.raises(ValueError, match="at least 2"):
        M.kid(shots[:1], gen)


def test_bootstrap_resamples_both_sets():
    # For the difference of means, the 95 % interval width is 2*1.96*sqrt(1/n_a + 1/n_b);
    # resampling only one set would give a width sqrt(2) smaller.
    a, b = _randn(18, 400, 1), _randn(19, 400, 1)
    lo, hi = M.bootstrap_ci(lambda p, q: float(p.mean() - q.mean()), a, b, n_boot=400, method="percentile")
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(2 / 400), rel=0.2)


# --------------------------------------------------------------------------- precision / recall / density / coverage


def test_fake_subset_of_real_has_precision_one():
    real = _randn(20, 400, 8)
    out = M.precision_recall(real, real[::4], k=3)
    assert out["precision"] == 1.0
    assert M.density_coverage(real, real[::4], k=5)["density"] > 0


def test_ball_membership_is_inclusive():
    # k=1 radii: 0 -> 1, 1 -> 1, 3 -> 2. The fake at -1 is exactly on the boundary of B(0, 1).
    real = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    fake = torch.tensor([[-1.0]], dtype=torch.float64)
    assert M.precision_recall(real, torch.cat([fake, real]), k=1)["precision"] == 1.0
    assert M.density_coverage(real, fake, k=1)["density"] == 1.0


def test_far_shifted_fake_has_no_precision_coverage_or_density():
    real, fake = _randn(21, 300, 8), _randn(22, 300, 8) + 50.0
    pr, dc = M.precision_recall(real, fake), M.density_coverage(real, fake)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    assert dc["coverage"] == 0.0 and dc["density"] == 0.0


def test_fake_on_one_of_two_modes_has_high_precision_and_half_recall():
    d = 4
    offset = torch.zeros(d, dtype=torch.float64)
    offset[0] = 20.0
    real = torch.cat([_randn(23, 300, d) - offset, _randn(24, 300, d) + offset])
    one_mode = _randn(25, 300, d) + offset
    both_modes = torch.cat([_randn(26, 150, d) - offset, _randn(27, 150, d) + offset])
    pr, dc = M.precision_recall(real, one_mode, k=3), M.density_coverage(real, one_mode, k=5)
    baseline = M.precision_recall(real, both_modes, k=3)
    assert pr["precision"] > 0.9
    assert pr["precision"] == pytest.approx(baseline["precision"], abs=0.05)  # fidelity unchanged
    assert 0.4 <= pr["recall"] <= 0.55
    assert pr["recall"] == pytest.approx(baseline["recall"] / 2, abs=0.05)  # diversity halved
    assert 0.4 <= dc["coverage"] <= 0.5  # balls of the missing mode hold no fake


def test_identical_distributions_density_near_one_and_coverage_near_lemma_value():
    # Naeem et al. 2020, Lemmas 1-2: E[density] = 1 for identical distributions; E[coverage] -> 1 - 2^-k
    # (= 0.969 for k=5) when N = M is large.
    real, fake = _randn(26, 1000, 8), _randn(27, 1000, 8)
    out = M.density_coverage(real, fake, k=5)
    assert out["density"] == pytest.approx(1.0, abs=0.1)
    assert out["coverage"] == pytest.approx(1 - 2**-5, abs=0.03)


# --------------------------------------------------------------------------- memorisation / diversity / authenticity


def _fresh_and_copies(train, copy_of, n_fresh, seed):
    fresh = _randn(seed, n_fresh, train.shape[1])
    copies = train[copy_of] + 1e-3 * _randn(seed + 1, len(copy_of), train.shape[1])
    return torch.cat([fresh, copies])


def test_memorisation_flags_planted_copies_with_their_shot():
    train = _randn(30, 10, 32)
    samples = _fresh_and_copies(train, [3, 7, 7], 40, seed=31)
    out = M.memorisation(samples, train)
    assert out["rule"] == "nn_ratio"
    assert out["flagged"] == [40, 41, 42]
    assert out["copied_shot"] == [3, 7, 7]
    assert out["copy_rate"] == pytest.approx(3 / 43)


def test_memorisation_counts_duplicate_shots_once():
    train = _randn(32, 10, 32)
    train = torch.cat([train, train[3:4]])  # shot 10 duplicates shot 3
    samples = _fresh_and_copies(train, [3], 20, seed=33)
    out = M.memorisation(samples, train)
    assert out["flagged"] == [20] and out["copied_shot"][0] in (3, 10)
    assert out["n_distinct_shots"] == 10


def test_memorisation_single_shot_fallbacks_are_reported():
    shot = _randn(34, 1, 32)
    samples = _fresh_and_copies(shot, [0, 0], 30, seed=35)
    by_median = M.memorisation(samples, shot)
    assert by_median["rule"] == "single_shot_vs_median"
    assert by_median["flagged"] == [30, 31]
    by_reference = M.memorisation(samples, shot, reference=_randn(37, 20, 32))
    assert by_reference["rule"] == "single_shot_vs_reference"
    assert by_reference["flagged"] == [30, 31]


def test_intra_cluster_diversity_hand_computed_and_labelled():
    shots = torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [-50.0, -50.0]], dtype=torch.float64)
    samples = torch.tensor([[0, 1], [0, -1], [1, 0], [10, 1], [10, 3], [100, 101]], dtype=torch.float64)
    out = M.intra_cluster_diversity(samples, shots, "l2", space="toy")
    assert out["cluster_sizes"] == [3, 2, 1, 0]
    assert out["per_cluster"][2] is None and out["per_cluster"][3] is None
    assert out["value"] == pytest.approx(((2 + 2 * math.sqrt(2)) / 3 + 2.0) / 2)
    assert out["distance_name"] == "l2 distance on toy features"
    assert "lpips" not in out["distance_name"].lower()


def test_intra_cluster_diversity_zero_for_copies_positive_for_diverse_samples():
    shots = _randn(40, 10, 32)
    copies = shots.repeat(5, 1) + 1e-4 * _randn(41, 50, 32)
    diverse = _randn(42, 200, 32)
    low = M.intra_cluster_diversity(copies, shots, space="test-features")
    high = M.intra_cluster_diversity(diverse, shots, space="test-features")
    assert low["value"] < 1e-6
    assert high["value"] > 0.5  # cosine distance of independent 32-d Gaussians is ~1


def test_authenticity_flags_copies_and_passes_far_samples():
    train = _randn(50, 20, 16)
    fake = _fresh_and_copies(train, [2, 5], 30, seed=51)
    out = M.authenticity(train, fake)
    assert {30, 31} <= set(out["unauthentic"])
    assert [out["nearest_train"][30], out["nearest_train"][31]] == [2, 5]
    assert out["authenticity"] <= 1 - 2 / 32
    assert M.authenticity(train, fake + 100.0)["authenticity"] == 1.0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.fid(torch.zeros(10), torch.zeros(10, 4)), "2-D"),
        (lambda: M.fid(torch.zeros(10, 3), torch.zeros(10, 4)), "D=3"),
        (lambda: M.fid(torch.zeros(1, 4), torch.zeros(10, 4)), "at least 2"),
        (lambda: M.precision_recall(torch.zeros(3, 4), torch.zeros(10, 4), k=3), "more than k"),
        (lambda: M.density_coverage(torch.full((10, 4), float("nan")), torch.zeros(10, 4)), "NaN"),
        (lambda: M.intra_cluster_diversity(torch.zeros(5, 4), torch.zeros(2, 4), space=" "), "space"),
        (lambda: M.intra_cluster_diversity(torch.zeros(5, 4), torch.zeros(2, 4), "lpips", space="x"), "distance"),
        (lambda: M.authenticity(torch.ones(3, 4), torch.zeros(2, 4)), "distinct"),
        (lambda: M.bootstrap_ci(M.fid, torch.zeros(5, 2), torch.zeros(5, 2), alpha=1.5), "alpha"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
