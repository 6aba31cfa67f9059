"""The technique registry: every technique is declared once, in the file named after it.

A *parameter technique* decides what trains (`full`, `freeze`, `lora`, `loha`, `lokr`, `embedding`): it
prepares the model, hands the optimiser its parameters, saves the artifact a user takes away, and loads
that artifact back onto the base. A *loss technique* (`prior`, `ewc`, `relational`, `feature`, `cdc`,
`l2sp`) adds named terms to the loss; it may snapshot the source model in `prepare`. Both see the same
`Step`. A technique file ends with one `register(Technique(...))` that says, per family it supports:

* `build(settings)`: the object the loop drives, from the technique's own settings (a pydantic model);
* `settings`: that model; its fields are the technique's flags (`rank` -> `--rank`), refused for any
  other technique;
* `learning_rate`: the default on that family (parameter techniques);
* `compare`: the adapt settings `compare --techniques NAME` runs it with (None: not offered);
* `load(model, run)`: the adapted model of a finished run, from the base and the run's artifact.

The CLI's choices, compare, run loading and the error messages all read this registry; adding a
technique touches its own file only (and `BUILTIN`, for one that ships with genadapt).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict

from genadapt.errors import UserError

FAMILIES = ("diffusion", "gan")
KINDS = ("parameter", "loss")
BUILTIN = ("full", "freeze", "lora", "loha", "lokr", "embedding", "prior", "ewc", "relational", "feature", "cdc", "l2sp")


@dataclass
class Step:
    """What one training step knows; loss techniques read it, never mutate it."""

    index: int
    model: object
    batch: dict  # latents, text (a TextCondition)/token_ids (diffusion) or real images (GAN)
    outputs: dict = field(default_factory=dict)  # noisy, timesteps, prediction, target, ...
    generator: torch.Generator | None = None


class ParameterTechnique(Protocol):
    name: str
    weight_decay: float

    def prepare(self, model) -> None: ...

    def parameters(self, model) -> list[torch.Tensor]: ...

    def save(self, model, out: Path) -> list[Path]: ...


class LossTechnique(Protocol):
    name: str
    weight: float

    def prepare(self, model, images, config) -> None: ...

    def loss(self, step: Step) -> dict[str, torch.Tensor]: ...


class NoSettings(BaseModel):
    """A technique that reads no settings of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Implementation:
    """How one technique works on one family."""

    build: Callable[[BaseModel], object]
    settings: type[BaseModel] = NoSettings
    learning_rate: float | None = None
    compare: dict | None = None
    load: Callable[[object, Path], object] | None = None
    default_weight: float | None = None  # loss techniques: the weight of `--loss NAME` without `:W`


@dataclass(frozen=True)
class Technique:
    name: str
    kind: str  # "parameter" | "loss"
    summary: str
    families: dict[str, Implementation]

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"technique {self.name}: kind must be one of {KINDS}")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"technique {self.name}: unknown families {sorted(unknown)}")


_REGISTRY: dict[str, Technique] = {}
_loaded = False


def register(technique: Technique) -> Technique:
    """Add a technique; a second one of the same name is refused (unregister the first)."""
    if technique.name in _REGISTRY and _REGISTRY[technique.name] is not technique:
        raise ValueError(f"a technique named {technique.name!r} is already registered")
    _REGISTRY[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registry() -> dict[str, Technique]:
    """Every registered technique, the built-in ones imported on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"genadapt.techniques.{name}")
    return _REGISTRY


def names(kind: str | None = None, family: str | None = None) -> list[str]:
    return [t.name for t in registry().values() if (kind is None or t.kind == kind) and (family is None or family in t.families)]


def get(name: str, kind: str, family: str) -> Implementation:
    """The implementation of technique `name` for `family`, or a one-line error listing what exists."""
    flag = "--train" if kind == "parameter" else "--loss"
    technique = registry().get(name)
    if technique is None or technique.kind != kind:
        raise UserError(f"{flag} {name}: unknown; choose from {', '.join(names(kind, family))}")
    if family not in technique.families:
        bases = " and ".join(f"{f} bases" for f in technique.families)
        raise UserError(f"{flag} {name} applies to {bases}; for {family} bases choose from {', '.join(names(kind, family))}")
    return technique.families[family]


def readers(field_name: str) -> list[tuple[str, str, str]]:
    """(technique, kind, family) of every implementation whose settings have `field_name`."""
    return [
        (technique.name, technique.kind, family)
        for technique in registry().values()
        for family, implementation in technique.families.items()
        if field_name in implementation.settings.model_fields
    ]


def compare_presets(family: str) -> dict[str, dict]:
    """{name: adapt settings} of every technique `compare` can run on `family`."""
    return {
        t.name: dict(t.families[family].compare)
        for t in registry().values()
        if family in t.families and t.families[family].compare is not None
    }


def trainable(model) -> list[torch.Tensor]:
    return [parameter for _, parameter in model.named_parameters() if parameter.requires_grad]


def set_trainable(model, wanted: Callable[[str], bool]) -> None:
    """requires_grad from a predicate over the model's prefixed parameter names."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(wanted(name)))
