"""Literal-copy detection: is a generated sample one of the training shots, re-encoded or nudged?

The eval encoder's feature space cannot answer this on its own: it maps distinct but similar images
(two tricolour flags) as close together as a shot and its JPEG re-encoding, so its ratio test both
misses copies and flags fresh samples. This module compares pixels, after undoing the small edits a
copy survives, and calibrates its threshold on the shots themselves.

Distance D(x, y) of a sample x to a shot y:

1. Both images are resized to 32 x 32 (bilinear, antialiased), converted to JPEG's YCbCr (ITU-T T.871)
   with the two chroma channels weighted 0.5 (JPEG keeps chroma at half resolution, so most of its
   error is there), and low-passed with a Gaussian (sigma = 1 px). The low-pass is what makes the
   distance blind to JPEG's 8 x 8 block noise and to resampling.
2. Alignment: y is mirrored or not, zoomed by 0.9 ... 1.1 (9 steps), moved by half pixels and then by
   -3 ... +3 whole pixels (bilinear, border replicated); the central 26 x 26 of x is matched against
   every one of these 2 x 9 x 4 x 49 versions of y and the least-squares one is kept (one convolution).
3. D = the root of the largest 5 x 5-window mean of the squared difference (summed over channels) at
   that alignment. A copy matches everywhere; a different image that shares a layout (Vietnam's flag
   and Kyrgyzstan's: a yellow emblem on red) still differs somewhere, which a global average would
   dilute. Units: pixel values in [0, 1]. Measured on the built-in domains: D <= 0.045 for JPEG q85-92
   copies, 0 for mirrored and whole-pixel-shifted ones, <= 0.065 for +-10 % zooms of 64 px images;
   held-out images of the same domain are mostly >= 0.08 from every shot.

Rule: x copies its nearest shot iff D(x, nearest shot) < threshold, where
threshold = max(FRACTION x min over distinct shots i != j of D(shot_i, shot_j), FLOOR): a copy is far
closer to its shot than any two shots are to each other, and how close "any two shots" are is measured
on each dataset. FRACTION = 0.43 was chosen on 11 built-in settings (OpenMoji flags with 4 shot seeds,
dark-skin, source with 10 and 30 shots, flags at 64 px, digits): every JPEG (q85, q92), mirrored,
1-2 px shifted and +-10 % resized copy lay below 0.38 x the smallest inter-shot distance, and no more
than 4 of 200 held-out images of the same domain (2 %) lay below 0.49 x it; 0.43 sits between. FLOOR
keeps copies detectable when two shots are near-copies of each other (the flags of Ireland and
Côte d'Ivoire are mirror images). Repeated (pixel-identical) shots count once. With a single distinct
shot there is no inter-shot distance: the nearest `reference` image (held out, same domain) stands in
for the other shot, or, without one, DEFAULT_THRESHOLD is used; `calibration["method"]` says which.

What it flags by design: held-out images that *are* near-copies of a shot at 32 px (a mirror-image
flag, the same emoji in another skin tone). What it misses: copies with larger crops, rotations or
colour changes; those are the feature-space check's job (`genadapt.eval.metrics.memorisation`), which
`memorisation_audit` runs alongside and reports, but does not count (see its docstring). Exact for up to
MAX_CANDIDATES shots; with more, each sample is aligned only with the shots nearest on thumbnails.

Background: pixel-space nearest-neighbour copy tests with a distance-ratio or threshold rule follow
Yoon et al. 2023 and Gu et al. 2025 (TMLR, "On memorization in diffusion models"); Somepalli et al.
2023 (CVPR, "Diffusion art or digital forgery?") and Carlini et al. 2023 (USENIX, "Extracting training
data from diffusion models") show memorised samples are near-pixel copies of training images, and
Carlini et al. use a patch-wise maximum (their tiled l2) for the same reason as step 3.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genadapt.errors import UserError

__all__ = ["detect_copies", "memorisation_audit", "aligned_distances", "calibrate", "prepare", "FRACTION", "FLOOR", "DEFAULT_THRESHOLD"]

SIZE = 32  # working resolution: "a few pixels" at 32-256 px is at most 3 px here
SIGMA = 1.0  # Gaussian low-pass, working pixels
CHROMA_WEIGHT = 0.5
MAX_SHIFT = 3  # whole working pixels, each way
ZOOMS = tuple(1 + np.arange(-4, 5) / 40)  # 0.9 ... 1.1 in 9 steps; 1.0 exactly
HALF_SHIFTS = (0.0, 0.5)  # sub-pixel offsets; whole-pixel ones come from the convolution
WINDOW = 5
FRACTION = 0.43
FLOOR = 0.05  # above every JPEG q>=85 copy measured at 32 px (<= 0.045)
DEFAULT_THRESHOLD = 0.08  # the median calibrated threshold on the built-in domains
MAX_CANDIDATES = 16  # shots aligned per sample; more shots are pre-ranked on 8 x 8 thumbnails
_ELEMENTS = 1 << 24  # floats per working block (64 MiB)

# JPEG/JFIF RGB -> YCbCr (ITU-T T.871), chroma down-weighted
_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC = _YCC * torch.tensor([1.0, CHROMA_WEIGHT, CHROMA_WEIGHT])[:, None]


class CopyInputError(UserError, ValueError):
    """Images that the copy detector cannot compare."""


def prepare(images) -> torch.Tensor:
    """[N, 3, SIZE, SIZE] float32: resized, weighted YCbCr, low-passed (step 1 of the module docstring).

    `images`: an ImageSet, uint8 N x H x W x 3, or a float N x 3 x H x W tensor in [-1, 1]."""
    from genadapt.eval.features import _as_images

    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch.from_numpy warns on read-only arrays (e.g. np.asarray of a PIL image)
    try:
        t = _as_images(images)
    except UserError as error:
        raise CopyInputError(str(error)) from None
    if len(t) == 0:
        raise CopyInputError("no images to compare")
    t = t.detach().to("cpu", torch.float32).add(1.0).div(2.0).clamp(0.0, 1.0)  # generators can overshoot [-1, 1]
    if t.shape[-2:] != (SIZE, SIZE):
        t = F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    t = torch.einsum("dc,nchw->ndhw", _YCC, t)
    radius = int(np.ceil(3 * SIGMA))
    kernel = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * SIGMA**2))
    kernel = kernel / kernel.sum()
    t = F.pad(t, (radius,) * 4, mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(t, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


_PARAMS = [(f, float(z), tx, ty) for f in (False, True) for z in ZOOMS for ty in HALF_SHIFTS for tx in HALF_SHIFTS]
# affine_grid maps output to input coordinates ([-1, 1] spans SIZE pixels): mirror, 1/zoom, +half pixels
_THETA = torch.tensor([[[(-1.0 if f else 1.0) / z, 0.0, 2 * tx / SIZE], [0.0, 1.0 / z, 2 * ty / SIZE]] for f, z, tx, ty in _PARAMS])


def _warp(shots: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """shots[q] read through variant which[q] (mirrored, zoomed, moved by half pixels; border replicated)."""
    grid = F.affine_grid(_THETA[which], [len(which), 3, SIZE, SIZE], align_corners=False)
    return F.grid_sample(shots, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _variants(shots: torch.Tensor) -> torch.Tensor:
    """[M, V, 3, S, S]: every variant of every shot."""
    v = len(_PARAMS)
    which = torch.arange(v).repeat(len(shots))
    return _warp(shots.repeat_interleave(v, 0), which).reshape(len(shots), v, 3, SIZE, SIZE)


def _candidates(a: torch.Tensor, b: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """[N, M] bool: the shots each sample is aligned against (all, or the MAX_CANDIDATES nearest on
    mirrored/plain 8 x 8 thumbnails)."""
    n, m = a.shape[0], b.shape[0]
    allowed = torch.ones(n, m, dtype=torch.bool) if exclude is None else ~exclude
    if m <= MAX_CANDIDATES:
        return allowed
    ta, tb = F.avg_pool2d(a, 4).flatten(1), F.avg_pool2d(b, 4)
    coarse = torch.minimum(torch.cdist(ta, tb.flatten(1)), torch.cdist(ta, tb.flip(-1).flatten(1)))
    coarse = coarse.masked_fill(~allowed, float("inf"))
    pick = torch.zeros(n, m, dtype=torch.bool)
    pick.scatter_(1, coarse.topk(MAX_CANDIDATES, dim=1, largest=False).indices, True)
    return pick & allowed


def aligned_distances(samples, shots, exclude=None) -> dict:
    """D(sample_i, shot_j) of the module docstring, with the alignment that achieved it.

    `samples`, `shots`: anything `prepare` takes. Returns {"distance": [N, M] (inf where not computed:
    pairs in `exclude`, an [N, M] bool, and shots outside a sample's MAX_CANDIDATES), "mirrored",
    "zoom", "shift" ([N, M, 2]: x, y in working pixels, how the shot was moved to give the sample)}."""
    exclude = None if exclude is None else torch.as_tensor(exclude, dtype=torch.bool)
    return _aligned(prepare(samples), prepare(shots), exclude)


def _aligned(a: torch.Tensor, b: torch.Tensor, exclude: torch.Tensor | None) -> dict:
    n, m = a.shape[0], b.shape[0]
    k = 2 * MAX_SHIFT + 1
    h = SIZE - 2 * MAX_SHIFT
    v = len(_PARAMS)
    crops = a[..., MAX_SHIFT : SIZE - MAX_SHIFT, MAX_SHIFT : SIZE - MAX_SHIFT].contiguous()
    crop_energy = crops.pow(2).sum((1, 2, 3))
    todo = _candidates(a, b, exclude)
    best_arg = torch.zeros(n, m, dtype=torch.long)
    # Least-squares alignment: |x - T y|^2 = |x|^2 + |T y|^2 - 2 <x, T y>, the cross term for every
    # whole-pixel shift of every variant at once: a convolution of the shot variants by the sample crops.
    step = max(1, min(_ELEMENTS // (v * k * k * n), _ELEMENTS // (v * 3 * SIZE * SIZE)))
    for j0 in range(0, m, step):
        j1 = min(m, j0 + step)
        rows = torch.nonzero(todo[:, j0:j1].any(1)).flatten()
        if rows.numel() == 0:
            continue
        variants = _variants(b[j0:j1]).reshape(-1, 3, SIZE, SIZE)
        window_energy = F.conv2d(variants.pow(2), torch.ones(1, 3, h, h)).reshape(j1 - j0, v, 1, k * k)
        cross = F.conv2d(variants, crops[rows]).reshape(j1 - j0, v, rows.numel(), k * k)
        sq = crop_energy[rows][None, None, :, None] + window_energy - 2 * cross
        best_arg[rows, j0:j1] = sq.permute(2, 0, 1, 3).reshape(rows.numel(), j1 - j0, v * k * k).argmin(-1)
    which, offset = best_arg // (k * k), best_arg % (k * k)
    dy, dx = offset // k, offset % k
    # The worst-window distance at that alignment, for the pairs that were aligned.
    distance = torch.full((n, m), float("inf"))
    pairs = torch.nonzero(todo)
    span = torch.arange(h)
    chunk = max(1, _ELEMENTS // (4 * 3 * SIZE * SIZE))
    for s in range(0, len(pairs), chunk):
        i, j = pairs[s : s + chunk].unbind(1)
        shot = _warp(b[j], which[i, j])  # [Q, 3, S, S]
        window = shot[
            torch.arange(len(i))[:, None, None, None],
            torch.arange(3)[None, :, None, None],
            (dy[i, j][:, None] + span)[:, None, :, None],
            (dx[i, j][:, None] + span)[:, None, None, :],
        ]
        error = (window - crops[i]).pow(2).sum(1, keepdim=True)
        distance[i, j] = F.avg_pool2d(error, WINDOW, stride=1).amax((1, 2, 3)).sqrt()
    table = torch.tensor([list(p) for p in _PARAMS], dtype=torch.float64)[which]  # [N, M, 4]
    # The sample's crop matched the variant's window at offset (dy, dx) - MAX_SHIFT, and the variant is
    # the shot read at +half pixels: the sample is the shot moved by minus their sum.
    shift = -(torch.stack([dx - MAX_SHIFT, dy - MAX_SHIFT], -1).double() + table[..., 2:4])
    return {"distance": distance, "mirrored": table[..., 0].bool(), "zoom": table[..., 1], "shift": shift}


def _first_of_each(t: torch.Tensor) -> torch.Tensor:
    """[M] bool: True for the first of every group of identical prepared images (repeats count once)."""
    seen: set[bytes] = set()
    keep = []
    for row in t.numpy():
        key = row.tobytes()
        keep.append(key not in seen)
        seen.add(key)
    return torch.tensor(keep)


def calibrate(shots, reference=None, fraction: float = FRACTION, floor: float = FLOOR) -> dict:
    """The threshold of the module docstring, from the shots (and `reference` if there is only one distinct shot).

    {"threshold", "method": "inter_shot" | "reference" | "default", "base" (the distance the fraction
    multiplies; None for "default"), "fraction", "floor", "floored" (the floor set the threshold),
    "n_distinct_shots", "inter_shot_nearest" (each distinct shot's distance to its nearest other shot)}."""
    return _calibrate(prepare(shots), reference, fraction, floor)


def _calibrate(b: torch.Tensor, reference, fraction: float, floor: float) -> dict:
    distinct = b[_first_of_each(b)]
    out = {"fraction": fraction, "floor": floor, "n_distinct_shots": len(distinct), "inter_shot_nearest": []}
    if len(distinct) >= 2:
        d = _aligned(distinct, distinct, torch.eye(len(distinct), dtype=torch.bool))["distance"]
        nearest = d.min(1).values
        out["inter_shot_nearest"] = nearest.tolist()
        out.update(method="inter_shot", base=float(nearest.min()))
    elif reference is not None:
        d = _aligned(prepare(reference), distinct, None)["distance"][:, 0]
        d = d[d > 1e-4]  # a reference image identical to the shot says nothing about distinct images
        if d.numel() == 0:
            raise CopyInputError("calibration: every reference image is identical to the single shot")
        out.update(method="reference", base=float(d.min()))
    else:
        out.update(method="default", base=None, threshold=DEFAULT_THRESHOLD, floored=False)
        return out
    out["threshold"] = max(fraction * out["base"], floor)
    out["floored"] = fraction * out["base"] < floor
    return out


def detect_copies(samples, shots, reference=None, fraction: float = FRACTION, floor: float = FLOOR, threshold: float | None = None) -> dict:
    """Which samples are literal copies of a shot (re-encoded, mirrored, shifted, resized); see the module docstring.

    `samples`, `shots`, `reference`: ImageSets, uint8 N x H x W x 3 arrays or float N x 3 x H x W tensors
    in [-1, 1], at any resolutions. `threshold` overrides the calibration. Returns {"rule", "threshold",
    "calibration" (`calibrate`), "copy_rate", "flagged", "copied_shot", "nearest_shot", "distance"
    (each sample's D to its nearest shot), "mirrored", "zoom", "shift" (per flagged sample; shift in
    working pixels of SIZE), "counts" (flagged: total, mirrored, shifted, zoomed), "closest_non_copy",
    "n_samples"}."""
    if not 0 < fraction < 1:
        raise CopyInputError(f"fraction must be in (0, 1), got {fraction}")
    a, b = prepare(samples), prepare(shots)
    calibration = _calibrate(b, reference, fraction, floor)
    if threshold is not None:
        if not threshold > 0:
            raise CopyInputError(f"threshold must be > 0, got {threshold}")
        calibration = {**calibration, "method": "given", "threshold": float(threshold)}
    tau = calibration["threshold"]
    aligned = _aligned(a, b, None)
    d, nearest = aligned["distance"].min(1)
    rows = torch.arange(len(a))
    mirrored, zoom, shift = aligned["mirrored"][rows, nearest], aligned["zoom"][rows, nearest], aligned["shift"][rows, nearest]
    copy = d < tau
    flagged = torch.nonzero(copy).flatten()
    moved = shift[flagged].abs().amax(-1) > 0.25 if flagged.numel() else torch.zeros(0, dtype=torch.bool)
    zoomed = (zoom[flagged] - 1).abs() > 1e-6
    return {
        "rule": "aligned_pixel",
        "threshold": tau,
        "calibration": calibration,
        "copy_rate": float(flagged.numel()) / len(a),
        "flagged": flagged.tolist(),
        "copied_shot": nearest[flagged].tolist(),
        "nearest_shot": nearest.tolist(),
        "distance": d.tolist(),
        "mirrored": mirrored[flagged].tolist(),
        "zoom": zoom[flagged].tolist(),
        "shift": shift[flagged].tolist(),
        "counts": {"flagged": int(flagged.numel()), "mirrored": int(mirrored[flagged].sum()), "shifted": int(moved.sum()), "zoomed": int(zoomed.sum())},
        "closest_non_copy": float(d[~copy].min()) if bool((~copy).any()) else None,
        "n_samples": len(a),
    }


def memorisation_audit(samples, shots, samples_feats, shots_feats, reference=None, reference_feats=None) -> dict:
    """Both copy checks on one sample set: `detect_copies` in pixel space decides; the feature-space
    NN-ratio test (`metrics.memorisation`, ratio 1/3) is run and reported beside it, not counted.

    Why not counted: on the pocket eval encoder, the ratio test flagged 2.5 % of 200 held-out flags and
    emoji as copies of 10 flag shots while catching 48-72 % of their JPEG, mirrored, shifted and zoomed
    copies; counting its hits too would break the pixel check's false-positive bound (2 %). Its hits
    without a pixel match (`checks["feature_ratio"]["only"]`) are worth a look: they can be copies under
    edits the pixel alignment does not undo (crops, colour changes), or just look-alikes.
    """
    from genadapt.eval import metrics

    pixel = detect_copies(samples, shots, reference=reference)
    feature = metrics.memorisation(samples_feats, shots_feats, reference=reference_feats if pixel["calibration"]["n_distinct_shots"] < 2 else None)
    by_pixel, by_feature = set(pixel["flagged"]), set(feature["flagged"])
    return {
        **pixel,
        "checks": {
            "aligned_pixel": {**pixel["counts"], "counted": True},
            "feature_ratio": {
                "flagged": len(by_feature),
                "also_pixel": len(by_feature & by_pixel),
                "only": sorted(by_feature - by_pixel),
                "rule": feature["rule"],
                "ratio": feature["ratio"],
                "counted": False,
            },
        },
    }
