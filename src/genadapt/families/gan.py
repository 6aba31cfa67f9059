"""The GAN family: load a StyleGAN2 (generator, discriminator, EMA generator), run it, sample, save.

What the adaptation loop (:mod:`genadapt.recipes.train_gan`) and the GAN techniques share:

* :class:`GANModel` - the three networks plus two optional slots techniques fill: ``latent_map`` (a network
  z -> z' run before the generator, e.g. MineGAN's miner) and ``d_heads`` (extra discriminator heads, e.g.
  CDC's patch head). :meth:`GANModel.named_parameters` prefixes every name with its module
  (``generator.``, ``discriminator.``, ``latent_map.``, ``d_heads.``), as ``DiffusionModel`` does, so
  freezing by pattern, FreezeD and trainable-state checkpoints are the same code for both families.
* :func:`load` - ``pocket-stylegan2``, a model folder written by
  :func:`genadapt.families.stylegan2.save_stylegan2`, or a rosinality ``stylegan2-pytorch`` ``.pt``
  checkpoint (``{"g_ema", "d", ...}``; only with ``allow_pickle=True``, read with ``weights_only=True``).
* :func:`sample` - images from the EMA generator, a pure function of (weights, seed).
* :func:`save` - a model folder (safetensors + ``config.json``) that :func:`load` reads back;

Randomness: :meth:`GANModel.generate` takes explicit per-layer noise (:meth:`GANModel.noise`) so that a
training loop can draw everything from one ``torch.Generator`` and resume bit for bit.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from genadapt.errors import UserError
from genadapt.families import source_module
from genadapt.families.stylegan2 import MIXING_PROB, copy_for_ema, load_stylegan2, mixing_noise, save_stylegan2
from genadapt.families.stylegan2 import sample as sample_stylegan2
from genadapt.families.stylegan2_nets import Discriminator, Generator

FAMILY = "gan"
POCKET = "pocket-stylegan2"
GENERATOR_SIDE = ("generator", "latent_map")  # trained by the G optimiser; the rest by D's
# Settings a run takes when the user gives none: FreezeD (Mo et al. 2020) as the technique; 1k steps (CDC README:
# close domains best at ~1k iterations); DiffAugment color,translation,cutout (Zhao et al. 2020, recommended for
# <= hundreds of images); no gradient clipping, as StyleGAN2.
DEFAULTS = {"train": "freeze", "steps": 1000, "augment": "diffaugment", "num_validation_images": 32, "max_grad_norm": 0.0}
# compare's evaluation grids are small; every run of a compare takes these.
COMPARE = {}
# What `compare` runs when --techniques is not given: TGAN, FreezeD, LoRA, MineGAN and the two regularisers.
COMPARE_TECHNIQUES = ("full", "freeze", "lora", "embedding", "ewc", "cdc")


def is_base(base: str) -> bool:
    """Whether ``--base`` names a GAN: pocket-stylegan2, a StyleGAN2 model folder, or a ``.pt`` checkpoint."""
    if base == POCKET:
        return True
    path = Path(base)
    return path.suffix in (".pt", ".pth") or (path / "generator_ema.safetensors").is_file()


@dataclass
class GANModel:
    generator: Generator  # the one that trains (starts as the base's EMA generator)
    discriminator: Discriminator
    g_ema: Generator  # what we sample from and export; the loop re-copies it after techniques prepare
    base: str
    config: dict  # the base's config.json: {"generator": kwargs, "discriminator": kwargs, ...}
    family: str = FAMILY
    latent_map: nn.Module | None = None  # z -> z' before G (MineGAN's miner)
    d_heads: nn.ModuleDict = field(default_factory=nn.ModuleDict)  # extra D heads (CDC's patch head)
    extras: dict = field(default_factory=dict)  # technique state (source snapshots, adapter info...)

    @property
    def resolution(self) -> int:
        return self.generator.size

    @property
    def device(self) -> torch.device:
        return self.generator.input.input.device

    def to(self, device) -> "GANModel":
        """Every network and head on `device` (source copies in `extras` included)."""
        for module in [*self.modules().values(), self.g_ema, *(m for m in self.extras.values() if isinstance(m, nn.Module))]:
            module.to(device)
        return self

    @property
    def style_dim(self) -> int:
        return self.generator.style_dim

    def modules(self) -> dict[str, nn.Module]:
        """The adaptable modules, by the prefix their parameter names carry."""
        found: dict[str, nn.Module] = {"generator": self.generator, "discriminator": self.discriminator}
        if self.latent_map is not None:
            found["latent_map"] = self.latent_map
        if len(self.d_heads):
            found["d_heads"] = self.d_heads
        return found

    def named_parameters(self):
        for prefix, module in self.modules().items():
            for name, parameter in module.named_parameters():
                yield f"{prefix}.{name}", parameter

    # -- running the generator

    def noise(self, batch: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Per-layer noise maps [batch, 1, res, res] (StyleGAN2's noise inputs), drawn from ``generator``."""
        shapes = [res for _, res in self.generator.feature_shapes()]
        device = self.device
        return [torch.randn((batch, 1, res, res), generator=generator).to(device) for res in shapes]

    def generate(self, styles: list[Tensor], inject_index: int | None = None, noise=None, ema: bool = False,
                 return_features: bool = False):
        """``G(latent_map(z))``: (images, None[, features]) as :meth:`Generator.forward`; ``ema`` picks G_ema."""
        network = self.g_ema if ema else self.generator
        if self.latent_map is not None:
            styles = [self.latent_map(z) for z in styles]
        return network(styles, inject_index=inject_index, noise=noise, return_features=return_features)

    def source_generate(self, styles: list[Tensor], inject_index: int | None = None, noise=None,
                        return_features: bool = False):
        """The *source* generator on the same inputs, without gradients: a frozen copy when training changes
        G's own weights (:func:`genadapt.families.ensure_source`), else G with its adapters off; no latent map."""
        with torch.no_grad(), source_module(self, "generator") as network:
            return network(styles, inject_index=inject_index, noise=noise, return_features=return_features)


@dataclass
class Adversarial:
    """What one step's game is played with: how G's latents are drawn and which critic scores images.

    ``latents(batch, generator) -> (styles, inject_index)``; ``critic(images) -> logits`` ([N, 1], or a
    logit map [N, 1, h, w] for a patch critic; the logistic losses average over every element). StyleGAN2's
    default (:func:`default_adversarial`) is style-mixed z and the full D; a loss technique may swap either
    for a step (CDC: anchor latents with the image D, or normal latents with a patch D).
    """

    name: str
    latents: Callable[[int, torch.Generator], tuple[list[Tensor], int | None]]
    critic: Callable[[Tensor], Tensor]


def default_adversarial(model: GANModel) -> Adversarial:
    """StyleGAN2 (Karras et al. 2020): z with style mixing (p = 0.9, Karras et al. 2019 §3.1), the full D."""

    def latents(batch: int, generator: torch.Generator):
        device = model.device
        return mixing_noise(batch, model.style_dim, model.generator.n_latent, MIXING_PROB, device=device, generator=generator)

    return Adversarial("image", latents, model.discriminator)


# ----------------------------------------------------------------------------- loading


def _module_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    if "channels" in out:
        out["channels"] = {int(k): int(v) for k, v in out["channels"].items()}
    return out


def _infer_generator_kwargs(state: dict[str, Tensor]) -> dict:
    """Constructor arguments of a rosinality Generator from its state dict (shapes say everything but lr_mlp)."""
    n_mlp = sum(1 for key in state if key.startswith("style.") and key.endswith(".weight"))
    style_dim = state["style.1.weight"].shape[1]
    channels = {4: state["input.input"].shape[1]}
    index = 0
    while f"convs.{index}.conv.weight" in state:
        channels[2 ** (index // 2 + 3)] = state[f"convs.{index}.conv.weight"].shape[1]
        index += 2
    size = max(channels)
    return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channels": channels}


def _infer_discriminator_kwargs(state: dict[str, Tensor]) -> dict:
    """Constructor arguments of a rosinality Discriminator from its state dict."""
    top = state["convs.0.0.weight"].shape[0]
    blocks = sum(1 for key in state if key.startswith("convs.") and key.endswith(".conv1.0.weight"))
    size = 4 * 2**blocks
    channels = {size: top}
    for k in range(1, blocks + 1):
        channels[size // 2**k] = state[f"convs.{k}.conv2.1.weight"].shape[0]
    return {"size": size, "channels": channels}


def _load_rosinality(path: Path) -> tuple[Generator, Discriminator, dict]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # rosinality stores its args
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the user's file
        raise UserError(f"--base {path}: cannot read it as a weights-only torch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "d" not in checkpoint or not ({"g_ema", "g"} & set(checkpoint)):
        keys = ", ".join(sorted(checkpoint)[:6]) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"--base {path}: expected a rosinality checkpoint with 'g_ema' (or 'g') and 'd', found {keys}")
    g_state = checkpoint.get("g_ema", checkpoint.get("g"))
    # Every resolution's channel count is read from the weights, so channel_multiplier is not needed.
    g_kwargs, d_kwargs = _infer_generator_kwargs(g_state), _infer_discriminator_kwargs(checkpoint["d"])
    generator, discriminator = Generator(**g_kwargs), Discriminator(**d_kwargs)
    try:
        generator.load_state_dict(g_state, strict=True)
        discriminator.load_state_dict(checkpoint["d"], strict=True)
    except RuntimeError as exc:
        raise UserError(f"--base {path}: weights do not fit a StyleGAN2 config F network ({str(exc).splitlines()[0]})") from None
    return generator.eval(), discriminator.eval(), {"generator": g_kwargs, "discriminator": d_kwargs}


def resolve_base(base: str) -> Path:
    if base == POCKET:
        from genadapt.zoo import weights_dir

        return weights_dir(POCKET)
    path = Path(base)
    if not path.exists():
        raise UserError(f"--base {base}: no such file or folder; pass pocket-stylegan2, a StyleGAN2 model folder or a rosinality .pt")
    return path


def load(base: str, allow_pickle: bool = False, device: str | torch.device = "cpu") -> GANModel:
    """A GANModel with every parameter frozen (requires_grad=False); techniques decide what trains.

    The training generator starts from the base's EMA generator, the one StyleGAN2 samples from and the
    few-shot papers adapt (CDC, EWC); weights are held in fp32 even when the folder stores fp16.
    """
    path = resolve_base(base)
    if path.is_dir():
        if not (path / "generator_ema.safetensors").is_file():
            raise UserError(f"--base {base}: not a StyleGAN2 model folder (no generator_ema.safetensors)")
        try:
            g_ema, discriminator, config = load_stylegan2(path, device=device)
        except UserError:
            raise
        except MemoryError:
            raise UserError(f"--base {base}: its config.json asks for a network larger than this machine's memory; check config.json") from None
        except Exception as exc:  # noqa: BLE001 - a malformed config.json, corrupt or mismatched weights: the folder
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"--base {base}: cannot load this StyleGAN2 folder ({first}); check its config.json and safetensors files") from None
    else:
        if not allow_pickle:
            raise UserError(
                f"--base {base}: .pt checkpoints are pickles; pass --allow-pickle (allow_pickle=True) to read it "
                "with torch.load(weights_only=True), or convert it to a model folder"
            )
        g_ema, discriminator, config = _load_rosinality(path)
        g_ema, discriminator = g_ema.to(device), discriminator.to(device)
    generator = copy.deepcopy(g_ema).float()
    discriminator = discriminator.float()
    for module in (generator, discriminator):
        module.requires_grad_(False)
    return GANModel(generator=generator, discriminator=discriminator, g_ema=copy_for_ema(generator), base=base, config=config)


# ----------------------------------------------------------------------------- sampling and saving


@torch.no_grad()
def sample(model: GANModel, n: int, seed: int, truncation: float = 1.0) -> Tensor:
    """``n`` images [n, 3, size, size] in [-1, 1] from the EMA generator, a pure function of (weights, seed).

    Same z and fixed noise buffers as :func:`genadapt.families.stylegan2.sample`; with a latent map
    (MineGAN's miner) z goes through it first.
    """
    if model.latent_map is None:
        return sample_stylegan2(model.g_ema, n, seed, truncation=truncation)
    device = model.g_ema.input.input.device
    z = torch.randn((n, model.style_dim), generator=torch.Generator().manual_seed(seed)).to(device)
    images = [model.g_ema([model.latent_map(chunk)], randomize_noise=False)[0] for chunk in z.split(64)]
    return torch.cat(images).clamp(-1, 1)


def save(model: GANModel, folder: Path, extra: dict | None = None) -> Path:
    """A model folder (generator_ema, generator, discriminator as safetensors + config.json) that :func:`load` reads."""
    return save_stylegan2(
        Path(folder),
        model.g_ema,
        model.discriminator,
        _module_kwargs(model.config["generator"]),
        _module_kwargs(model.config["discriminator"]),
        generator=model.generator,
        extra={"adapted_from": model.base, **(extra or {})},
    )
