"""Families: how to load, train, sample and save one kind of generator (diffusion, StyleGAN2).

Both family modules offer the same surface, which the loops, `compare` and the API use:

* `is_base(base)`, `load(base, device=...)`: a model whose every parameter is frozen; techniques decide
  what trains. `model.named_parameters()` carries each module's prefix (`unet.`, `generator.`, ...).
* `DEFAULTS`: settings a run takes on this family when the user gives none (technique, steps, ...).
* `sample(model, n, seed, ...)`: images in [-1, 1], a pure function of the weights and the seed.
* `save(model, folder)`: the model folder `load` reads back.
* The source model that regularisers compare against: :func:`source_module` yields it, either a frozen
  copy taken before the first step (:func:`ensure_source`) or the module itself with its adapters
  switched off (:func:`adapters_off`). Families know no technique: an adapter is any peft tuner layer
  or any module that subclasses :class:`AdapterLayer`.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from torch import nn


def family_of(base: str) -> str:
    """`gan` for pocket-stylegan2, a StyleGAN2 model folder or a `.pt`; else `diffusion`."""
    from genadapt.families import gan

    return "gan" if gan.is_base(base) else "diffusion"


def family_module(family: str):
    import importlib

    return importlib.import_module(f"genadapt.families.{family}")


class AdapterLayer:
    """Mixin for adapter modules a family can switch off: `enable_adapters(False)` makes the module the base."""

    adapters_enabled: bool = True

    def enable_adapters(self, enabled: bool) -> None:
        self.adapters_enabled = enabled


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AdapterLayer))]


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' own tensors (not the base layers a peft layer wraps)."""
    found = []
    for layer in adapter_layers(module):
        if isinstance(layer, AdapterLayer):
            found += list(layer.parameters())
        else:
            found += [p for attribute in layer.adapter_layer_names for p in getattr(layer, attribute).parameters()]
    return found


@contextlib.contextmanager
def adapters_off(module: nn.Module):
    """Run the base: every adapter layer of `module` switched off (no copy), back on afterwards.

    peft's `enable_adapters(False)` also sets requires_grad=False on the adapter weights, so their
    trainable flags are restored exactly as they were.
    """
    layers = adapter_layers(module)
    flags = [(p, p.requires_grad) for p in adapter_parameters(module)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def ensure_source(model, name: str) -> None:
    """Snapshot module `name` once, before the first step, if training changes its own weights; modules whose
    only trainable tensors are adapters need no copy (:func:`source_module` switches the adapters off)."""
    key = f"source_{name}"
    if key in model.extras:
        return
    module = model.modules()[name]
    adapted = {id(p) for p in adapter_parameters(module)}
    if any(p.requires_grad and id(p) not in adapted for p in module.parameters()):
        model.extras[key] = copy.deepcopy(module).requires_grad_(False).eval()


@contextlib.contextmanager
def source_module(model, name: str):
    """The source version of module `name`: its frozen copy if one was taken, else itself, adapters off."""
    if f"source_{name}" in model.extras:
        yield model.extras[f"source_{name}"]
        return
    with adapters_off(model.modules()[name]) as module:
        yield module


def artifact_bytes(artifacts: list[Path]) -> int:
    files = [f for a in map(Path, artifacts) for f in ([a] if a.is_file() else a.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files)
