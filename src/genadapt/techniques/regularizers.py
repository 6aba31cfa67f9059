"""Loss techniques for domain adaptation of diffusion models: each a named, weighted term.

Every term that needs the source model evaluates it on the *same* noisy input as the adapted
model. With LoRA the source is the base with adapters switched off (no copy); otherwise a frozen
copy is taken before the first step.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from genadapt.families import diffusion
from genadapt.techniques import Step


def _has_adapters(unet) -> bool:
    return any("lora_" in name for name, _ in unet.named_parameters())


def ensure_source(model) -> None:
    """Snapshot the source UNet once, unless adapters let us switch back to it for free."""
    if "source_unet" not in model.extras and not _has_adapters(model.unet):
        model.extras["source_unet"] = copy.deepcopy(model.unet).requires_grad_(False).eval()


@contextlib.contextmanager
def _source_unet(model):
    if "source_unet" in model.extras:
        yield model.extras["source_unet"]
        return
    model.unet.disable_adapters()
    try:
        yield model.unet
    finally:
        model.unet.enable_adapters()


def source_prediction(step: Step) -> torch.Tensor:
    """ε_S(x_t, t, c) of the frozen source, computed once per step and shared by every term."""
    if "source_prediction" not in step.outputs:
        outputs, batch = step.outputs, step.batch
        with torch.no_grad(), _source_unet(step.model) as unet:
            step.outputs["source_prediction"] = diffusion.predict(step.model, unet, outputs["noisy"], outputs["timesteps"], batch["text"].detach(), batch.get("sizes"))
    return step.outputs["source_prediction"]


def pairwise_kl(adapted: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """CDC / DDPM-PA relational term: KL(p^S ‖ p^θ), p_i(j) = softmax_{j≠i} cos(v_i, v_j), mean over anchors i."""
    adapted, source = adapted.flatten(1), source.flatten(1)
    n = len(adapted)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=adapted.device)
    sim_adapted = F.cosine_similarity(adapted[:, None], adapted[None], dim=-1)[off_diagonal].view(n, n - 1)
    sim_source = F.cosine_similarity(source[:, None], source[None], dim=-1)[off_diagonal].view(n, n - 1)
    return F.kl_div(F.log_softmax(sim_adapted, dim=1), F.softmax(sim_source, dim=1), reduction="batchmean")


def haar_high_frequency(x: torch.Tensor) -> torch.Tensor:
    """HF(x) = LH + HL + HH of a one-level Haar transform (DDPM-PA), depthwise 2x2 stride 2."""
    low = torch.tensor([1.0, 1.0]) / 2**0.5
    high = torch.tensor([-1.0, 1.0]) / 2**0.5
    kernel = (torch.outer(low, high) + torch.outer(high, low) + torch.outer(high, high)).to(x)
    channels = x.shape[1]
    return F.conv2d(x, kernel.expand(channels, 1, 2, 2), stride=2, groups=channels)


class PriorPreservation:
    """DreamBooth (Ruiz et al. 2023, eq. 2): λ E‖ε' − ε_θ(x'_t, t', c_pr)‖² on class images the source made."""

    name = "prior"
    default_weight = 1.0

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        from genadapt.grid import save_grid

        prompt = config.prior_prompt or config.caption or (images.captions[0] if images.captions[0] else "")
        prompts = [prompt] * config.num_class_images
        with torch.no_grad():
            class_images = diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=config.seed + 1)
            self.latents_mean, self.latents_std = diffusion.encode_images(model, class_images)
            self.text = diffusion.encode_text(model, diffusion.tokenize(model, [prompt]))
        self.scale = model.vae.config.scaling_factor
        save_grid(class_images, config.out / "class_images.png", scale=2)

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        model, generator = step.model, step.generator
        index = torch.randint(len(self.latents_mean), (len(step.batch["latents"]),), generator=generator)
        noise = torch.randn(self.latents_mean[index].shape, generator=generator)
        latents = (self.latents_mean[index] + self.latents_std[index] * noise) * self.scale
        noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
        prediction = diffusion.predict(model, model.unet, noisy, timesteps, self.text.expand(len(latents)))
        return {"prior": diffusion.denoise_loss(prediction, diffusion.target_for(model, latents, noise, timesteps))}


class EWC:
    """Elastic weight consolidation (Li et al. 2020, eq. 3; Kirkpatrick et al. 2017): λ Σ_i F_i (θ_i − θ*_i)².

    F is the diagonal empirical Fisher of the denoising loss on samples of the source model,
    computed once before adaptation; θ* are the source values of the trained parameters.
    """

    name = "ewc"
    default_weight = 1e3  # measured on pocket-sd: F·Δθ² is ~1e-6 per step of drift at lr 1e-4 (docs/techniques.md)

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        prompts = [c for c in model.extras.get("captions", images.captions)]
        prompts = [prompts[i % len(prompts)] for i in range(config.ewc_samples)]
        with torch.no_grad():
            samples = diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=config.seed + 2)
            mean, std = diffusion.encode_images(model, samples)
            text = diffusion.encode_text(model, diffusion.tokenize(model, prompts))
        generator = torch.Generator().manual_seed(config.seed + 3)
        fisher = {name: torch.zeros_like(p) for name, p in parameters.items()}
        scale = model.vae.config.scaling_factor
        for i in range(len(samples)):  # per-sample gradients: the empirical Fisher is a mean of squares
            latents = (mean[i : i + 1] + std[i : i + 1] * torch.randn(mean[i : i + 1].shape, generator=generator)) * scale
            noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
            prediction = diffusion.predict(model, model.unet, noisy, timesteps, text[i : i + 1])
            loss = diffusion.denoise_loss(prediction, diffusion.target_for(model, latents, noise, timesteps))
            grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
            for (name, _), grad in zip(parameters.items(), grads):
                if grad is not None:
                    fisher[name] += grad.detach() ** 2 / len(samples)
        self.fisher = fisher
        self.anchor = {name: p.detach().clone() for name, p in parameters.items()}

    def penalty(self, model) -> torch.Tensor:
        parameters = dict(model.named_parameters())
        return sum((self.fisher[name] * (parameters[name] - self.anchor[name]) ** 2).sum() for name in self.fisher)

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        return {"ewc": self.penalty(step.model)}


class Relational:
    """DDPM-PA (Zhu et al. 2022): pairwise-similarity KL between source and adapted x̂_0 on the same x_t,
    plus the same KL on Haar high frequencies (`relational_hf`)."""

    name = "relational"
    default_weight = 4.0  # DDPM-PA's pair_weight

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        ensure_source(model)

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        if len(step.outputs["prediction"]) < 3:
            raise ValueError("the relational loss needs --batch-size >= 3 (pairs of other samples per anchor)")
        outputs, model = step.outputs, step.model
        x0_adapted = diffusion.predicted_x0(model, outputs["noisy"], outputs["prediction"], outputs["timesteps"])
        x0_source = diffusion.predicted_x0(model, outputs["noisy"], source_prediction(step), outputs["timesteps"])
        return {
            "relational": pairwise_kl(x0_adapted, x0_source),
            "relational_hf": pairwise_kl(haar_high_frequency(x0_adapted), haar_high_frequency(x0_source)),
        }


class FeatureMatching:
    """Feature distillation from the source: mean_l ‖φ_l^θ(x_t) − φ_l^S(x_t)‖² over the UNet's up blocks
    (the feature-KD term of BK-SDM, Kim et al. 2023, used here against the source model)."""

    name = "feature"
    default_weight = 1.0

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight
        self._into: list | None = None  # hooks record only while a forward of ours runs

    def prepare(self, model, images, config) -> None:
        ensure_source(model)
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
        with torch.no_grad(), _source_unet(step.model) as unet:
            source = self._features(unet, step)
        return {"feature": sum(F.mse_loss(a, s) for a, s in zip(adapted, source)) / len(adapted)}


REGISTRY = {cls.name: cls for cls in (PriorPreservation, EWC, Relational, FeatureMatching)}


def make(name: str, weight: float | None):
    from genadapt.errors import UserError

    if name not in REGISTRY:
        raise UserError(f"--loss {name}: not available for diffusion models; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name](weight)
