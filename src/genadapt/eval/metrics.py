"""Few-shot generation metrics on feature tensors ([N, D] float; torch tensors or arrays).

Everything here is pure math on features: the caller chooses the feature extractor
(Inception pool3, VGG16, CLIP, LPIPS-prepared features, ...). Computation is in float64
on the device of the inputs. Distances are Euclidean unless stated.

References (definitions are restated in each docstring; see also
shared/research/gan_anchors.md sections 2.4 and 6):
  Heusel et al. 2017 (FID), Bińkowski et al. 2018 (KID), Gretton et al. 2012 (MMD),
  Kynkäänniemi et al. 2019 (precision/recall), Naeem et al. 2020 (density/coverage),
  Ojha et al. 2021 (CDC intra-cluster LPIPS), Yoon et al. 2023 / Gu et al. 2025 (NN ratio),
  Alaa et al. 2022 (authenticity).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from genadapt.errors import UserError

__all__ = [
    "MetricInputError",
    "frechet_distance",
    "fid",
    "kid",
    "bootstrap_ci",
    "metric_with_ci",
    "fid_with_ci",
    "kid_with_ci",
    "precision_recall",
    "density_coverage",
    "intra_cluster_diversity",
    "memorisation",
    "authenticity",
]

_CHUNK = 1024  # query rows per distance block: keeps memory at CHUNK x N doubles


class MetricInputError(UserError, ValueError):
    """Feature tensors that a metric cannot use (shape, size, values)."""


# --------------------------------------------------------------------------- input checks


def _tensor(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach()


def _features(x, name: str, min_rows: int = 1) -> torch.Tensor:
    t = _tensor(x)
    if t.ndim != 2:
        raise MetricInputError(f"{name}: expected a 2-D feature tensor [N, D], got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise MetricInputError(f"{name}: feature dimension D is 0")
    if t.shape[0] < min_rows:
        raise MetricInputError(f"{name}: needs at least {min_rows} sample(s), got {t.shape[0]}")
    if t.is_complex() or t.dtype == torch.bool:
        raise MetricInputError(f"{name}: expected real-valued features, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise MetricInputError(f"{name}: features contain NaN or infinite values")
    return t


def _pair(a, b, name_a: str, name_b: str, min_a: int = 1, min_b: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _features(a, name_a, min_a), _features(b, name_b, min_b)
    if x.shape[1] != y.shape[1]:
        raise MetricInputError(f"{name_a} has D={x.shape[1]} but {name_b} has D={y.shape[1]}: features must match")
    return x, y.to(x.device)


def _dist(a: torch.Tensor, b: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    if metric == "l2":
        return torch.cdist(a, b)
    if metric == "cosine":
        an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1.0 - an @ bn.T).clamp_min(0.0)
    raise MetricInputError(f"distance must be 'cosine' or 'l2', got {metric!r}")


def _duplicates(train: torch.Tensor) -> torch.Tensor:
    """[M, M] bool: shot j duplicates shot i (distance <= 1e-6 x the largest shot distance)."""
    tt = torch.cdist(train, train)
    return tt <= 1e-6 * float(tt.max())


# --------------------------------------------------------------------------- FID


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b) (Dowson & Landau 1982).

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}); the trace of the square root is
    Σ_i sqrt(λ_i(Σ_a^{1/2} Σ_b Σ_a^{1/2})) (a symmetric PSD matrix with the eigenvalues
    of Σ_a Σ_b), so singular covariances give no NaN and no imaginary part.
    """
    mu_a, cov_a, mu_b, cov_b = (_tensor(v) for v in (mu_a, cov_a, mu_b, cov_b))
    d = mu_a.shape[0] if mu_a.ndim == 1 else -1
    if mu_a.shape != (d,) or mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise MetricInputError(
            f"frechet_distance: shapes must be (D,), (D, D), (D,), (D, D); got {tuple(mu_a.shape)}, "
            f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}"
        )
    mu_a, cov_a = mu_a.double(), cov_a.double()
    mu_b, cov_b = mu_b.double().to(mu_a.device), cov_b.double().to(cov_a.device)
    w, v = torch.linalg.eigh((cov_a + cov_a.T) / 2)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    value = float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_covmean)
    return max(value, 0.0)  # rounding can leave ~-1e-12 when the sets are identical


def fid(feats_a, feats_b) -> float:
    """FID (Heusel et al. 2017, NeurIPS, "GANs trained by a two time-scale update rule ...").

    Fréchet distance of the Gaussians fitted to the two feature sets:
    FID = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}), unbiased (N−1) covariances;
    see `frechet_distance` for the stable square root (valid for N < D). Strongly
    biased upward at small N: compare values only at equal sample counts.
    """
    x, y = _pair(feats_a, feats_b, "feats_a", "feats_b", 2, 2)
    return frechet_distance(x.mean(0), torch.cov(x.T).reshape(x.shape[1], -1), y.mean(0), torch.cov(y.T).reshape(y.shape[1], -1))


# --------------------------------------------------------------------------- KID


def kid(feats_a, feats_b, subset_size: int | None = None, n_subsets: int = 100, seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018, ICLR, "Demystifying MMD GANs"): unbiased MMD² with k(x, y) = (xᵀy/d + 1)³.

    Per subset of m rows from each set (without replacement):
    MMD²_u = Σ_{i≠j}[k(x_i,x_j) + k(y_i,y_j)]/(m(m−1)) − 2Σ_{i,j}k(x_i,y_j)/m²
    (Gretton et al. 2012, Lemma 6), averaged over `n_subsets` subsets as in SG2-ADA /
    clean-fid. m = min(subset_size or 1000, len(a), len(b)): small sets shrink the subset
    instead of erroring. Can be slightly negative.
    """
    x, y = _pair(feats_a, feats_b, "feats_a", "feats_b", 2, 2)
    if subset_size is not None and subset_size < 2:
        raise MetricInputError(f"kid: subset_size must be >= 2, got {subset_size}")
    if n_subsets < 1:
        raise MetricInputError(f"kid: n_subsets must be >= 1, got {n_subsets}")
    m = min(1000 if subset_size is None else subset_size, x.shape[0], y.shape[0])
    if m == x.shape[0] == y.shape[0]:
        n_subsets = 1  # every subset is the whole of both sets
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(n_subsets):
        xs = x[torch.randperm(x.shape[0], generator=gen)[:m].to(x.device)]
        ys = y[torch.randperm(y.shape[0], generator=gen)[:m].to(y.device)]
        kxx = (xs @ xs.T / d + 1) ** 3
        kyy = (ys @ ys.T / d + 1) ** 3
        kxy = (xs @ ys.T / d + 1) ** 3
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        total += float(within / (m * (m - 1)) - 2 * kxy.sum() / m**2)
    return total / n_subsets


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float],
    feats_a,
    feats_b,
    n_boot: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    method: str = "shifted",
    center: float | None = None,
) -> tuple[float, float]:
    """(1−alpha) bootstrap interval of metric_fn(a, b), resampling both sets with replacement.

    method="percentile": the alpha/2 and 1−alpha/2 quantiles of the replicates (Efron 1979).
    method="shifted" (default): the same quantiles moved by θ̂ − mean(θ*). Resampling with
    replacement duplicates rows, which shifts distance metrics (e.g. KID by about
    (E k(x,x) − E k(x,x'))/N per set, often more than its spread), so the plain percentile
    interval can miss θ̂ itself; the shifted one uses the bootstrap for spread only.
    `center` is θ̂ (default metric_fn(a, b)).
    """
    x, y = _pair(feats_a, feats_b, "feats_a", "feats_b", 2, 2)
    if n_boot < 2:
        raise MetricInputError(f"bootstrap_ci: n_boot must be >= 2, got {n_boot}")
    if not 0 < alpha < 1:
        raise MetricInputError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
    if method not in ("shifted", "percentile"):
        raise MetricInputError(f"bootstrap_ci: method must be 'shifted' or 'percentile', got {method!r}")
    gen = torch.Generator().manual_seed(seed)
    reps = np.empty(n_boot)
    for i in range(n_boot):
        ia = torch.randint(x.shape[0], (x.shape[0],), generator=gen).to(x.device)
        ib = torch.randint(y.shape[0], (y.shape[0],), generator=gen).to(y.device)
        reps[i] = float(metric_fn(x[ia], y[ib]))
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    if method == "shifted":
        shift = (float(metric_fn(x, y)) if center is None else center) - reps.mean()
        lo, hi = lo + shift, hi + shift
    return float(lo), float(hi)


def metric_with_ci(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float],
    feats_a,
    feats_b,
    n_boot: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    method: str = "shifted",
    boot_fn: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
) -> dict:
    """{"value", "ci_low", "ci_high", "n_a", "n_b", ...}: metric_fn(a, b) and its `bootstrap_ci`.

    `boot_fn` (default metric_fn) is what the replicates evaluate, e.g. a cheaper KID.
    """
    x, y = _pair(feats_a, feats_b, "feats_a", "feats_b", 2, 2)
    value = float(metric_fn(x, y))
    lo, hi = bootstrap_ci(boot_fn or metric_fn, x, y, n_boot=n_boot, alpha=alpha, seed=seed, method=method, center=value)
    return {
        "value": value,
        "ci_low": lo,
        "ci_high": hi,
        "n_a": int(x.shape[0]),
        "n_b": int(y.shape[0]),
        "n_boot": n_boot,
        "alpha": alpha,
        "ci_method": method,
    }


def fid_with_ci(feats_a, feats_b, n_boot: int = 50, alpha: float = 0.05, seed: int = 0) -> dict:
    """`fid` with a bootstrap interval (`metric_with_ci`); each replicate costs one FID.

    The interval is clipped at 0 ("ci_clipped" says when): FID is a squared distance, but the shifted
    interval θ̂ − mean(θ*) + quantile(θ*) goes below 0 when FID is small next to its resampling bias
    (a resample holds ~63 % distinct rows, which raises FID's small-sample bias: mean(θ*) > θ̂).
    Clipping keeps the shifted interval centred on θ̂; the percentile interval cannot go negative but
    can miss θ̂ altogether.
    """
    out = metric_with_ci(fid, feats_a, feats_b, n_boot=n_boot, alpha=alpha, seed=seed)
    out["ci_clipped"] = out["ci_low"] < 0.0
    out["ci_low"], out["ci_high"] = max(out["ci_low"], 0.0), max(out["ci_high"], 0.0)
    return out


def kid_with_ci(
    feats_a,
    feats_b,
    subset_size: int | None = None,
    n_subsets: int = 100,
    n_boot: int = 50,
    boot_subsets: int = 10,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """`kid` with a bootstrap interval; replicates use `boot_subsets` subsets to stay cheap."""
    value_fn = partial(kid, subset_size=subset_size, n_subsets=n_subsets, seed=seed)
    boot_fn = partial(kid, subset_size=subset_size, n_subsets=boot_subsets, seed=seed)
    out = metric_with_ci(value_fn, feats_a, feats_b, n_boot=n_boot, alpha=alpha, seed=seed, boot_fn=boot_fn)
    out["subset_size"] = min(1000 if subset_size is None else subset_size, out["n_a"], out["n_b"])
    return out


# --------------------------------------------------------------------------- k-NN manifolds


def _kth_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """NND_k: distance from each row to its k-th nearest *other* row (self sits at rank 1)."""
    return torch.cat([torch.cdist(x[s : s + _CHUNK], x).kthvalue(k + 1, dim=1).values for s in range(0, x.shape[0], _CHUNK)])


def _ball_hits(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: how many balls B(ref_i, radii_i) contain it (‖q − ref_i‖ <= radii_i);
    per ref ball: whether it contains at least one query."""
    counts, covered = [], torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    for s in range(0, query.shape[0], _CHUNK):
        inside = torch.cdist(query[s : s + _CHUNK], ref) <= radii[None, :]
        counts.append(inside.sum(1))
        covered |= inside.any(0)
    return torch.cat(counts), covered


def _check_k(k: int, n: int, name: str) -> None:
    if k < 1:
        raise MetricInputError(f"k must be >= 1, got {k}")
    if n <= k:
        raise MetricInputError(f"{name}: k={k} needs more than k samples (k-th nearest other sample), got {n}")


def precision_recall(real, fake, k: int = 3) -> dict:
    """Improved precision/recall (Kynkäänniemi et al. 2019, NeurIPS, Eqs. 1-2), Euclidean k-NN manifolds.

    f(φ, Φ) = 1 iff ‖φ − φ'‖ <= ‖φ' − NN_k(φ')‖ for some φ' ∈ Φ (inequality `<=`; NN_k is
    the k-th nearest other point of Φ). precision = mean_fake f(fake, real);
    recall = mean_real f(real, fake).
    """
    x, y = _pair(real, fake, "real", "fake")
    _check_k(k, x.shape[0], "real")
    _check_k(k, y.shape[0], "fake")
    fake_in_real, _ = _ball_hits(y, x, _kth_radii(x, k))
    real_in_fake, _ = _ball_hits(x, y, _kth_radii(y, k))
    return {
        "precision": float((fake_in_real > 0).double().mean()),
        "recall": float((real_in_fake > 0).double().mean()),
        "k": k,
        "n_real": int(x.shape[0]),
        "n_fake": int(y.shape[0]),
    }


def density_coverage(real, fake, k: int = 5) -> dict:
    """Density and coverage (Naeem et al. 2020, ICML, "Reliable fidelity and diversity metrics"), balls around the *real* samples only.

    density = 1/(kM) Σ_j Σ_i 1[Y_j ∈ B(X_i, NND_k(X_i))];
    coverage = 1/N Σ_i 1[∃ j: Y_j ∈ B(X_i, NND_k(X_i))], with X real (N), Y fake (M).
    Ball membership uses `<=` like `precision_recall` (the prdc package uses `<`; they
    differ only on exact ties).
    """
    x, y = _pair(real, fake, "real", "fake")
    _check_k(k, x.shape[0], "real")
    counts, covered = _ball_hits(y, x, _kth_radii(x, k))
    return {
        "density": float(counts.sum()) / (k * y.shape[0]),
        "coverage": float(covered.double().mean()),
        "k": k,
        "n_real": int(x.shape[0]),
        "n_fake": int(y.shape[0]),
    }


# --------------------------------------------------------------------------- diversity and copying


def cluster_diversity(to_train: torch.Tensor, pairwise, max_per_cluster: int | None, seed: int) -> dict:
    """CDC's protocol core, shared by every distance: each sample joins its nearest shot (rows of
    `to_train`, [samples, shots]); per cluster k, the mean of pairwise(members)[i<j] over at most
    `max_per_cluster` random members; clusters with < 2 members give None. The caller names the distance."""
    nn_dist, assign = to_train.min(dim=1)
    n_clusters = to_train.shape[1]
    gen = torch.Generator().manual_seed(seed)
    per_cluster: list[float | None] = []
    sizes: list[int] = []
    for c in range(n_clusters):
        members = torch.nonzero(assign == c).flatten()
        sizes.append(int(members.numel()))
        if members.numel() < 2:
            per_cluster.append(None)
            continue
        if max_per_cluster is not None and members.numel() > max_per_cluster:
            members = members[torch.randperm(members.numel(), generator=gen)[:max_per_cluster].to(members.device)]
        dm = pairwise(members)
        iu = torch.triu_indices(dm.shape[0], dm.shape[0], offset=1, device=dm.device)
        per_cluster.append(float(dm[iu[0], iu[1]].mean()))
    used = [v for v in per_cluster if v is not None]
    return {
        "value": float(np.mean(used)) if used else float("nan"),
        "std": float(np.std(used)) if used else float("nan"),
        "per_cluster": per_cluster,
        "cluster_sizes": sizes,
        "n_clusters_used": len(used),
        "max_per_cluster": max_per_cluster,
        "nearest_shot": assign.tolist(),
        "nn_distance": nn_dist.tolist(),
    }


def intra_cluster_diversity(
    samples_feats,
    train_feats,
    distance: str = "cosine",
    *,
    space: str,
    max_per_cluster: int | None = 50,
    seed: int = 0,
) -> dict:
    """Intra-cluster diversity: the protocol of CDC's intra-LPIPS (Ojha et al. 2021, CVPR).

    Each sample joins its nearest training shot's cluster C_k (same distance); per cluster,
    d_k = mean over pairs i<j of d(x_i, x_j) on at most `max_per_cluster` random members;
    value = mean_k d_k over clusters with >= 2 members (others skipped; NaN if none).
    `space` names the feature space (e.g. "inception-pool3"); it is only recorded, in
    `distance_name`: this is LPIPS only if the caller's features make it so.
    """
    x, t = _pair(samples_feats, train_feats, "samples_feats", "train_feats")
    if distance not in ("cosine", "l2"):
        raise MetricInputError(f"distance must be 'cosine' or 'l2', got {distance!r}")
    if not isinstance(space, str) or not space.strip():
        raise MetricInputError("intra_cluster_diversity: `space` must name the feature space, e.g. 'inception-pool3'")
    if max_per_cluster is not None and max_per_cluster < 2:
        raise MetricInputError(f"max_per_cluster must be >= 2 or None, got {max_per_cluster}")
    result = cluster_diversity(_dist(x, t, distance), lambda m: _dist(x[m], x[m], distance), max_per_cluster, seed)
    return {**result, "distance": distance, "space": space, "distance_name": f"{distance} distance on {space} features"}


def memorisation(samples_feats, train_feats, ratio: float = 1 / 3, reference=None) -> dict:
    """Copy detection by the NN distance-ratio test (Yoon et al. 2023; Gu et al. 2025, TMLR).

    Sample x is a copy of shot NN₁(x) iff d(x, NN₁) < ratio · d(x, NN₂), Euclidean, NN over
    distinct training shots (duplicate shots count once; NN₂ is never a duplicate of NN₁).
    With a single distinct shot the test is undefined; the rule used is reported in "rule":
    - "nn_ratio": the test above (>= 2 distinct shots);
    - "single_shot_vs_reference": d(x, NN₂) replaced by the distance to the nearest row of
      `reference` (e.g. held-out or source-model features);
    - "single_shot_vs_median": d(x, NN₂) replaced by the median distance of all samples to
      the shot, i.e. flag x if it is `ratio` times closer than a typical sample. It cannot
      see a generator that copies the shot in more than half of its samples: pass
      `reference`, and check `intra_cluster_diversity`.

    This is the feature-space check only. `genadapt evaluate` decides copies in pixel space
    (`genadapt.eval.copies.detect_copies`: mirrored, shifted, resized, re-encoded shots) and reports
    this test beside it, uncounted: on the pocket eval encoder, distinct but similar-looking images
    (two tricolour flags) are as close as a shot and its JPEG re-encoding.
    """
    x, t = _pair(samples_feats, train_feats, "samples_feats", "train_feats")
    if not 0 < ratio <= 1:
        raise MetricInputError(f"memorisation: ratio must be in (0, 1], got {ratio}")
    d = torch.cdist(x, t)
    dup = _duplicates(t)
    d1, nn1 = d.min(dim=1)
    distinct_shots = int(torch.unique(dup.int().argmax(dim=1)).numel())
    if distinct_shots >= 2:
        rule = "nn_ratio"
        d2 = d.masked_fill(dup[nn1], float("inf")).min(dim=1).values
    elif reference is not None:
        rule = "single_shot_vs_reference"
        _, r = _pair(train_feats, reference, "train_feats", "reference")
        d2 = torch.cdist(x, r.to(x.device)).min(dim=1).values
    else:
        rule = "single_shot_vs_median"
        d2 = torch.full_like(d1, float(d1.median()))
    flagged = torch.nonzero(d1 < ratio * d2).flatten()
    return {
        "rule": rule,
        "ratio": ratio,
        "copy_rate": float(flagged.numel()) / x.shape[0],
        "flagged": flagged.tolist(),
        "copied_shot": nn1[flagged].tolist(),
        "nearest_shot": nn1.tolist(),
        "d_nearest": d1.tolist(),
        "d_second": d2.tolist(),
        "n_samples": int(x.shape[0]),
        "n_distinct_shots": distinct_shots,
    }


def authenticity(real_train, fake) -> dict:
    """Authenticity (Alaa et al. 2022, ICML, "How Faithful is your Synthetic Data?").

    With r* = argmin_r d(g, r) over the training set, g is unauthentic iff
    d(g, r*) < d(r*, NN(r*)), NN(r*) the nearest *other distinct* training sample;
    authenticity = fraction of authentic fakes. Euclidean, in the caller's feature space
    (the paper evaluates in a learned one-class embedding).
    """
    t, y = _pair(real_train, fake, "real_train", "fake", 2, 1)
    dup = _duplicates(t)
    if bool(dup.all()):
        raise MetricInputError("authenticity: real_train needs at least 2 distinct samples")
    train_nn = torch.cdist(t, t).masked_fill(dup, float("inf")).min(dim=1).values
    d_fake, nearest = torch.cdist(y, t).min(dim=1)
    unauthentic = d_fake < train_nn[nearest]
    flagged = torch.nonzero(unauthentic).flatten()
    return {
        "authenticity": 1.0 - float(unauthentic.double().mean()),
        "unauthentic": flagged.tolist(),
        "nearest_train": nearest.tolist(),
        "d_fake_train": d_fake.tolist(),
        "d_train_nn": train_nn[nearest].tolist(),
        "n_fake": int(y.shape[0]),
    }
