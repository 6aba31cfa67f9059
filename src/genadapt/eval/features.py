"""Feature extractors for the metrics, and a feature cache.

An *extractor* is any `nn.Module` that maps NCHW RGB images in [-1, 1] to feats [N, D] and has
an `extractor_id` string that changes whenever its outputs would (architecture, weights,
resizing). `get_extractor` builds one from a spec:

    "pocket"          the shipped eval-encoder (zoo/weights/eval-encoder), genadapt's default
    "DIR"             an eval-encoder folder written by `genadapt pretrain eval-encoder` (DIR/model)
    "inception:PATH"  the standard FID Inception-v3 from pytorch-fid's weights at PATH
    an nn.Module      your own network (wrapped; see `ModuleExtractor`)

`cached_features` stores feats on disk keyed by (extractor_id, sha256 of the pixels), so scoring
many runs against one reference set extracts the reference once.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genadapt.errors import UserError

SPEC_HELP = (
    "use 'pocket', an eval-encoder folder (from `genadapt pretrain eval-encoder`), 'inception:PATH' "
    "(pytorch-fid weights), or an nn.Module"
)


def tensors_sha256(tensors: dict) -> str:
    """sha256 over every entry's name, dtype, shape and bytes, in name order (independent of file format)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    return tensors_sha256(module.state_dict())


class ModuleExtractor(nn.Module):
    """Wraps a user's module as an extractor: eval mode, outputs flattened to [N, D].

    `extractor_id` is "<ClassName>@<first 12 hex of the state dict's sha256>", computed when
    wrapped: changing the weights afterwards needs a new wrapper (or the cache goes stale). A
    module whose behaviour is not captured by its weights (e.g. a parameter-free transform with
    settings) should carry its own `extractor_id` attribute, which `get_extractor` then uses as is.
    A module may return a tensor or a one-element list/tuple (pytorch-fid's InceptionV3 does).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval()
        self.extractor_id = f"{type(module).__name__}@{state_dict_sha256(module)[:12]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.module(images)
        if isinstance(feats, (list, tuple)):
            if len(feats) != 1:
                raise UserError(f"{type(self.module).__name__} returned {len(feats)} outputs; an extractor must return one tensor")
            feats = feats[0]
        if not isinstance(feats, torch.Tensor):
            raise UserError(f"{type(self.module).__name__} returned {type(feats).__name__}; an extractor must return a tensor")
        return feats.flatten(1)


def get_extractor(spec) -> nn.Module:
    """An extractor (nn.Module with `extractor_id`, in eval mode) from a spec; see the module docstring."""
    if isinstance(spec, nn.Module):
        if isinstance(getattr(spec, "extractor_id", None), str):
            return spec.eval()
        return ModuleExtractor(spec)
    if not isinstance(spec, (str, Path)):
        raise UserError(f"feature extractor {spec!r}: {SPEC_HELP}")
    text = str(spec)
    if text == "pocket":
        from genadapt import zoo
        from genadapt.zoo.eval_encoder import WEIGHTS_FILE, load_eval_encoder

        folder = zoo.WEIGHTS / "eval-encoder"
        if not (folder / WEIGHTS_FILE).is_file():
            raise UserError(
                f"the pocket eval-encoder is not shipped in this install ({folder} has no {WEIGHTS_FILE}); "
                "run `genadapt pretrain eval-encoder --out DIR` and pass DIR as the feature extractor"
            )
        return load_eval_encoder(folder)
    if text.startswith("inception:"):
        from genadapt.eval.inception import load_inception

        return load_inception(text[len("inception:"):])
    path = Path(text).expanduser()
    if path.is_dir():
        from genadapt.zoo.eval_encoder import CONFIG_FILE, WEIGHTS_FILE, load_eval_encoder

        if not (path / WEIGHTS_FILE).is_file() and (path / "model" / WEIGHTS_FILE).is_file():
            path = path / "model"  # a pretrain run folder: its shipped model
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"feature extractor {text!r}: folder has no eval-encoder ({WEIGHTS_FILE}, {CONFIG_FILE}); {SPEC_HELP}")
        return load_eval_encoder(path)
    if path.is_file():
        raise UserError(f"feature extractor {text!r} is a file; for Inception weights write inception:{text}")
    raise UserError(f"unknown feature extractor {text!r}: {SPEC_HELP}")


def _as_images(images) -> torch.Tensor:
    """Float NCHW in [-1, 1] from an ImageSet, a uint8 NHWC array, or a float NCHW tensor."""
    from genadapt.data.imageset import ImageSet

    if isinstance(images, ImageSet):
        return images.tensors()
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"image array of shape {images.shape} and dtype {images.dtype}: expected uint8 N x H x W x 3")
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise UserError(f"images {shape}: expected a float tensor N x 3 x H x W in [-1, 1], an ImageSet or uint8 NHWC")
    if not images.is_floating_point():
        raise UserError(f"images of dtype {images.dtype}: expected float values in [-1, 1] (NCHW)")
    return images


def _device(extractor: nn.Module) -> torch.device:
    parameter = next(extractor.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def extract(extractor: nn.Module, images, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """feats [N, D] (float32, CPU) of images (float NCHW in [-1, 1], an ImageSet or uint8 NHWC), in batches."""
    from tqdm.auto import tqdm

    images = _as_images(images)
    device = _device(extractor)
    name = getattr(extractor, "extractor_id", type(extractor).__name__)
    chunks = []
    with tqdm(total=len(images), desc=f"features {name}", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in images.split(batch_size):
            feats = extractor(batch.to(device=device, dtype=torch.float32))
            if feats.ndim != 2 or len(feats) != len(batch):
                raise UserError(f"extractor {name} returned shape {tuple(feats.shape)} for {len(batch)} images; expected [N, D]")
            chunks.append(feats.float().cpu())
            bar.update(len(batch))
    if not chunks:
        raise UserError("no images to extract features from")
    return torch.cat(chunks)


def pixels_sha256(images) -> str:
    """sha256 of the images exactly as given: uint8 pixels (ImageSet, array) or float32 values (tensor), with shape."""
    from genadapt.data.imageset import ImageSet

    if isinstance(images, ImageSet):
        images = images.pixels
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        kind = f"uint8 NHWC {array.shape}"
        data = array.tobytes()
    else:
        tensor = _as_images(images).detach().to("cpu", torch.float32).contiguous()
        kind = f"float32 NCHW {tuple(tensor.shape)}"
        data = tensor.numpy().tobytes()
    digest = hashlib.sha256(kind.encode())
    digest.update(data)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """<genadapt cache>/features (the cache follows $GENADAPT_CACHE)."""
    from genadapt.data.openmoji import cache_dir

    return cache_dir() / "features"


def cache_path(extractor_id: str, pixels_hash: str, cache_dir: Path | None = None) -> Path:
    """One folder per extractor (readable name + a hash of the exact id), one file per image set."""
    readable = re.sub(r"[^A-Za-z0-9@._-]+", "_", extractor_id)[:64]
    folder = f"{readable}-{hashlib.sha256(extractor_id.encode()).hexdigest()[:8]}"
    return Path(cache_dir or default_cache_dir()) / folder / f"{pixels_hash}.safetensors"


def cached_features(extractor: nn.Module, images, cache_dir: Path | None = None, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """`extract` with an on-disk cache keyed by (extractor_id, pixels_sha256(images)), stored as safetensors.

    A file that cannot be read or whose recorded key differs is recomputed and replaced.
    """
    from safetensors import safe_open

    from genadapt.runs import save_safetensors

    extractor_id = getattr(extractor, "extractor_id", None)
    if not isinstance(extractor_id, str):
        raise UserError(f"{type(extractor).__name__} has no extractor_id; pass it through get_extractor() first")
    digest = pixels_sha256(images)
    path = cache_path(extractor_id, digest, cache_dir)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("extractor_id") == extractor_id and metadata.get("pixels_sha256") == digest:
                    return handle.get_tensor("feats")
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    feats = extract(extractor, images, batch_size=batch_size, progress=progress)
    save_safetensors(path, {"feats": feats}, metadata={"extractor_id": extractor_id, "pixels_sha256": digest, "count": str(len(feats))})
    return feats
