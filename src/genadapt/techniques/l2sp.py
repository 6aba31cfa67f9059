"""L2-SP weight anchoring (Li, Grandvalet, Davoine 2018: Ω(w) = α/2 ‖w − w⁰‖²) towards the source weights.

In the per-tensor-mean form of FreezeD's ``--lambda_l2_G/--lambda_l2_D`` baseline (``F.mse_loss`` per
tensor): Σ_tensors mean((θ − θ⁰)²). GAN: on G (term ``l2sp_g``, G's loss) and D (``l2sp_d``, D's loss), one
weight for both, as FreezeD's baseline sets both λ. Diffusion: on every trainable tensor (``l2sp``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from genadapt.techniques import Implementation, NoSettings, Step, Technique, register


def l2sp_distance(parameters: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ_tensors mean((θ − θ⁰)²)."""
    return sum(F.mse_loss(parameters[n], anchor[n], reduction="mean") for n in anchor)


def _anchor(model, prefixes: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and (prefixes is None or n.startswith(prefixes))}


class DiffusionL2SP:
    name = "l2sp"

    def __init__(self, settings=None):
        pass

    def prepare(self, model, images, config) -> None:
        self.anchor = _anchor(model)

    def loss(self, step: Step) -> dict[str, Tensor]:
        return {"l2sp": l2sp_distance(dict(step.model.named_parameters()), self.anchor)}


class GANL2SP:
    name = "l2sp"

    def __init__(self, settings=None):
        pass

    def prepare(self, model, images, config) -> None:
        self.g_anchor = _anchor(model, ("generator.", "latent_map."))
        self.d_anchor = _anchor(model, ("discriminator.",))

    def loss(self, step: Step) -> dict[str, Tensor]:
        return {"l2sp_g": l2sp_distance(dict(step.model.named_parameters()), self.g_anchor)} if self.g_anchor else {}

    def d_loss(self, step: Step) -> dict[str, Tensor]:
        return {"l2sp_d": l2sp_distance(dict(step.model.named_parameters()), self.d_anchor)} if self.d_anchor else {}


register(Technique(
    name="l2sp",
    kind="loss",
    summary="L2-SP: a plain L2 pull of the trained weights towards the source",
    families={
        # No published default for generators; Σ mean Δθ² is ~0.1-1 after a few hundred GAN steps at lr 0.002.
        "diffusion": Implementation(build=DiffusionL2SP, settings=NoSettings, default_weight=1.0),
        "gan": Implementation(build=GANL2SP, settings=NoSettings, default_weight=1.0, compare={"train": "full", "loss": ["l2sp"]}),
    },
))
