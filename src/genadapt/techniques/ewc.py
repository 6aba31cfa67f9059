"""Elastic weight consolidation (Li et al. 2020, eq. 3; Kirkpatrick et al. 2017): λ Σ_i F_i (θ_i − θ*_i)².

F is the diagonal empirical Fisher of a loss on the *source* model's own samples, computed once before
adaptation; θ* are the source values of the anchored parameters. Both families share the penalty and the
Fisher estimate (:func:`ewc_penalty`, :func:`diagonal_fisher`); only the loss whose gradients make F differs:
the denoising loss on source samples (diffusion), the non-saturating loss of the source D on the source G's
samples (GAN, Li et al. 2020 §3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from genadapt.config import setting
from genadapt.errors import UserError
from genadapt.techniques import Implementation, Step, Technique, register

FISHER_BATCH = 4  # GAN: D's minibatch-stddev group (Karras et al. 2020): each sample is scored as in training


def diagonal_fisher(parameters: dict[str, Tensor], losses: Iterable[Tensor]) -> dict[str, Tensor]:
    """F_i = mean over the given losses of (∂L/∂θ_i)²: the diagonal empirical Fisher."""
    names = list(parameters)
    fisher = {name: torch.zeros_like(parameters[name]) for name in names}
    count = 0
    for loss in losses:
        grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        count += 1
    return {name: value / max(count, 1) for name, value in fisher.items()}


def ewc_penalty(fisher: dict[str, Tensor], anchor: dict[str, Tensor], parameters: dict[str, Tensor]) -> Tensor:
    """Σ_i F_i (θ_i − θ*_i)² (Li et al. 2020, eq. 3, without λ)."""
    return sum((fisher[name] * (parameters[name] - anchor[name]) ** 2).sum() for name in fisher)


class EWCSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ewc_samples: int = setting(32, "--loss ewc: generated samples for the Fisher.  [default: diffusion 32, GAN 1024]", ge=1)


class GANEWCSettings(EWCSettings):
    # 1,024 generated images (Li et al. 2020 use a few thousand).
    ewc_samples: int = setting(1024, "--loss ewc: generated samples for the Fisher.  [default: diffusion 32, GAN 1024]", ge=1)


class _EWC:
    name = "ewc"

    def __init__(self, settings: EWCSettings):
        self.settings = settings

    def penalty(self, model) -> Tensor:
        return ewc_penalty(self.fisher, self.anchor, dict(model.named_parameters()))

    def loss(self, step: Step) -> dict[str, Tensor]:
        return {"ewc": self.penalty(step.model)}


class DiffusionEWC(_EWC):
    """F from per-sample gradients of the denoising loss on `ewc_samples` images the source generates for the
    run's captions (every trainable parameter is anchored)."""

    def prepare(self, model, images, config) -> None:
        from genadapt.families import diffusion

        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        prompts = list(model.extras.get("captions", images.captions))
        prompts = [prompts[i % len(prompts)] for i in range(self.settings.ewc_samples)]
        with torch.no_grad():
            samples = diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=config.seed + 2)
            mean, std = diffusion.encode_images(model, samples)
            text = diffusion.encode_text(model, diffusion.tokenize(model, prompts))
        generator = torch.Generator().manual_seed(config.seed + 3)
        scale = model.vae.config.scaling_factor

        def losses():  # per-sample gradients: the empirical Fisher is a mean of squares
            for i in range(len(samples)):
                latents = (mean[i : i + 1] + std[i : i + 1] * torch.randn(mean[i : i + 1].shape, generator=generator)) * scale
                noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
                prediction = diffusion.predict(model, model.unet, noisy, timesteps, text[i : i + 1])
                yield diffusion.denoise_loss(prediction, diffusion.target_for(model, latents, noise, timesteps))

        self.fisher = diagonal_fisher(parameters, losses())
        self.anchor = {name: p.detach().clone() for name, p in parameters.items()}


class GANEWC(_EWC):
    """F of the trainable generator parameters (Li et al. 2020 §3): L(x|θ_S) = −log σ(D_S(G_S(z))) on the
    source G's own samples, no real data. Per-minibatch empirical Fisher: the mean over ⌈samples / 4⌉
    minibatches of the squared gradient of the minibatch-mean loss (as the SG2-ADA-based reimplementation
    does, batch 32 there); per-sample gradients would score each image without the minibatch-stddev context
    D was trained with. With LoRA the anchored parameters are the A, B factors. The paper's λ ≈ 5·10⁸
    belongs to its Fisher normalisation; ours is measured on pocket-stylegan2 (see the registered weight).
    """

    seed_offset = 101

    def prepare(self, model, images, config) -> None:
        from genadapt.families.stylegan2 import g_nonsaturating_loss

        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("generator.")}
        if not parameters:
            raise UserError("--loss ewc anchors generator weights, but this --train leaves all of them frozen; use full, freeze or lora")
        generator = torch.Generator().manual_seed(config.seed + self.seed_offset)

        def losses():
            for _ in range(max(1, math.ceil(self.settings.ewc_samples / FISHER_BATCH))):
                z = torch.randn((FISHER_BATCH, model.style_dim), generator=generator).to(model.device)
                images = model.generate([z], noise=model.noise(FISHER_BATCH, generator))[0]
                yield g_nonsaturating_loss(model.discriminator(images))

        self.fisher = diagonal_fisher(parameters, losses())
        self.anchor = {name: p.detach().clone() for name, p in parameters.items()}


register(Technique(
    name="ewc",
    kind="loss",
    summary="elastic weight consolidation: a diagonal-Fisher pull towards the source weights",
    families={
        # Measured on pocket-sd: F·Δθ² is ~1e-6 per step of drift at lr 1e-4 (docs/techniques.md).
        "diffusion": Implementation(build=DiffusionEWC, settings=EWCSettings, default_weight=1e3,
                                    compare={"train": "full", "loss": ["ewc"], "ewc_samples": 16, "learning_rate": 1e-4}),
        # Measured on pocket-stylegan2 (its pretraining checkpoint at step 3,500; 1,024 Fisher samples; unregularised
        # --train full, lr 0.002, batch 4, flags 10 shots): Σ F Δθ² ≈ 0.01 after 10 steps and 0.02-0.03 from 25 to
        # 100 steps, so λ = 50 makes the penalty ≈ 1, the order of the adversarial loss (gan_anchors.md §3's rule).
        "gan": Implementation(build=GANEWC, settings=GANEWCSettings, default_weight=50.0,
                              # compare: 256 Fisher samples (64 minibatches): per-element noise about 18%, against 35% at 64.
                              compare={"train": "full", "loss": ["ewc"], "ewc_samples": 256}),
    },
))
