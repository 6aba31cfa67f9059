"""Relational (pairwise-similarity) consistency between the source and the adapted model.

One definition serves both families (CDC, Ojha et al. 2021 eq. 1-3, for GANs in :mod:`.cdc`; DDPM-PA,
Zhu et al. 2022, for diffusion here): for anchor i, p_i(j) = softmax_{j≠i} cos(v_i, v_j) over the other
samples of the batch, for the source (p^S) and the adapted model (p^θ), and the loss is KL(p^S ‖ p^θ) with
the *mean* reduction over all N(N−1) entries, as both official codes compute it (``nn.KLDivLoss()``), so
one weight means the same in both families (CDC's λ = 1000, DDPM-PA's 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genadapt.families import diffusion, source_module
from genadapt.techniques import Implementation, NoSettings, Step, Technique, register


def pairwise_similarities(feats: torch.Tensor) -> torch.Tensor:
    """[N, N−1]: cosine similarity of each flattened sample to every other one."""
    flat = feats.flatten(1)
    n = len(flat)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=flat.device)
    return F.cosine_similarity(flat[:, None], flat[None], dim=-1)[off_diagonal].view(n, n - 1)


def relational_kl(similarities_adapted: torch.Tensor, similarities_source: torch.Tensor) -> torch.Tensor:
    """KL(p^S ‖ p^θ), p = softmax over each row of similarities, mean over every entry (``nn.KLDivLoss()``).
    Log-softmax on both sides, so identical inputs give exactly 0."""
    log_adapted = F.log_softmax(similarities_adapted, dim=1)
    log_source = F.log_softmax(similarities_source, dim=1)
    return (log_source.exp() * (log_source - log_adapted)).mean()


def pairwise_kl(adapted: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return relational_kl(pairwise_similarities(adapted), pairwise_similarities(source))


def haar_high_frequency(x: torch.Tensor) -> torch.Tensor:
    """HF(x) = LH + HL + HH of a one-level Haar transform (DDPM-PA), depthwise 2x2 stride 2."""
    low = torch.tensor([1.0, 1.0]) / 2**0.5
    high = torch.tensor([-1.0, 1.0]) / 2**0.5
    kernel = (torch.outer(low, high) + torch.outer(high, low) + torch.outer(high, high)).to(x)
    channels = x.shape[1]
    return F.conv2d(x, kernel.expand(channels, 1, 2, 2), stride=2, groups=channels)


def source_prediction(step: Step) -> torch.Tensor:
    """ε_S(x_t, t, c) of the source UNet on the step's own x_t, computed once per step."""
    if "source_prediction" not in step.outputs:
        outputs, batch = step.outputs, step.batch
        with torch.no_grad(), source_module(step.model, "unet") as unet:
            step.outputs["source_prediction"] = diffusion.predict(step.model, unet, outputs["noisy"], outputs["timesteps"], batch["text"].detach(), batch.get("sizes"))
    return step.outputs["source_prediction"]


class Relational:
    """DDPM-PA (Zhu et al. 2022): pairwise-similarity KL between source and adapted x̂_0 on the same x_t,
    plus the same KL on Haar high frequencies (`relational_hf`)."""

    name = "relational"

    def __init__(self, settings=None):
        pass

    def prepare(self, model, images, config) -> None:
        from genadapt.errors import UserError
        from genadapt.families import ensure_source

        if config.batch_size < 3:
            raise UserError(f"--loss relational needs --batch-size >= 3 (pairs of other samples per anchor); got {config.batch_size}")
        ensure_source(model, "unet")

    def loss(self, step: Step) -> dict[str, torch.Tensor]:
        outputs, model = step.outputs, step.model
        x0_adapted = diffusion.predicted_x0(model, outputs["noisy"], outputs["prediction"], outputs["timesteps"])
        x0_source = diffusion.predicted_x0(model, outputs["noisy"], source_prediction(step).to(x0_adapted.device), outputs["timesteps"])
        return {
            "relational": pairwise_kl(x0_adapted, x0_source),
            "relational_hf": pairwise_kl(haar_high_frequency(x0_adapted), haar_high_frequency(x0_source)),
        }


register(Technique(
    name="relational",
    kind="loss",
    summary="DDPM-PA pairwise-similarity KL between source and adapted x̂₀ (and its Haar high frequencies)",
    families={"diffusion": Implementation(build=Relational, settings=NoSettings, default_weight=4.0,  # DDPM-PA's pair_weight
                                          compare={"train": "full", "loss": ["relational"], "learning_rate": 1e-4})},
))
