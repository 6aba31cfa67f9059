"""Paired comparisons of sample sets against one reference: does technique A beat technique B, and what could
this run have detected at all?

KID (Bińkowski et al. 2018) of each run is the unbiased MMD² with k(x, y) = (xᵀy/d + 1)³ between its samples
and the reference. Every technique is scored on the *same* half-samples: half-sample b draws one half of the
sample positions (sample i of every run comes from the same seed and prompt) and one half of the reference, so
the differences are paired and the noise both share cancels. For each replicate r (its own seed and shots):

* Δ_r = KID_A,r − KID_B,r on the full sets;
* v_r, its sampling variance, from balanced half-sampling (McCarthy 1969): for m = n/2 drawn without
  replacement, Var(Δ_half − Δ_full) ≈ Var(Δ_full), so v_r = mean_b (Δ_r,b − Δ_r)².

Pooled over R replicates as a random-effects mean (DerSimonian & Laird 1986, method of moments):
Δ̄ = mean_r Δ_r, Var(Δ̄) = mean_r v_r / R + τ² / R with τ² = max(0, var_r(Δ_r) − mean_r v_r), the spread the
replicates show beyond sampling noise (seeds, shot draws). The 95% interval is Δ̄ ± 1.96 √Var(Δ̄); A beats B
when it lies below 0. The smallest difference the run could detect (two-sided 5% test, 80% power) is
(1.96 + 0.84) √Var(Δ̄).
"""

from __future__ import annotations

import math

import numpy as np
import torch

Z_95, Z_POWER_80 = 1.959964, 0.841621


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


class PairedKID:
    """Scores many sample sets (same size, same sample positions) against one reference on shared half-samples."""

    def __init__(self, reference: torch.Tensor, n_samples: int, n_halves: int = 100, seed: int = 0):
        reference = torch.as_tensor(reference, dtype=torch.float64)
        self.reference = reference
        self.k_rr = _kernel(reference, reference)
        rng = np.random.default_rng(seed)
        n_ref = len(reference)
        self.sample_halves = [np.sort(rng.permutation(n_samples)[: max(2, n_samples // 2)]) for _ in range(n_halves)]
        self.reference_halves = [np.sort(rng.permutation(n_ref)[: max(2, n_ref // 2)]) for _ in range(n_halves)]
        self.n_samples = n_samples

    @staticmethod
    def _mmd(k_ss: torch.Tensor, k_rr: torch.Tensor, k_sr: torch.Tensor) -> float:
        m, n = len(k_ss), len(k_rr)
        within_s = (k_ss.sum() - k_ss.diagonal().sum()) / (m * (m - 1))
        within_r = (k_rr.sum() - k_rr.diagonal().sum()) / (n * (n - 1))
        return float(within_s + within_r - 2 * k_sr.mean())

    def scores(self, samples: torch.Tensor) -> tuple[float, np.ndarray]:
        """(KID on the full sets, KID on every shared half-sample)."""
        samples = torch.as_tensor(samples, dtype=torch.float64)
        if len(samples) != self.n_samples:
            raise ValueError(f"PairedKID: every sample set must have {self.n_samples} samples (paired by position), got {len(samples)}")
        k_ss, k_sr = _kernel(samples, samples), _kernel(samples, self.reference)
        full = self._mmd(k_ss, self.k_rr, k_sr)
        halves = []
        for s, r in zip(self.sample_halves, self.reference_halves):
            s_t, r_t = torch.as_tensor(s), torch.as_tensor(r)
            halves.append(self._mmd(k_ss[s_t][:, s_t], self.k_rr[r_t][:, r_t], k_sr[s_t][:, r_t]))
        return full, np.asarray(halves)


def pooled_difference(a: list[tuple[float, np.ndarray]], b: list[tuple[float, np.ndarray]]) -> dict:
    """The random-effects mean of paired differences A − B over replicates (pairs of `PairedKID.scores`)."""
    if len(a) != len(b) or not a:
        raise ValueError("pooled_difference: the same number (>= 1) of replicates on both sides")
    deltas = np.array([fa - fb for (fa, _), (fb, _) in zip(a, b)])
    sampling = np.array([np.mean(((ha - hb) - (fa - fb)) ** 2) for (fa, ha), (fb, hb) in zip(a, b)])
    replicates = len(deltas)
    between = max(0.0, float(np.var(deltas, ddof=1)) - float(sampling.mean())) if replicates > 1 else 0.0
    variance = float(sampling.mean()) / replicates + between / replicates
    se = math.sqrt(variance)
    mean = float(deltas.mean())
    return {
        "difference": mean,
        "ci_low": mean - Z_95 * se,
        "ci_high": mean + Z_95 * se,
        "se": se,
        "detectable": (Z_95 + Z_POWER_80) * se,  # the smallest |difference| found 80% of the time at 5%
        "replicates": replicates,
        "per_replicate": deltas.tolist(),
        "between_replicate_variance": between,
    }
