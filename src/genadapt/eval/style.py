"""`style`: a feature space that sees style (palette, line weight, sharpness, texture) as well as content.

The pocket eval encoder (`genadapt/zoo/eval_encoder.py`) was trained on one emoji style with
brightness / contrast / saturation jitter, so its pooled features are largely blind to what few-shot
targets often differ in. `StyleExtractor` keeps those pooled features as its *content* block and adds
three *style* blocks, all computed on the image resized to the encoder's 32 px (bilinear, antialiased
when shrinking, exactly as the encoder resizes; so at 64 px, detail finer than 2 px is seen only through
that downsample, and a 64 px image and its 32 px version give nearly the same features):

    block    dims  what
    content   256  the eval encoder's pooled features (its `forward`), unchanged
    conv      192  per-channel mean and std of the encoder's early feature maps: stage 1 (32 ch, 32 px)
                   and stage 2 (64 ch, 16 px). These are AdaIN's style statistics (Huang & Belongie
                   2017); they hold the diagonal of Gatys et al.'s (2016) Gram matrices (E F_c² =
                   mean² + var) without the cross-channel terms, at a fraction of the size (Grams of
                   32 and 64 channels have 2,608 distinct entries). Early layers still respond to
                   colour and stroke: the invariance the encoder learnt sits in its late layers
    colour     64  a soft joint RGB histogram, 4 levels per channel (triangular bin weights, so a value
                   between two levels splits its mass: no threshold jumps), as sqrt of the pixel
                   fractions (Hellinger embedding: Euclidean distance between rows is the Hellinger
                   distance, and the white background bin no longer swamps the rest)
    edges      20  sharpness, texture and line weight, on luma Y: a soft 8-bin histogram of the Sobel
                   gradient magnitude (sqrt fractions); log mean |band| of a 3-level Laplacian pyramid
                   (32, 16, 8 px) for Y and two opponent-colour channels (fine texture, blur); and a
                   grey-level granulometry of the darkness 1 − Y (Serra 1982): mean darkness and the
                   fractions of it that survive a morphological opening with 2x2 and 3x3 squares, i.e.
                   how much of the ink sits in strokes at least 2 or 3 px wide

Weighting. Each raw dimension j is standardised with a fixed mean and std measured once on a
calibration set (every 4th image of `builtin:openmoji/source` at 32 px, 784 icons of the encoder's
own training domain; never a target domain), std floored at 0.1 x the block's median std so a dimension that is constant on the
calibration set (an unused colour bin) cannot explode, then softly limited, z -> c·asinh(z / c) with
c = 4 (linear within about ±3 std, logarithmic beyond, so one saturated colour bin in a shifted set
cannot dominate a cubic KID kernel). Block b (d_b dims) is then multiplied by sqrt(w_b · D / d_b), D the
total dimension and w_b its weight (summing to 1): on calibration data every block then holds the
fraction w_b of the expected squared norm, whatever its dimension, and E‖f‖²/D ≈ 1, so KID's kernel
(xᵀy / D + 1)³ sees each block in proportion to its weight. The default weights give content half
and split the other half equally over the three style blocks (1/2, 1/6, 1/6, 1/6): content and style
count alike, and no style block outweighs another because it has more dimensions. Equal quarters left
content too little: in a 3-split trial of the benchmark (`benchmarks/style_shift.py`) the 5-NN group
accuracy fell from pocket's 0.78 to 0.68 and the KID between OpenMoji groups, relative to its noise, to
0.47x pocket's. With the default weights the full benchmark gives 0.72 (1-NN: 0.735 vs pocket's 0.719)
and 0.59x, while every style shift stays far from the original (docs/style-aware-evaluation.md).

The statistics are rounded to 4 significant digits before use, so tiny floating-point differences
between machines do not change the extractor id. The id, `genadapt-style-v1@<12 hex>`, is a digest of
the encoder's id and weights, the calibration statistics, the weights and the code of every helper
below; the feature cache keys on all of those as well (see `features.extractor_cache_key`).

`STYLE_SHIFTS` are the validation shifts (uint8 NHWC -> uint8 NHWC, deterministic, scaled with the
resolution): palette, line weight, blur, texture, re-rendering at half size.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VERSION = "genadapt-style-v1"
CALIBRATION = "builtin:openmoji/source"
CALIBRATION_RESOLUTION = 32
CALIBRATION_STRIDE = 4  # every 4th image (784 of 3,136): std to ~2.5 %, a quarter of the one-off cost
BLOCKS = ("content", "conv", "colour", "edges")
DEFAULT_WEIGHTS = (0.5, 1 / 6, 1 / 6, 1 / 6)  # content, conv, colour, edges: content and style half each
STD_FLOOR = 0.1  # x the block's median std
SOFT_LIMIT = 4.0  # c in z -> c asinh(z / c)
CONV_TAPS = (1, 3)  # indices in EvalEncoder.body: end of stage 1 (32 px) and of stage 2 (16 px)
COLOUR_LEVELS = 4
GRADIENT_BINS = 8
PYRAMID_LEVELS = 3
OPENINGS = (2, 3)


# --------------------------------------------------------------------------- statistics (NCHW in [0, 1])


def _luma(unit: torch.Tensor) -> torch.Tensor:
    return 0.299 * unit[:, 0:1] + 0.587 * unit[:, 1:2] + 0.114 * unit[:, 2:3]


def _soft_bins(values: torch.Tensor, levels: int, high: float = 1.0) -> torch.Tensor:
    """[..., levels] triangular weights of `values` against `levels` equally spaced centres on [0, high]."""
    centres = torch.linspace(0.0, high, levels, dtype=values.dtype, device=values.device)
    width = high / (levels - 1)
    return (1.0 - (values.unsqueeze(-1).clamp(0.0, high) - centres).abs() / width).clamp_min(0.0)


def colour_histogram(unit: torch.Tensor, levels: int = COLOUR_LEVELS) -> torch.Tensor:
    """[N, levels³]: sqrt of the soft joint RGB histogram (pixel fractions; rows sum to 1 before the sqrt)."""
    n = len(unit)
    r, g, b = (_soft_bins(unit[:, c].reshape(n, -1), levels) for c in range(3))  # [N, P, L] each
    joint = torch.einsum("npi,npj,npk->nijk", r, g, b).reshape(n, -1) / r.shape[1]
    return joint.clamp_min(0.0).sqrt()


def _sobel_magnitude(y: torch.Tensor) -> torch.Tensor:
    """|∇Y| with the 3x3 Sobel kernels, scaled so a full black-to-white step gives 1; replicate padding."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=y.dtype, device=y.device) / 4.0
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)
    grad = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    return grad.pow(2).sum(1, keepdim=True).add(1e-12).sqrt()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Binomial 5-tap low-pass (the Burt & Adelson 1983 pyramid kernel), per channel, replicate padding."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16.0
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, taps.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def _opening(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level opening (erosion then dilation) with a flat size x size square; 'same' output size."""
    low, high = (size - 1) // 2, size // 2  # even sizes: the erosion's window sits up-left, the dilation's down-right
    eroded = -F.max_pool2d(F.pad(-x, (low, high, low, high), mode="replicate"), size, stride=1)
    return F.max_pool2d(F.pad(eroded, (high, low, high, low), mode="replicate"), size, stride=1)


def edge_statistics(unit: torch.Tensor) -> torch.Tensor:
    """[N, 20]: gradient-magnitude histogram (8), Laplacian-pyramid band energies (3 levels x 3 channels),
    darkness granulometry (mean darkness, fraction surviving 2x2 and 3x3 openings)."""
    n = len(unit)
    y = _luma(unit)
    magnitude = _sobel_magnitude(y).reshape(n, -1)
    gradients = _soft_bins(magnitude, GRADIENT_BINS).mean(1).sqrt()

    r, g, b = unit[:, 0:1], unit[:, 1:2], unit[:, 2:3]
    opponent = torch.cat([y, r - g, (r + g) / 2 - b], 1)
    bands, level = [], opponent
    for _ in range(PYRAMID_LEVELS):
        low = _blur(level)
        bands.append((level - low).abs().mean(dim=(2, 3)).add(1e-4).log())
        level = F.avg_pool2d(low, 2)
    bands = torch.cat(bands, 1)

    darkness = 1.0 - y
    mass = darkness.mean(dim=(1, 2, 3))
    survive = [_opening(darkness, size).mean(dim=(1, 2, 3)) / mass.clamp_min(1e-4) for size in OPENINGS]
    granulometry = torch.stack([mass, *survive], 1)
    return torch.cat([gradients, bands, granulometry], 1)


def conv_statistics(maps: list[torch.Tensor]) -> torch.Tensor:
    """[N, 2 x channels]: per-channel spatial mean and std of each feature map."""
    parts = []
    for fmap in maps:
        flat = fmap.flatten(2)
        parts += [flat.mean(2), flat.var(2, unbiased=False).add(1e-8).sqrt()]
    return torch.cat(parts, 1)


HELPERS = (_luma, _soft_bins, colour_histogram, _sobel_magnitude, _blur, _opening, edge_statistics, conv_statistics)


# --------------------------------------------------------------------------- the modules


class StyleStatistics(nn.Module):
    """The raw blocks, concatenated in BLOCKS order: NCHW in [-1, 1] (any size) -> [N, 532], unstandardised.

    Used for calibration; `StyleExtractor` standardises and weights its output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.version = VERSION
        self.helpers = HELPERS  # their code digests enter the cache key (see features._describe)
        self.conv_taps = CONV_TAPS
        widths = tuple(encoder.widths)
        self.block_dims = (widths[-1], 2 * (widths[0] + widths[1]), COLOUR_LEVELS**3, GRADIENT_BINS + 3 * PYRAMID_LEVELS + 1 + len(OPENINGS))
        self.extractor_id = f"{VERSION}-raw+{encoder.extractor_id}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = self.encoder.resolution
        if images.shape[-2:] != (side, side):  # the encoder's own resizing, so the content block is its forward
            shrink = images.shape[-1] > side or images.shape[-2] > side
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=shrink)
        maps, x = [], images
        for index, layer in enumerate(self.encoder.body):
            x = layer(x)
            if index in self.conv_taps:
                maps.append(x)
        content = x.mean(dim=(2, 3))
        unit = images.add(1.0).div(2.0).clamp(0.0, 1.0)
        return torch.cat([content, conv_statistics(maps), colour_histogram(unit), edge_statistics(unit)], 1)


class StyleExtractor(nn.Module):
    """NCHW RGB in [-1, 1] -> [N, 532]: `StyleStatistics`, each dim standardised with fixed calibration
    statistics and softly limited, each block scaled to hold its weight's share (module docstring)."""

    def __init__(self, statistics: StyleStatistics, mean: torch.Tensor, std: torch.Tensor, weights=DEFAULT_WEIGHTS) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(BLOCKS) or min(weights) < 0 or not math.isclose(sum(weights), 1.0, abs_tol=1e-9):
            raise ValueError(f"weights {weights}: expected {len(BLOCKS)} non-negative numbers summing to 1 ({', '.join(BLOCKS)})")
        self.statistics = statistics
        self.weights = weights
        self.soft_limit = SOFT_LIMIT
        dims = statistics.block_dims
        total = sum(dims)
        scale = torch.cat([torch.full((d,), math.sqrt(w * total / d)) for w, d in zip(weights, dims)])
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())
        self.register_buffer("scale", scale)
        digest = hashlib.sha256(f"{VERSION}|{statistics.extractor_id}|{weights}|{SOFT_LIMIT}|".encode())
        from genadapt.eval.features import _code_digest, tensors_sha256

        digest.update("|".join(_code_digest(f) for f in (*HELPERS, StyleStatistics.forward, StyleExtractor.forward)).encode())
        digest.update(tensors_sha256({"mean": self.mean, "std": self.std}).encode())
        digest.update(tensors_sha256(statistics.encoder.state_dict()).encode())
        self.extractor_id = f"{VERSION}@{digest.hexdigest()[:12]}"

    @property
    def block_slices(self) -> dict:
        out, start = {}, 0
        for name, d in zip(BLOCKS, self.statistics.block_dims):
            out[name] = slice(start, start + d)
            start += d
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = (self.statistics(images) - self.mean) / self.std
        return self.soft_limit * torch.asinh(z / self.soft_limit) * self.scale


def _round(values: torch.Tensor, digits: int = 4) -> torch.Tensor:
    """Round to `digits` significant digits (in float64), so float noise across machines keeps the id."""
    array = values.double().numpy()
    out = np.array([float(f"{v:.{digits - 1}e}") for v in array.tolist()])
    return torch.from_numpy(out).float()


def calibration_statistics(statistics: StyleStatistics, images) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per raw dimension over `images` (feature-cached), std floored per block and both rounded."""
    from genadapt.eval.features import cached_features

    raw = cached_features(statistics, images, progress=False).double()
    mean, std = raw.mean(0), raw.std(0, unbiased=False)
    start = 0
    for d in statistics.block_dims:
        block = std[start : start + d]
        std[start : start + d] = block.clamp_min(max(STD_FLOOR * float(block.median()), 1e-6))
        start += d
    return _round(mean), _round(std)


@functools.lru_cache(maxsize=4)
def _calibrated(encoder_id: str, encoder_digest: str) -> tuple[torch.Tensor, torch.Tensor]:
    from genadapt.data import load_dataset

    statistics = StyleStatistics(_pocket())
    images = load_dataset(CALIBRATION, resolution=CALIBRATION_RESOLUTION).pixels[::CALIBRATION_STRIDE]
    return calibration_statistics(statistics, np.ascontiguousarray(images))


def _pocket() -> nn.Module:
    from genadapt.eval.features import get_extractor

    return get_extractor("pocket")


def load_style_extractor(weights=DEFAULT_WEIGHTS) -> StyleExtractor:
    """The `style` extractor on the shipped pocket encoder, calibrated on every 4th `builtin:openmoji/source`
    icon at 32 px (once per process: ~3 s on one core; its raw features are cached on disk like any other
    feature set). `weights`: content, conv, colour, edges, summing to 1."""
    from genadapt.eval.features import tensors_sha256

    encoder = _pocket()
    mean, std = _calibrated(encoder.extractor_id, tensors_sha256(encoder.state_dict()))
    return StyleExtractor(StyleStatistics(encoder), mean.clone(), std.clone(), weights).eval()


# --------------------------------------------------------------------------- validation shifts (uint8 NHWC)


def _to_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).double().div(255.0)


def _to_pixels(unit: torch.Tensor) -> np.ndarray:
    return unit.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _scale(pixels: np.ndarray) -> int:
    return max(1, round(pixels.shape[1] / 32))


def shift_palette(pixels: np.ndarray, degrees: float = 120.0) -> np.ndarray:
    """Rotate the hue by `degrees` in YIQ: luma kept, so only the palette changes (greys, black, white stay)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    angle = math.radians(degrees)
    rotate = torch.tensor([[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    unit = _to_unit(pixels)
    return _to_pixels(torch.einsum("ij,njhw->nihw", matrix, unit))


def shift_line_weight(pixels: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Bolder dark strokes, by s px (s = resolution / 32): every pixel within a (s+1)-square window of a stroke
    pixel (luma < `threshold`: OpenMoji's black outlines) takes the darkest stroke colour in that window."""
    unit = _to_unit(pixels)
    size = _scale(pixels) + 1
    pad = ((size - 1) // 2, size // 2) * 2  # even windows reach one pixel further right / down
    dark = _luma(unit) < threshold
    grown = F.max_pool2d(F.pad(dark.double(), pad), size, stride=1) > 0
    strokes = torch.where(dark, unit, torch.ones_like(unit))  # only stroke pixels can spread
    darkest = -F.max_pool2d(F.pad(-strokes, pad, mode="replicate"), size, stride=1)
    return _to_pixels(torch.where(grown, darkest, unit))


def shift_blur(pixels: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur, sigma = `sigma` x resolution / 32 px, replicate padding."""
    s = sigma * pixels.shape[1] / 32
    radius = max(1, math.ceil(3 * s))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2 / (2 * s * s))
    taps = taps / taps.sum()
    unit = F.pad(_to_unit(pixels), (radius,) * 4, mode="replicate")
    unit = F.conv2d(unit, taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return _to_pixels(F.conv2d(unit, taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3))


def shift_texture(pixels: np.ndarray, strength: float = 0.15) -> np.ndarray:
    """A fixed diagonal stripe pattern (period 4 px x resolution / 32, one line in four darkened by `strength`),
    multiplied in, so it shows on the white background as on the glyph."""
    s = _scale(pixels)
    side = pixels.shape[1]
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    stripes = (((xx + yy) // s) % 4 == 0).double()
    return _to_pixels(_to_unit(pixels) * (1.0 - strength * stripes))


def shift_rerender(pixels: np.ndarray) -> np.ndarray:
    """Re-rendered at half the size: area-downsampled to side / 2, then nearest-upsampled back (pixel-art look)."""
    side = pixels.shape[1]
    small = F.interpolate(_to_unit(pixels), size=(side // 2, side // 2), mode="area")
    return _to_pixels(F.interpolate(small, size=(side, side), mode="nearest"))


STYLE_SHIFTS = {
    "palette": shift_palette,
    "line-weight": shift_line_weight,
    "blur": shift_blur,
    "texture": shift_texture,
    "rerender": shift_rerender,
}
