"""Inception-v3 pool3 features for the standard FID, from weights the user already has on disk.

The network is the one FID is defined on (Heusel et al. 2017): TensorFlow's 2015-12-05
Inception-v3 graph, as ported to PyTorch by pytorch-fid (mseitzer/pytorch-fid,
`src/pytorch_fid/inception.py`). Our own module definition, without torchvision, whose
`state_dict` keys and shapes are exactly those of `pt_inception-2015-12-05-6726825d.pth`
(torchvision's `Inception3` names: `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`,
...). The FID graph differs from torchvision's Inception-v3 in three places, kept here:
* the average-pool branch of the A, C and first E blocks does not count padded zeros
  (TensorFlow's `avg_pool` semantics: `count_include_pad=False`);
* the last E block (`Mixed_7c`) uses a *max* pool in its pool branch;
* the classifier has 1008 classes (unused here: pool3 is the 2048-d global average before it).
Input: NCHW RGB in [-1, 1] at any size, resized to 299x299 bilinearly (align_corners=False)
like pytorch-fid; pytorch-fid resizes [0, 1] images and then maps them to [-1, 1], which is the
same thing because bilinear resizing is affine. Output: feats [N, 2048].

Weights are never downloaded: pass the path of pytorch-fid's file (a pickle read with
`torch.load(..., weights_only=True)`) or of a `.safetensors` file with the same keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genadapt.errors import UserError

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
# torch.hub's convention: the name's suffix is the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_HINT = (
    "expected pytorch-fid's pt_inception-2015-12-05 weights; download them on a machine with network from "
    f"{FID_WEIGHTS_URL} and pass --inception-weights PATH"
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, channels_in: int, channels_out: int, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, bias=False, **conv)
        self.bn = nn.BatchNorm2d(channels_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average that ignores the zero padding, as TensorFlow's avg_pool does."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, channels_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(channels_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(channels_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(channels_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a)."""

    def __init__(self, channels_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(channels_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

    def __init__(self, channels_in: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(channels_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(channels_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(channels_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(channels_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            1,
        )


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, channels_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(channels_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(channels_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3/3x1 branches (Mixed_7b: average pool; Mixed_7c: max pool, per the FID graph)."""

    def __init__(self, channels_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(channels_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(channels_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(channels_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(channels_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3: NCHW [-1, 1] -> feats [N, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.extractor_id = "inception-v3-fid@unloaded"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(dim=(2, 3))  # pool3


# The 1008-way classifier of the FID graph: in pytorch-fid's file, unused for pool3. Its shape is
# still checked, because torchvision's ImageNet Inception-v3 has the same trunk names but a
# 1000-way fc (and other weights): its features are not the FID's.
FID_CLASSIFIER = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def _read_state(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file gets the same one-line fix
        raise UserError(f"{path}: cannot be read as a weights file; {WEIGHTS_HINT}") from None


def load_inception(path) -> FIDInceptionV3:
    """FIDInceptionV3 with the weights at `path` (pytorch-fid's .pth or a .safetensors copy), in eval
    mode and frozen; `extractor_id` = "inception-v3-fid@<first 12 hex of the file's sha256>"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such file; {WEIGHTS_HINT}")
    state = _read_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors; {WEIGHTS_HINT}")
    model = FIDInceptionV3()
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked is absent from files saved before PyTorch 0.4.1; it is unused in eval.
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = [key for key in expected if key not in state and key not in optional]
    unexpected = [key for key in state if key not in expected and key not in FID_CLASSIFIER]
    shapes = {**{key: tuple(value.shape) for key, value in expected.items()}, **FID_CLASSIFIER}
    mismatched = [key for key in shapes if key in state and tuple(state[key].shape) != shapes[key]]
    if missing or unexpected or mismatched:
        example = (missing or unexpected or mismatched)[0]
        kind = "missing" if missing else "unexpected" if unexpected else "wrong shape for"
        raise UserError(
            f"{path}: {len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} mis-shaped keys "
            f"({kind} {example!r}); {WEIGHTS_HINT}"
        )
    complete = {key: state.get(key, expected[key]) for key in expected}  # drops fc
    model.load_state_dict(complete, strict=True)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    model.extractor_id = f"inception-v3-fid@{digest.hexdigest()[:12]}"
    return model.eval().requires_grad_(False)
