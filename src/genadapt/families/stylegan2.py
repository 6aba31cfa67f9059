"""StyleGAN2 family: the training pieces (losses, R1, lazy regularization, EMA, style mixing),
deterministic sampling, and the model folder (save / load).

Every piece is a small function whose body is the paper's formula, so that pretraining
(:mod:`genadapt.zoo.pocket_stylegan2`) and the adaptation loops (FreezeD, EWC, CDC ...) share
one definition of the StyleGAN2 objective:

* :func:`d_logistic_loss`, :func:`g_nonsaturating_loss` - the logistic GAN loss of Goodfellow et
  al. 2014 in its non-saturating form, as used by StyleGAN / StyleGAN2 (Karras et al. 2019, 2020).
* :func:`r1_penalty` and :class:`LazyR1` - R1 (Mescheder et al. 2018) applied every 16 D steps
  ("lazy regularization", Karras et al. 2020 §3.1), with :func:`lazy_adam_hyperparameters` for the
  matching Adam correction.
* :func:`ema_decay`, :func:`accumulate` - the generator EMA (Karras et al. 2018, ProGAN; StyleGAN2's
  ``ema_kimg`` half-life convention).
* :func:`mixing_noise` - style-mixing regularization (Karras et al. 2019 §3.1, probability 0.9).
* :func:`sample` - images from fixed z and fixed noise buffers, a pure function of the seed.

Randomness: everything here draws from torch RNGs only (the global one unless a
``torch.Generator`` is passed), never Python's ``random``, so saving ``torch.get_rng_state()``
is enough to resume a training run bit for bit.

Model folder layout (what :func:`save_stylegan2` writes and :func:`load_stylegan2` reads)::

    generator_ema.safetensors   the EMA generator (the one to sample from and adapt)
    generator.safetensors       the raw generator (optional)
    discriminator.safetensors   the discriminator
    config.json                 {"model": "stylegan2", "generator": {kwargs}, "discriminator": {kwargs}, ...}

Weights are fp32 state dicts whose keys are exactly rosinality's ``stylegan2-pytorch`` keys (see
:mod:`genadapt.families.stylegan2_nets`), so a user can load them into that code too.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from genadapt.families.stylegan2_nets import Discriminator, Generator

__all__ = [
    "MIXING_PROB",
    "R1_INTERVAL",
    "EMA_KIMG",
    "LazyR1",
    "accumulate",
    "copy_for_ema",
    "d_logistic_loss",
    "ema_decay",
    "g_nonsaturating_loss",
    "lazy_adam_hyperparameters",
    "load_stylegan2",
    "mean_latent",
    "mixing_noise",
    "r1_penalty",
    "requires_grad",
    "sample",
    "save_stylegan2",
]

MIXING_PROB = 0.9  # style mixing probability, Karras et al. 2019 §3.1 / rosinality --mixing 0.9
R1_INTERVAL = 16  # lazy regularization: R1 every 16 minibatches, Karras et al. 2020 §3.1
EMA_KIMG = 10.0  # EMA half-life in thousands of images, StyleGAN2 config F (ema_kimg=10)


# ----------------------------------------------------------------------------- losses


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator logistic loss, Goodfellow et al. 2014 eq. 1 (as in StyleGAN2):

    L_D = E_x[-log σ(D(x))] + E_z[-log(1 - σ(D(G(z))))] = E[softplus(-D(x))] + E[softplus(D(G(z)))].
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss, Goodfellow et al. 2014 §3 (as in StyleGAN2):

    L_G = E_z[-log σ(D(G(z)))] = E[softplus(-D(G(z)))]. Unlike the minimax E[log(1 - σ(D(G(z))))],
    its gradient does not vanish when D confidently rejects the fakes.
    """
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """R1 gradient penalty, Mescheder et al. 2018 eq. 9 (without the γ/2): E_x[‖∇_x D(x)‖²].

    ``real_images`` must require grad and ``real_logits`` must be computed from them (through any
    augmentation, as in StyleGAN2-ADA and DiffAugment: the gradient is taken w.r.t. the un-augmented
    reals). The graph is kept (``create_graph``) so the penalty can be minimised over D's weights.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


class LazyR1:
    """R1 with lazy regularization, Karras et al. 2020 §3.1 and App. B.

    Every ``interval`` D steps (:meth:`due`), minimise ``interval · γ/2 · E‖∇_x D(x)‖²`` in a separate
    D update; multiplying by the interval keeps the penalty's total strength as if it ran every step.
    Use :func:`lazy_adam_hyperparameters` for D's optimiser. ``gamma`` is the paper's γ (rosinality's
    ``--r1``).
    """

    def __init__(self, gamma: float, interval: int = R1_INTERVAL):
        if gamma < 0 or interval < 1:
            raise ValueError(f"R1 needs gamma >= 0 and interval >= 1, got gamma={gamma}, interval={interval}")
        self.gamma = float(gamma)
        self.interval = int(interval)

    def due(self, d_step: int) -> bool:
        """Whether D step number ``d_step`` (0-based, as rosinality's ``i``) also runs the penalty."""
        return d_step % self.interval == 0

    def __call__(
        self,
        discriminator: nn.Module,
        real_images: Tensor,
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(loss to backpropagate = interval · γ/2 · R1, the raw R1 value for logging)."""
        real_images = real_images.detach().requires_grad_(True)
        real_logits = discriminator(augment(real_images) if augment is not None else real_images)
        penalty = r1_penalty(real_logits, real_images)
        return self.interval * self.gamma / 2 * penalty, penalty.detach()


def lazy_adam_hyperparameters(
    lr: float, betas: tuple[float, float], interval: int | None
) -> tuple[float, tuple[float, float]]:
    """Adam settings for a network that is also regularized every ``interval`` minibatches.

    Karras et al. 2020 App. B (rosinality ``train.py``): with c = k / (k + 1), use lr·c and β^c, so the
    k regular updates plus one regularization update move like k plain ones. ``interval=None``
    (no lazy regularization, e.g. G without path-length regularization) returns the inputs unchanged.
    """
    if not interval:
        return lr, (betas[0], betas[1])
    c = interval / (interval + 1)
    return lr * c, (betas[0] ** c, betas[1] ** c)


# ----------------------------------------------------------------------------- EMA


def ema_decay(
    batch_size: int,
    half_life_kimg: float = EMA_KIMG,
    images_seen: int | None = None,
    rampup: float | None = None,
) -> float:
    """Per-step EMA decay β from a half-life measured in images (StyleGAN2 / SG2-ADA convention):

    β = 0.5 ** (batch / (half_life_kimg · 1000)), so the weight of a snapshot halves every
    ``half_life_kimg`` thousand images whatever the batch. rosinality hard-codes the same rule,
    ``accum = 0.5 ** (32 / (10 * 1000))`` (batch 32, 10 kimg). With ``rampup`` (SG2-ADA, 0.05), the
    half-life is capped at ``rampup · images_seen`` so the average forgets the random init quickly.
    """
    half_life = half_life_kimg * 1000.0
    if rampup is not None and images_seen is not None:
        half_life = min(half_life, rampup * images_seen)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)


@torch.no_grad()
def accumulate(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ (rosinality's ``accumulate``), parameters only.

    decay = 0 copies ``model``'s parameters, decay = 1 keeps ``ema``'s. Buffers (FIR kernels, the fixed
    noise maps) are not averaged: they do not train and are set once by ``copy.deepcopy``.
    """
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


def requires_grad(model: nn.Module, flag: bool = True) -> None:
    """Switch gradients of all parameters (rosinality's helper; the D and G steps toggle them)."""
    for param in model.parameters():
        param.requires_grad_(flag)


# ----------------------------------------------------------------------------- latents and sampling


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def mixing_noise(
    batch: int,
    style_dim: int,
    n_latent: int,
    prob: float = MIXING_PROB,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], int | None]:
    """Style-mixing regularization, Karras et al. 2019 §3.1: with probability ``prob``, two z whose
    styles switch at a crossover layer in [1, n_latent − 1].

    Returns ``(styles, inject_index)`` for ``generator(styles, inject_index=inject_index)``:
    ``([z], None)`` or ``([z1, z2], index)``. Same distribution as rosinality's ``mixing_noise``, but
    drawn from torch's RNG only (see the module docstring).
    """

    if prob > 0 and float(torch.rand((), generator=generator)) < prob:
        styles = [_randn((batch, style_dim), generator, device) for _ in range(2)]
        index = int(torch.randint(1, n_latent, (), generator=generator))  # rosinality: randint(1, n_latent - 1)
        return styles, index
    return [_randn((batch, style_dim), generator, device)], None


@torch.no_grad()
def mean_latent(generator: Generator, count: int = 4096, seed: int = 0) -> Tensor:
    """w_avg = E_z[f(z)] over ``count`` seeded z ([1, style_dim]): the truncation centre (Karras 2019)."""
    device = next(generator.parameters()).device
    z = _randn((count, generator.style_dim), torch.Generator().manual_seed(seed), device)
    return generator.style(z).mean(0, keepdim=True)


@torch.no_grad()
def sample(
    g_ema: Generator,
    n: int,
    seed: int,
    truncation: float = 1.0,
    batch: int = 64,
) -> Tensor:
    """``n`` images [n, 3, size, size] (clamped to [-1, 1]), a pure function of (weights, seed, truncation).

    z comes from a private ``torch.Generator`` seeded with ``seed`` (the global RNG is not touched);
    the per-layer noise is the generator's fixed ``noises`` buffers (``randomize_noise=False``).
    ``truncation`` < 1 applies the truncation trick w ← w_avg + ψ (w − w_avg) (Karras et al. 2019,
    App. B) around :func:`mean_latent` with the same seed.
    """
    device = next(g_ema.parameters()).device
    z = _randn((n, g_ema.style_dim), torch.Generator().manual_seed(seed), device)
    centre = mean_latent(g_ema, seed=seed) if truncation < 1 else None
    images = [
        g_ema([chunk], truncation=truncation, truncation_latent=centre, randomize_noise=False)[0]
        for chunk in z.split(batch)
    ]
    return torch.cat(images).clamp(-1, 1)


# ----------------------------------------------------------------------------- model folder

WEIGHT_FILES = {
    "generator_ema": "generator_ema.safetensors",
    "generator": "generator.safetensors",
    "discriminator": "discriminator.safetensors",
}


def _json_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if "channels" in out:
        out["channels"] = {str(int(k)): int(v) for k, v in out["channels"].items()}
    if "blur_kernel" in out:
        out["blur_kernel"] = list(out["blur_kernel"])
    return out


def _module_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if "channels" in out:
        out["channels"] = {int(k): int(v) for k, v in out["channels"].items()}
    return out


def save_stylegan2(
    folder: Path,
    g_ema: Generator,
    discriminator: Discriminator,
    generator_kwargs: dict,
    discriminator_kwargs: dict,
    generator: Generator | None = None,
    extra: dict | None = None,
) -> Path:
    """Write the model folder (see the module docstring) atomically: staged, then renamed into place.

    ``generator_kwargs`` / ``discriminator_kwargs`` are the constructor arguments of
    :class:`Generator` / :class:`Discriminator` (``channels`` keys become strings in JSON).
    ``extra`` entries are added to ``config.json`` (provenance, training config).
    """
    from genadapt.runs import save_safetensors, write_json

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    modules = {"generator_ema": g_ema, "discriminator": discriminator, "generator": generator}
    for role, module in modules.items():
        if module is not None:
            state = {key: value.float() for key, value in module.state_dict().items()}
            save_safetensors(staging / WEIGHT_FILES[role], state)
    write_json(
        staging / "config.json",
        {
            "model": "stylegan2",
            "generator": _json_kwargs(generator_kwargs),
            "discriminator": _json_kwargs(discriminator_kwargs),
            **(extra or {}),
        },
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def load_stylegan2(
    folder: Path, device: str | torch.device = "cpu", which: str = "generator_ema"
) -> tuple[Generator, Discriminator, dict]:
    """(generator, discriminator, config dict) from a folder written by :func:`save_stylegan2`.

    ``which="generator_ema"`` (default) or ``"generator"`` picks the generator weights. Both models
    load with ``strict=True`` and are returned in ``eval()`` mode with gradients enabled.
    """
    from genadapt.errors import UserError
    from genadapt.runs import read_safetensors

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a StyleGAN2 model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{config_path}: cannot read the model config ({reason}); re-export the model folder") from None
    if which not in ("generator_ema", "generator"):
        raise ValueError(f"which must be 'generator_ema' or 'generator', got {which!r}")
    try:
        g = Generator(**_module_kwargs(config["generator"]))
        d = Discriminator(**_module_kwargs(config["discriminator"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an edited or foreign config.json
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(f"{config_path}: not a StyleGAN2 config ({type(exc).__name__}: {reason}); re-export the model folder") from None
    for module, role in ((g, which), (d, "discriminator")):
        path = folder / WEIGHT_FILES[role]
        kind = {"generator_ema": "EMA generator", "generator": "generator"}.get(role, "discriminator")
        state = read_safetensors(path, f"StyleGAN2 {kind} weights")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:  # the message lists every key over many lines: keep the first detail
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = (lines[1:] or lines or ["mismatched tensors"])[0][:200]
            raise UserError(f"{path}: does not match {config_path.name} ({detail}); re-export the model folder") from None
    return g.to(device).eval(), d.to(device).eval(), config


def copy_for_ema(generator: Generator) -> Generator:
    """A frozen deep copy of ``generator`` to hold the EMA (no gradients, eval mode)."""
    ema = copy.deepcopy(generator).eval()
    requires_grad(ema, False)
    return ema

