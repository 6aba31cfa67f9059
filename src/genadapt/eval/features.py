"""Feature extractors for the metrics, and a feature cache.

An *extractor* is any `nn.Module` that maps NCHW RGB images in [-1, 1] to feats [N, D] and has
an `extractor_id` string that changes whenever its outputs would (architecture, weights,
resizing). `get_extractor` builds one from a spec:

    "pocket"          the shipped eval-encoder (zoo/weights/eval-encoder), genadapt's default
    "style"           pocket's features plus style statistics (conv-map moments, colour histogram,
                      edges / line weight), standardised and weighted: sees palette, stroke, blur,
                      texture (`genadapt.eval.style`, docs/style-aware-evaluation.md)
    "DIR"             an eval-encoder folder written by `genadapt pretrain eval-encoder` (DIR/model)
    "inception:PATH"  the standard FID Inception-v3 from pytorch-fid's weights at PATH
    an nn.Module      your own network (wrapped; see `ModuleExtractor`)

`cached_features` stores feats on disk keyed by (`extractor_cache_key`, sha256 of the pixels), so
scoring many runs against one reference set extracts the reference once. The key covers everything
that decides the features, read when the cache is asked: the extractor's class (qualified name) and
forward code, its repr, every attribute of it and its submodules (settings such as a pooling size or
an input resolution, normalisation constants), all parameters and buffers (persistent or not), the
extractor_id and `extract`'s own preprocessing (a wrapped module's attributes are read when it is
wrapped: see `ModuleExtractor`). Two extractors that could give different features never share an
entry, whatever ids they carry; entries written under the old key (extractor_id alone) are never read.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genadapt.errors import UserError

SPEC_HELP = (
    "use 'pocket', 'style', an eval-encoder folder (from `genadapt pretrain eval-encoder`), 'inception:PATH' "
    "(pytorch-fid weights), or an nn.Module"
)


def tensors_sha256(tensors: dict) -> str:
    """sha256 over every entry's name, dtype, shape and bytes, in name order (independent of file format)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    return tensors_sha256(module.state_dict())


# What `extract` does to images before the extractor sees them; change the text when that changes.
EXTRACT_PREPROCESSING = "float32 NCHW RGB in [-1, 1] (uint8 / 127.5 - 1), no resizing; extract v2"
CACHE_FORMAT = "genadapt feature cache v2"  # v1 keyed by extractor_id alone: weightless modules collided
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}  # hooks and registries; train/eval mode counts
_DEPTH = 6


def _code_digest(function) -> str:
    """A stable digest of a Python function's code (consts, names, bytecode), or its name for builtins."""
    code = getattr(function, "__code__", None)
    if code is None:
        return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', type(function).__qualname__)}"

    def walk(code: types.CodeType) -> str:
        consts = [walk(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]  # nested code: no addresses
        return f"{code.co_code.hex()}|{code.co_names}|{code.co_varnames}|{consts}"

    return hashlib.sha256(walk(code).encode()).hexdigest()[:16]


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _describe(value, depth: int = 0, seen: frozenset = frozenset()) -> str:
    """A text that differs whenever `value` could make a module behave differently."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device)):
        return f"{type(value).__qualname__}:{value!r}"
    if isinstance(value, torch.Tensor):
        return f"tensor:{tensors_sha256({'': value})}"
    if isinstance(value, np.ndarray):
        return f"array:{value.dtype}:{value.shape}:{hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}"
    if isinstance(value, type):
        return f"type:{_qualified(value)}"
    if id(value) in seen or depth > _DEPTH:
        return f"{_qualified(type(value))}:..."
    seen, depth = seen | {id(value)}, depth + 1
    if isinstance(value, nn.Module):  # a module held outside `_modules` (a plain list, an attribute of an object)
        return f"module:{_fingerprint(value, seen)}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__qualname__}[{', '.join(_describe(v, depth, seen) for v in value)}]"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__qualname__}{{{', '.join(sorted(_describe(v, depth, seen) for v in value))}}}"
    if isinstance(value, dict):
        items = sorted(f"{_describe(k, depth, seen)}: {_describe(v, depth, seen)}" for k, v in value.items())
        return f"{type(value).__qualname__}{{{', '.join(items)}}}"
    if isinstance(value, functools.partial):
        return f"partial({_describe(value.func, depth, seen)}, {_describe(value.args, depth, seen)}, {_describe(value.keywords, depth, seen)})"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"function:{getattr(value, '__qualname__', '')}:{_code_digest(getattr(value, '__func__', value))}"
    if hasattr(value, "__dict__"):
        return f"{_qualified(type(value))}{_describe(vars(value), depth, seen)}"
    return f"{_qualified(type(value))}:{value!r}"


def _config_lines(module: nn.Module, prefix: str = "", seen: frozenset = frozenset()) -> list[str]:
    """Class, forward code and every attribute of `module` and its submodules (not weights: hashed apart).

    A module may define `extractor_config()` to state its settings itself, e.g. when some attribute
    changes as it runs (a call counter) and would otherwise make every lookup a miss."""
    kind = type(module)
    lines = [f"{prefix}: {_qualified(kind)} forward={_code_digest(kind.forward)}"]
    own = getattr(module, "extractor_config", None)
    if callable(own):
        return lines + [f"{prefix}.extractor_config()={_describe(own(), 0, seen)}"]
    for key, value in sorted(vars(module).items()):
        if key not in _MODULE_INTERNALS:
            lines.append(f"{prefix}.{key}={_describe(value, 0, seen | {id(module)})}")
    for name, child in module._modules.items():
        lines += [f"{prefix}.{name}=None"] if child is None else _config_lines(child, f"{prefix}.{name}", seen)
    return lines


def _weights_sha256(module: nn.Module) -> str:
    """Every parameter and buffer, persistent or not (state_dict() leaves out non-persistent buffers)."""
    tensors = {f"parameter {name}": p for name, p in module.named_parameters(remove_duplicate=False)}
    tensors.update({f"buffer {name}": b for name, b in module.named_buffers(remove_duplicate=False) if b is not None})
    return tensors_sha256(tensors)


def _fingerprint(module: nn.Module, seen: frozenset = frozenset()) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for part in (_qualified(type(module)), repr(module), *_config_lines(module, "", seen), _weights_sha256(module)):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def extractor_cache_key(extractor: nn.Module) -> str:
    """The feature cache's key for `extractor` as it is now (see the module docstring): sha256 hex."""
    digest = hashlib.sha256(f"{EXTRACT_PREPROCESSING}\0{getattr(extractor, 'extractor_id', None)}\0".encode())
    digest.update(_fingerprint(extractor).encode())
    return digest.hexdigest()


class ModuleExtractor(nn.Module):
    """Wraps a user's module as an extractor: eval mode, outputs flattened to [N, D].

    `extractor_id` is "<ClassName>@<first 12 hex of a sha256 over its class, repr, attributes,
    parameters and buffers>", so two weightless modules with other settings (`Pool(4)`, `Pool(8)`)
    get other ids. Its attributes are read when wrapped (a call counter does not defeat the cache);
    the cache key re-reads the weights at every lookup, so changing them afterwards is safe.
    A module may return a tensor or a one-element list/tuple (pytorch-fid's InceptionV3 does).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.eval()
        self._config = _config_lines(module)
        self.extractor_id = f"{type(module).__qualname__}@{_fingerprint(module)[:12]}"

    def extractor_config(self) -> list[str]:
        return self._config

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
    if text == "style":
        from genadapt.eval.style import load_style_extractor

        return load_style_extractor()
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


def cache_path(extractor_id: str, pixels_hash: str, cache_dir: Path | None = None, key: str | None = None) -> Path:
    """One folder per extractor (readable id + a hash of the full cache key), one file per image set."""
    readable = re.sub(r"[^A-Za-z0-9@._-]+", "_", extractor_id)[:64]
    folder = f"{readable}-{hashlib.sha256((key or extractor_id).encode()).hexdigest()[:16]}"
    return Path(cache_dir or default_cache_dir()) / folder / f"{pixels_hash}.safetensors"


def cached_features(extractor: nn.Module, images, cache_dir: Path | None = None, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """`extract` with an on-disk cache keyed by (extractor_cache_key, pixels_sha256(images)), stored as safetensors.

    A file that cannot be read or whose recorded key differs is recomputed and replaced.
    """
    from safetensors import safe_open

    from genadapt.runs import save_safetensors

    extractor_id = getattr(extractor, "extractor_id", None)
    if not isinstance(extractor_id, str):
        raise UserError(f"{type(extractor).__name__} has no extractor_id; pass it through get_extractor() first")
    digest = pixels_sha256(images)
    key = extractor_cache_key(extractor)
    path = cache_path(extractor_id, digest, cache_dir, key=key)
    recorded = {"extractor_id": extractor_id, "cache_key": key, "pixels_sha256": digest}
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if all(metadata.get(name) == value for name, value in recorded.items()):
                    return handle.get_tensor("feats")
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            pass
    feats = extract(extractor, images, batch_size=batch_size, progress=progress)
    save_safetensors(path, {"feats": feats}, metadata={**recorded, "count": str(len(feats))})
    return feats
