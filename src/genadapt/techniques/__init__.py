"""Techniques plug into the one training loop per family through a small protocol.

A *parameter technique* decides what trains (`full`, `freeze`, `lora`, `embedding`): it prepares
the model, hands the optimiser its parameters, and saves the artifact a user takes away. A
*loss technique* (`prior`, `ewc`, `relational`, `feature`, ...) adds named terms to the loss; it
may snapshot the source model in `prepare`. Both see the same `Step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


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
    trains_text_encoder: bool
    weight_decay: float

    def prepare(self, model) -> None: ...

    def parameters(self, model) -> list[torch.Tensor]: ...

    def save(self, model, out: Path) -> list[Path]: ...


class LossTechnique(Protocol):
    name: str
    weight: float

    def prepare(self, model, images, config) -> None: ...

    def loss(self, step: Step) -> dict[str, torch.Tensor]: ...


def trainable(model) -> list[torch.Tensor]:
    return [parameter for _, parameter in model.named_parameters() if parameter.requires_grad]


def make_parameter_technique(config):
    if config.train == "full":
        from genadapt.techniques.full import FullFineTuning

        return FullFineTuning(train_text_encoder=config.train_text_encoder)
    if config.train == "freeze":
        from genadapt.techniques.freeze import SelectiveFineTuning

        return SelectiveFineTuning(trainable=config.trainable, frozen=config.freeze, preset=config.preset)
    if config.train == "lora":
        from genadapt.techniques.lora import LoRA

        return LoRA.from_config(config)
    from genadapt.techniques.embedding import TextualInversion

    return TextualInversion(token=config.token, init_token=config.init_token, vectors=config.vectors)


def make_loss_techniques(config) -> list:
    from genadapt.techniques import regularizers

    return [regularizers.make(spec.name, spec.weight) for spec in config.loss]
