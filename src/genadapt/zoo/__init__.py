"""The pocket model zoo: small models we pretrain on OpenMoji and ship inside the package.

Each model lives in `zoo/weights/<name>/` with its weights (safetensors) and `card.json`
(what it is, how it was trained, its measured quality). `genadapt pretrain NAME` rebuilds any
of them from scratch with the recorded config and seed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

from genadapt.errors import UserError

WEIGHTS = Path(__file__).parent / "weights"
# name -> (module with `pretrain(out, config)`, config class, folder inside the run that is shipped)
MODELS = {
    "pocket-sd": ("genadapt.zoo.pocket_sd", "PocketSDConfig", "pipeline"),
    "pocket-stylegan2": ("genadapt.zoo.pocket_stylegan2", "PocketStyleGAN2Config", "model"),
    "eval-encoder": ("genadapt.zoo.eval_encoder", "EvalEncoderConfig", "model"),
}


def check_name(name: str) -> str:
    if name not in MODELS:
        raise UserError(f"unknown zoo model {name!r}; choose one of {', '.join(MODELS)}")
    return name


def weights_dir(name: str) -> Path:
    """The shipped folder of a zoo model, or a one-line error saying how to build it."""
    folder = WEIGHTS / check_name(name)
    if not folder.is_dir():
        raise UserError(f"zoo model {name} is not shipped in this install; build it with `genadapt pretrain {name} --out DIR`")
    return folder


def card(name: str) -> dict:
    folder = WEIGHTS / check_name(name)
    path = folder / "card.json"
    info = json.loads(path.read_text()) if path.is_file() else {"name": name, "shipped": False}
    info.setdefault("name", name)
    info["shipped"] = folder.is_dir()
    if folder.is_dir():
        info["size_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return info


def config_with_overrides(name: str, overrides: dict[str, str]):
    """The model's default config, with `key=value` overrides parsed to each field's type."""
    module_name, class_name, _ = MODELS[check_name(name)]
    config_class = getattr(importlib.import_module(module_name), class_name)
    config = config_class()
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    for key, text in overrides.items():
        if key not in fields:
            raise UserError(f"--set {key}: {name} has no setting {key!r}; valid: {', '.join(fields)}")
        current = getattr(config, key)
        try:
            if isinstance(current, bool):
                value = text.lower() in ("1", "true", "yes", "on")
            elif isinstance(current, (int, float, str)):
                value = type(current)(text)
            else:
                value = json.loads(text)
        except (ValueError, json.JSONDecodeError):
            raise UserError(f"--set {key}={text}: expected a value like {current!r}") from None
        setattr(config, key, value)
    return config


def pretrain(name: str, out: Path, overrides: dict[str, str] | None = None) -> Path:
    module_name, _, _ = MODELS[check_name(name)]
    config = config_with_overrides(name, overrides or {})
    return importlib.import_module(module_name).pretrain(Path(out), config)
