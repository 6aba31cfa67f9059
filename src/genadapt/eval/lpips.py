"""LPIPS (Zhang et al. 2018, CVPR, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") from weights the user already has on disk, and CDC's intra-cluster LPIPS.

Our own module definition, without torchvision or the `lpips` package, computing what
`lpips.LPIPS(net=..., version="0.1")` computes (lpips 0.1.4, richzhang/PerceptualSimilarity):

1. input NCHW RGB in [-1, 1], shifted and scaled per channel: (x - shift) / scale with
   shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450) (ImageNet statistics
   expressed in [-1, 1]; v0.1's "ScalingLayer");
2. the ImageNet backbone's conv stack, tapped after five ReLUs:
   vgg  (VGG16):   relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = features[3, 8, 15, 22, 29]; 64, 128, 256, 512, 512 channels;
   alex (AlexNet): relu1 .. relu5 = features[1, 4, 7, 9, 11]; 64, 192, 384, 256, 256 channels;
3. each tap unit-normalised over channels at every location: f / (sqrt(sum_c f^2) + 1e-10);
4. per tap, the squared difference of the two images' normalised features, weighted over
   channels by the learnt 1x1 conv `lin{l}` (no bias), averaged over space; summed over taps:
   d(x, y) = sum_l mean_hw sum_c w_lc (f_lchw(x) - f_lchw(y))^2.

`state_dict` keys are exactly the two files users have: torchvision's ImageNet weights
(`features.0.weight`, ... of `vgg16-397923af.pth` / `alexnet-owt-7be5be79.pth`; their
`classifier.*` entries are ignored) and the lpips package's linear heads `weights/v0.1/{vgg,alex}.pth`
(`lin0.model.1.weight` ... of shape [1, C, 1, 1]; index 0 of `model` is a Dropout in lpips, an
identity here: this module only evaluates). v0.0 heads (no scaling layer) are not supported. Files
are read with `torch.load(weights_only=True)` or as `.safetensors`; nothing is ever downloaded.

Resizing (our choice, documented): CDC's `feat_cluster.py` resizes every image to 256 x 256
(torchvision `Resize([256, 256])`, bilinear) before `lpips.LPIPS(net='vgg')`, whatever its native
size, so `size=256` is the default here (bilinear, align_corners=False, antialiased when shrinking).
`size=None` keeps the native size but upsamples images whose shorter side is under 64 px so that
it is 64 (the 64 x 64 patches LPIPS was calibrated on). LPIPS values depend on this size: compare
numbers only at equal `size`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genadapt.data.folder import file_sha256
from genadapt.errors import UserError
from genadapt.eval.metrics import cluster_diversity

__all__ = [
    "LPIPS",
    "load_lpips",
    "lpips_distance",
    "lpips_pairwise",
    "intra_cluster_lpips",
    "BACKBONE_URLS",
    "LINEAR_SOURCE",
]

# ImageNet statistics in [-1, 1] units (lpips' ScalingLayer, v0.1).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor
CDC_SIZE = 256  # CDC feat_cluster.py: transforms.Resize([256, 256])
MIN_NATIVE = 64  # size=None: shorter sides under this are upsampled to it

# torchvision `features` layout: (index, in, out, kernel, stride, padding) for convs, "R" ReLU, "M" max pool.
_VGG16 = [
    (0, 3, 64, 3, 1, 1), "R", (2, 64, 64, 3, 1, 1), "R", "M",
    (5, 64, 128, 3, 1, 1), "R", (7, 128, 128, 3, 1, 1), "R", "M",
    (10, 128, 256, 3, 1, 1), "R", (12, 256, 256, 3, 1, 1), "R", (14, 256, 256, 3, 1, 1), "R", "M",
    (17, 256, 512, 3, 1, 1), "R", (19, 512, 512, 3, 1, 1), "R", (21, 512, 512, 3, 1, 1), "R", "M",
    (24, 512, 512, 3, 1, 1), "R", (26, 512, 512, 3, 1, 1), "R", (28, 512, 512, 3, 1, 1), "R",
]  # features[30] (the last max pool) is never used by LPIPS
_ALEXNET = [
    (0, 3, 64, 11, 4, 2), "R", "M",
    (3, 64, 192, 5, 1, 2), "R", "M",
    (6, 192, 384, 3, 1, 1), "R",
    (8, 384, 256, 3, 1, 1), "R",
    (10, 256, 256, 3, 1, 1), "R",
]  # features[12] (max pool) unused

NETS = {
    "vgg": {"layers": _VGG16, "taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512), "min_size": 16},
    "alex": {"layers": _ALEXNET, "taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256), "min_size": 31},
}
BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
_BACKBONE_NAMES = {"vgg": "VGG16", "alex": "AlexNet"}
LINEAR_SOURCE = "https://github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1"


def _backbone_hint(net: str) -> str:
    url = BACKBONE_URLS[net]
    return (
        f"expected torchvision's ImageNet {_BACKBONE_NAMES[net]} weights {url.rsplit('/', 1)[1]} (keys features.0.weight, ...); "
        f"download them on a machine with network from {url} and pass --lpips-backbone PATH"
    )


def _linear_hint(net: str) -> str:
    return (
        f"expected the LPIPS v0.1 linear heads for {net} (keys lin0.model.1.weight ... lin4.model.1.weight, shape [1, C, 1, 1]), "
        f"the file lpips/weights/v0.1/{net}.pth of the lpips package (`pip download lpips==0.1.4 --no-deps` on a machine with "
        f"network; the wheel is a zip) or from {LINEAR_SOURCE}; pass --lpips-linear PATH"
    )


def _check_net(net: str) -> str:
    if net not in NETS:
        raise UserError(f"LPIPS net {net!r}: choose 'vgg' (CDC's choice) or 'alex'")
    return net


class _Linear(nn.Module):
    """lpips' NetLinLayer: `model` = [Dropout (identity here), 1x1 conv C -> 1 without bias]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    @property
    def weight(self) -> torch.Tensor:
        return self.model[1].weight


def _features(net: str) -> nn.Sequential:
    """The backbone's `features` with torchvision's indices (so its state-dict keys match)."""
    modules: list[nn.Module] = []
    for spec in NETS[net]["layers"]:
        if spec == "R":
            modules.append(nn.ReLU())
        elif spec == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2) if net == "vgg" else nn.MaxPool2d(kernel_size=3, stride=2))
        else:
            index, c_in, c_out, kernel, stride, padding = spec
            assert index == len(modules)
            modules.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding))
    return nn.Sequential(*modules)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a VGG16 or AlexNet backbone; `forward(a, b)` -> distances [N] of paired images.

    Randomly initialised until `load_lpips` (or `load_state_dict`) fills it. `model_id` names the net
    and the weights it was loaded with.
    """

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        self.net = _check_net(net)
        self.taps = NETS[net]["taps"]
        self.min_size = NETS[net]["min_size"]
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _features(net)
        for index, channels in enumerate(NETS[net]["channels"]):
            self.add_module(f"lin{index}", _Linear(channels))
        self.model_id = f"lpips-{net}-v0.1@unloaded"

    @property
    def lins(self) -> list[_Linear]:
        return [getattr(self, f"lin{index}") for index in range(len(self.taps))]

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised taps [N, C_l, H_l, W_l] of images NCHW in [-1, 1] (no resizing)."""
        if min(images.shape[-2:]) < self.min_size:
            raise UserError(f"LPIPS ({self.net}) needs images of at least {self.min_size} px, got {tuple(images.shape[-2:])}")
        h = (images - self.shift) / self.scale
        taps, last = [], self.taps[-1]
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.taps:
                taps.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + EPS))
            if index == last:
                break
        return taps

    def layer_distance(self, index: int, feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
        """Tap `index`: mean over space of lin(index)((a - b)^2), broadcast over the batch -> [N]."""
        return F.conv2d((feats_a - feats_b).square(), self.lins[index].weight).mean(dim=(1, 2, 3))

    def distance(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
        """Distances [N] between embedded images (lists from `embed`; a batch of 1 broadcasts)."""
        return sum(self.layer_distance(index, a, b) for index, (a, b) in enumerate(zip(feats_a, feats_b)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self.embed(a), self.embed(b))


# --------------------------------------------------------------------------- loading


def _read_state(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file; {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same one-line fix
        raise UserError(f"{path}: cannot be read as a weights file; {hint}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors; {hint}")
    return state


def _check_keys(path: Path, state: dict, expected: dict, ignored_prefix: str | None, hint: str) -> None:
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected and not (ignored_prefix and key.startswith(ignored_prefix))]
    mismatched = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or mismatched:
        example = (missing or unexpected or mismatched)[0]
        kind = "missing" if missing else "unexpected" if unexpected else "wrong shape for"
        detail = f" {tuple(state[example].shape)}, expected {tuple(expected[example].shape)}" if kind == "wrong shape for" else ""
        raise UserError(
            f"{path}: {len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mis-shaped keys "
            f"({kind} {example!r}{detail}); {hint}"
        )


def load_lpips(backbone_path, linear_path, net: str = "vgg") -> LPIPS:
    """LPIPS v0.1 (`net` "vgg" or "alex") from torchvision's ImageNet backbone file and the lpips
    package's linear heads, each a `.pth` (read with weights_only=True) or `.safetensors`; in eval
    mode, frozen, on the CPU. `model_id` = "lpips-<net>-v0.1@<12 hex of each file's sha256>".
    Any unusable file is a one-line UserError naming it and where to get the right one."""
    net = _check_net(net)
    backbone_path, linear_path = Path(backbone_path).expanduser(), Path(linear_path).expanduser()
    backbone_hint, linear_hint = _backbone_hint(net), _linear_hint(net)
    model = LPIPS(net)
    expected = model.state_dict()
    backbone_expected = {k: v for k, v in expected.items() if k.startswith("features.")}
    linear_expected = {k: v for k, v in expected.items() if k.startswith("lin")}

    backbone = _read_state(backbone_path, backbone_hint)
    if any(key.startswith("lin") for key in backbone) and not any(key.startswith("features.") for key in backbone):
        raise UserError(f"{backbone_path}: holds LPIPS linear heads, not a backbone (pass it as --lpips-linear); {backbone_hint}")
    _check_keys(backbone_path, backbone, backbone_expected, "classifier.", backbone_hint)
    linear = _read_state(linear_path, linear_hint)
    if any(key.startswith("features.") for key in linear):
        raise UserError(f"{linear_path}: holds a backbone, not LPIPS linear heads (pass it as --lpips-backbone); {linear_hint}")
    _check_keys(linear_path, linear, linear_expected, None, linear_hint)

    model.load_state_dict({**{k: backbone[k] for k in backbone_expected}, **linear}, strict=True)
    model.model_id = f"lpips-{net}-v0.1@{file_sha256(backbone_path)[:12]}+{file_sha256(linear_path)[:12]}"
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- distances


def _images(images) -> torch.Tensor:
    from genadapt.eval.features import _as_images

    x = _as_images(images)
    if x.numel() and (float(x.min()) < -1.5 or float(x.max()) > 1.5):
        raise UserError(f"images with values in [{float(x.min()):.3g}, {float(x.max()):.3g}]: LPIPS expects float NCHW in [-1, 1]")
    return x


def _check_size(model: LPIPS, size: int | None) -> None:
    if size is not None and (not isinstance(size, int) or size < model.min_size):
        raise UserError(f"LPIPS size {size!r}: use an integer >= {model.min_size} for {model.net}, or None for the native size")


def _resize(batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """size: square size x size (CDC); None: native, shorter sides under 64 px upsampled to 64."""
    height, width = batch.shape[-2:]
    if size is not None:
        target = (size, size)
    elif min(height, width) < MIN_NATIVE:
        factor = MIN_NATIVE / min(height, width)
        target = (max(MIN_NATIVE, round(height * factor)), max(MIN_NATIVE, round(width * factor)))
    else:
        return batch
    if target == (height, width):
        return batch
    return F.interpolate(batch, size=target, mode="bilinear", align_corners=False, antialias=True)


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _embed(model: LPIPS, images: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    return model.embed(_resize(images.to(device=_device(model), dtype=torch.float32), size))


@torch.no_grad()
def lpips_distance(model: LPIPS, a, b, size: int | None = CDC_SIZE, batch_size: int = 16) -> torch.Tensor:
    """LPIPS of each pair (a[i], b[i]) -> float32 CPU tensor [N]; a, b: float NCHW in [-1, 1]
    (or ImageSets / uint8 NHWC), resized per `size` (module docstring; 256 = CDC's protocol)."""
    x, y = _images(a), _images(b)
    if len(x) != len(y):
        raise UserError(f"lpips_distance: {len(x)} images in a but {len(y)} in b; pairs need equal counts")
    _check_size(model, size)
    out = []
    for start in range(0, len(x), batch_size):
        xa, xb = x[start : start + batch_size], y[start : start + batch_size]
        if size is None and xa.shape[-2:] != xb.shape[-2:]:
            raise UserError(f"lpips_distance: image sizes {tuple(xa.shape[-2:])} and {tuple(xb.shape[-2:])} differ; pass size=")
        out.append(model.distance(_embed(model, xa, size), _embed(model, xb, size)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _cross(model: LPIPS, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor], budget: int = 1 << 24) -> torch.Tensor:
    """[Na, Nb] float64 distances between embedded sets, in chunks of about `budget` elements."""
    na, nb = len(feats_a[0]), len(feats_b[0])
    out = torch.zeros(na, nb, dtype=torch.float64, device=feats_a[0].device)
    for index, (fa, fb) in enumerate(zip(feats_a, feats_b)):
        chunk = max(1, budget // fb[0].numel())
        for i in range(na):
            for j in range(0, nb, chunk):
                out[i, j : j + chunk] += model.layer_distance(index, fa[i : i + 1], fb[j : j + chunk]).double()
    return out


def _embed_all(model: LPIPS, images: torch.Tensor, size: int | None, batch_size: int) -> list[torch.Tensor]:
    parts = [_embed(model, images[s : s + batch_size], size) for s in range(0, len(images), batch_size)]
    return [torch.cat(layer) for layer in zip(*parts)]


@torch.no_grad()
def lpips_pairwise(model: LPIPS, a, b=None, size: int | None = CDC_SIZE, batch_size: int = 16) -> torch.Tensor:
    """All-pairs LPIPS -> float64 CPU [len(a), len(b)]; b=None: a against itself (symmetric, zero
    diagonal, each pair computed once). The features of b (or a) are held in memory while the
    other set streams in batches: VGG at 256 px is about 32 MB per held image."""
    _check_size(model, size)
    x = _images(a)
    if b is None:
        feats = _embed_all(model, x, size, batch_size)
        n = len(x)
        out = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n - 1):
            row = _cross(model, [f[i : i + 1] for f in feats], [f[i + 1 :] for f in feats])[0].cpu()
            out[i, i + 1 :] = row
            out[i + 1 :, i] = row
        return out
    y = _images(b)
    feats_b = _embed_all(model, y, size, batch_size)
    rows = [_cross(model, _embed(model, x[s : s + batch_size], size), feats_b).cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, len(y), dtype=torch.float64)


# --------------------------------------------------------------------------- CDC intra-cluster LPIPS


@torch.no_grad()
def intra_cluster_lpips(
    samples_images,
    train_images,
    model: LPIPS,
    *,
    size: int | None = CDC_SIZE,
    max_per_cluster: int | None = 50,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """Intra-cluster LPIPS (Ojha et al. 2021, CVPR, CDC; `feat_cluster.py`), in image space.

    Each sample joins the cluster C_k of its nearest training shot by LPIPS (first on ties); per
    cluster, d_k = mean LPIPS over pairs i<j of at most `max_per_cluster` random members (CDC: 50);
    value = mean_k d_k over clusters with >= 2 members (CDC skips the NaN of the others; NaN if none).
    Same dict as `metrics.intra_cluster_diversity` (std over clusters is the population std, as
    there), plus "size"; `distance_name` is "LPIPS (<net>)". Images: float NCHW in [-1, 1],
    ImageSets or uint8 NHWC; resized per `size` (default 256, as CDC).
    """
    if not isinstance(model, LPIPS):
        raise UserError(f"intra_cluster_lpips: model must be an LPIPS module (load_lpips), got {type(model).__name__}")
    if max_per_cluster is not None and max_per_cluster < 2:
        raise UserError(f"max_per_cluster must be >= 2 or None, got {max_per_cluster}")
    _check_size(model, size)
    x, t = _images(samples_images), _images(train_images)
    if len(x) < 1 or len(t) < 1:
        raise UserError(f"intra_cluster_lpips: needs at least 1 sample and 1 training image, got {len(x)} and {len(t)}")
    result = cluster_diversity(
        lpips_pairwise(model, x, t, size=size, batch_size=batch_size),
        lambda members: lpips_pairwise(model, x[members], size=size, batch_size=batch_size),
        max_per_cluster,
        seed,
    )
    resize = f"{size}x{size} bilinear" if size is not None else f"native size (>= {MIN_NATIVE} px)"
    return {**result, "distance": "lpips", "space": f"{model.model_id}, {resize}", "distance_name": f"LPIPS ({model.net})", "size": size}
