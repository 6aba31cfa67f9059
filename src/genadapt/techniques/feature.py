"""Feature matching against the source model: keep intermediate features where the source had them.

Diffusion: mean_l ‖φ_l^θ(x_t) − φ_l^S(x_t)‖² over the UNet's up blocks on the step's own x_t (the
feature-KD term of BK-SDM, Kim et al. 2023, used here against the source model). GAN: mean_k ‖D^k(x) −
D_S^k(x)‖² over the discriminator's blocks on the step's (augmented) real images, added to D's loss (the
``--lambda_FM`` baseline of FreezeD's code, Mo et al. 2020); frozen FreezeD blocks contribute 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genadapt.errors import UserError
from genadapt.families import diffusion, ensure_source, source_module
from genadapt.techniques import Implementation, NoSettings, Step, Technique, register


class DiffusionFeatureMatching:
    name = "feature"

    def __init__(self, settings=None):
        self._into: list | None = None  # hooks record only while a forward of ours runs

    def prepare(self, model, images, config) -> None:
        ensure_source(model, "unet")
        modules = [model.unet] + ([model.extras["source_unet"]] if "source_unet" in model.extras else [])
        for unet in modules:
            for block in unet.up_blocks:
                block.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if self._into is not None:
            self._into.append(output[0] if isinstance(output, tuple) else output)

    def _features(self, unet, step: Step) -> list[torch.Tensor]:
        self._into = []
        try:
            diffusion.predict(step.model, unet, step.outputs["noisy"], step.outputs["timesteps"], step.batch["text"], step.batch.get("sizes"))
            return self._into
        finally:
            self._into = None

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        adapted = self._features(step.model.unet, step)
        with torch.no_grad(), source_module(step.model, "unet") as unet:
            source = self._features(unet, step)
        return {"feature": sum(F.mse_loss(a, s.to(a.device)) for a, s in zip(adapted, source)) / len(adapted)}


class DiscriminatorFeatureMatching:
    name = "feature"

    def __init__(self, settings=None):
        pass

    def prepare(self, model, images, config) -> None:
        if not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("discriminator.")):
            raise UserError("--loss feature regularises the discriminator, but every D weight is frozen (--freeze-d)")
        ensure_source(model, "discriminator")

    def d_loss(self, step: Step) -> dict[str, torch.Tensor]:
        real = step.outputs["real_augmented"].detach()
        adapted = step.model.discriminator.features(real)
        with torch.no_grad(), source_module(step.model, "discriminator") as source:
            reference = source.features(real)
        return {"feature": sum(F.mse_loss(adapted[k], reference[k]) for k in adapted) / len(adapted)}


register(Technique(
    name="feature",
    kind="loss",
    summary="feature matching against the source (UNet up blocks; GAN: discriminator blocks)",
    families={
        "diffusion": Implementation(build=DiffusionFeatureMatching, settings=NoSettings, default_weight=1.0,
                                    compare={"train": "full", "loss": ["feature"], "learning_rate": 1e-4}),
        # No published default (FreezeD's flag is user-set).
        "gan": Implementation(build=DiscriminatorFeatureMatching, settings=NoSettings, default_weight=1.0),
    },
))
