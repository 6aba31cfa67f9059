"""Parameter techniques for the GAN family: what trains in the generator and the discriminator.

Every technique sets ``requires_grad`` on :class:`genadapt.families.gan.GANModel`'s prefixed parameters
(``generator.*``, ``discriminator.*``, plus ``latent_map.*`` for the miner); the loop trains whatever is
left trainable, G's side with one Adam and D's side with another. What each one trains:

==========  ===================================================  ==========================================
technique   generator side                                       discriminator
==========  ===================================================  ==========================================
full        every G weight (TGAN, Wang et al. 2018)               every D weight
freeze      G weights matching --trainable/--preset (all if       all but its first ``--freeze-d N`` blocks
            none), minus --freeze (FreezeD, Mo et al. 2020)       (FreezeD); --freeze patterns too
lora        LoRA factors A, B on G's EqualLinear and              all but the first ``--freeze-d N`` blocks
            ModulatedConv2d weights (Hu et al. 2021);
            G's own weights never change
embedding   a latent miner z -> z' before the frozen G            all but the first ``--freeze-d N`` blocks
            (MineGAN, Wang et al. 2020); G never changes          (MineGAN trains D with the miner)
==========  ===================================================  ==========================================

Patterns are shell-style (``fnmatch``). A pattern that starts with a module prefix (``generator.``,
``discriminator.``) matches full names; any other pattern matches the generator's own names
(``style.*``, ``convs.3.*``), because G is what users pick layers of.
"""

from __future__ import annotations

import contextlib
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from genadapt.errors import UserError
from genadapt.families.stylegan2_nets import EqualLinear, ModulatedConv2d
from genadapt.techniques import trainable

PREFIXES = ("generator.", "discriminator.", "latent_map.", "d_heads.")
# Generator layer groups (StyleGAN2 names, Karras et al. 2020 Fig. 2): the mapping network f (z -> w), the
# affine "A" blocks that turn w into per-layer styles (what BSA / FreezeD's --only_adain adapt), and the
# synthesis network g (constant input, modulated convs, noise strengths, ToRGB).
PRESETS = {
    "mapping": ["style.*"],
    "modulation": ["*.modulation.*"],
    "synthesis": ["input.*", "conv1.*", "convs.*", "to_rgb1.*", "to_rgbs.*"],
}


def _matches(name: str, patterns: list[str]) -> bool:
    prefixed = [p for p in patterns if p.startswith(PREFIXES)]
    relative = [p for p in patterns if not p.startswith(PREFIXES)]
    if any(fnmatchcase(name, p) for p in prefixed):
        return True
    return name.startswith("generator.") and any(fnmatchcase(name[len("generator."):], p) for p in relative)


def frozen_discriminator_blocks(model, freeze_d: int) -> list[str]:
    """FreezeD (Mo et al. 2020, §3): the names of D's first ``freeze_d`` blocks from the input.

    Block k is ``convs.k`` of :class:`~genadapt.families.stylegan2_nets.Discriminator` (``convs.0`` = fromRGB,
    then one ResBlock per resolution); the minibatch-stddev ``final_conv`` and ``final_linear`` always train.
    """
    blocks = model.discriminator.num_blocks
    if not 0 <= freeze_d <= blocks:
        raise UserError(f"--freeze-d {freeze_d}: this discriminator has {blocks} blocks (fromRGB + {blocks - 1} ResBlocks); use 0..{blocks}")
    return [f"discriminator.convs.{k}.*" for k in range(freeze_d)]


def freezed_default(model) -> int:
    """FreezeD's default (official code ``--feature_loc 3``): only the last two ResBlocks, the final 4x4
    conv and the linear head of D train, i.e. all blocks but the last two are frozen."""
    return max(model.discriminator.num_blocks - 2, 0)


def _set_trainable(model, wanted) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(wanted(name)))


def _save_model(model, out: Path, technique: str) -> list[Path]:
    from genadapt.families import gan

    return [gan.save(model, Path(out) / "model", extra={"technique": technique})]


# ----------------------------------------------------------------------------- full / freeze


class FullFineTuning:
    """TGAN (Wang et al. 2018, "Transferring GANs"): every weight of G and D trains from the source."""

    name = "full"

    def __init__(self, freeze_d: int | None = None):
        if freeze_d:
            raise UserError("--freeze-d: --train full trains every weight; use --train freeze --freeze-d N for FreezeD")
        self.resolved: dict = {"freeze_d": 0}

    def prepare(self, model) -> None:
        _set_trainable(model, lambda name: name.startswith(("generator.", "discriminator.")))

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return _save_model(model, out, self.name)


class SelectiveFineTuning:
    """FreezeD (Mo, Cho, Shin 2020, §3) plus layer selection in G.

    D: its first ``freeze_d`` blocks from the input are frozen (default: FreezeD's own, all but the last two
    ResBlocks); G: parameters that match ``trainable`` patterns or a ``preset`` (``mapping``, ``modulation``,
    ``synthesis``) train, every G weight if none is given; ``frozen`` patterns win over both.
    """

    name = "freeze"

    def __init__(self, trainable: list[str] | None = None, frozen: list[str] | None = None,
                 preset: str | None = None, freeze_d: int | None = None):
        trainable = list(trainable or [])
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"--preset {preset}: unknown for GANs; choose one of {', '.join(PRESETS)}")
            trainable += PRESETS[preset]
        self.trainable_patterns = trainable
        self.frozen_patterns = list(frozen or [])
        self.freeze_d = freeze_d
        self.resolved: dict = {}

    def prepare(self, model) -> None:
        freeze_d = freezed_default(model) if self.freeze_d is None else self.freeze_d
        self.resolved = {"freeze_d": freeze_d}
        frozen = self.frozen_patterns + frozen_discriminator_blocks(model, freeze_d)
        g_patterns = [p for p in self.trainable_patterns if not p.startswith(PREFIXES[1:])]
        d_patterns = [p for p in self.trainable_patterns if p.startswith("discriminator.")]

        def wanted(name: str) -> bool:
            if _matches(name, frozen):
                return False
            if name.startswith("generator."):
                return _matches(name, g_patterns) if g_patterns else True
            return _matches(name, d_patterns) if d_patterns else name.startswith("discriminator.")

        _set_trainable(model, wanted)
        if not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("generator.")):
            examples = ", ".join(n for n, _ in list(model.generator.named_parameters())[:3])
            raise UserError(f"no generator parameter matches the trainable/freeze patterns; names look like {examples}")

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return _save_model(model, out, self.name)


# ----------------------------------------------------------------------------- LoRA


class LoRADelta(nn.Module):
    """LoRA (Hu et al. 2021, eq. 3) as a weight parametrization: W ↦ W + (α / r) · B A.

    ``W`` is the layer's stored weight (for StyleGAN2's equalized-lr layers, the N(0, 1) weight before the
    run-time 1/sqrt(fan_in) scale, so the delta lives on the same scale as W); conv kernels
    [1, out, in, k, k] are factored as the [out, in·k·k] matrix. A ~ N(0, (1/r)²) (peft's ``gaussian``
    init), B = 0, so the adapted G starts exactly equal to the base.
    """

    def __init__(self, weight: Tensor, rank: int, alpha: float):
        super().__init__()
        out = weight.shape[1] if weight.ndim == 5 else weight.shape[0]
        fan_in = weight.numel() // out
        self.lora_A = nn.Parameter(torch.randn(rank, fan_in) / rank)
        self.lora_B = nn.Parameter(torch.zeros(out, rank))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        return weight + self.scale * (self.lora_B @ self.lora_A).view_as(weight)


def lora_layers(generator: nn.Module) -> dict[str, LoRADelta]:
    """{module name: its LoRADelta} for every adapted layer of ``generator``."""
    found = {}
    for name, module in generator.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LoRADelta):
                    found[name] = p
    return found


def has_lora(generator: nn.Module) -> bool:
    return bool(lora_layers(generator))


@contextlib.contextmanager
def lora_disabled(generator: nn.Module):
    """Run the base generator: adapters switched off (no copy), back on afterwards."""
    layers = list(lora_layers(generator).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield generator
    finally:
        for layer in layers:
            layer.enabled = True


def inject_lora(generator: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> list[str]:
    """Add a LoRADelta to every EqualLinear / ModulatedConv2d of ``generator`` whose name matches ``targets``
    (fnmatch; default all). Returns the adapted module names."""
    targets = targets or ["*"]
    chosen = [
        name for name, module in generator.named_modules()
        if isinstance(module, (EqualLinear, ModulatedConv2d)) and any(fnmatchcase(name, t) for t in targets)
    ]
    if not chosen:
        raise UserError(f"--lora-targets {','.join(targets)}: no EqualLinear/ModulatedConv2d of the generator matches (e.g. 'convs.*', 'style.*', '*.modulation')")
    modules = dict(generator.named_modules())
    for name in chosen:
        module = modules[name]
        parametrize.register_parametrization(module, "weight", LoRADelta(module.weight, rank, alpha))
    return chosen


def merge_lora(generator: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (α/r) B A), in place; the output is unchanged."""
    adapted = set(lora_layers(generator))
    for name, module in list(generator.named_modules()):
        if name in adapted:
            merged = module.weight.detach().clone()
            requires_grad = module.parametrizations.weight.original.requires_grad
            # What parametrize.remove_parametrizations does, except deleting the `weight` property from the
            # module's class: deep copies (G_ema is one) share that class, and would lose their weights.
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            module.weight = nn.Parameter(merged, requires_grad=requires_grad)
    return generator


def lora_state(generator: nn.Module) -> dict[str, Tensor]:
    return {
        f"{name}.{key}": getattr(layer, key).detach().clone()
        for name, layer in lora_layers(generator).items()
        for key in ("lora_A", "lora_B")
    }


def load_lora(generator: nn.Module, path: Path) -> nn.Module:
    """Inject and fill the adapters saved by :meth:`GANLoRA.save` (``lora.safetensors``)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    names = sorted({key.rsplit(".", 1)[0] for key in state})
    inject_lora(generator, int(metadata["rank"]), float(metadata["alpha"]), names)
    layers = lora_layers(generator)
    with torch.no_grad():
        for key, value in state.items():
            name, attribute = key.rsplit(".", 1)
            getattr(layers[name], attribute).copy_(value)
    return generator


class GANLoRA:
    """LoRA on the generator (Hu et al. 2021, eq. 3 on StyleGAN2's EqualLinear and ModulatedConv2d weights).

    Trains: the A, B factors in G and the discriminator (all but its first ``--freeze-d`` blocks, default 0).
    G's own weights never change; the artifact is ``lora.safetensors`` (the EMA generator's factors), which
    :func:`load_lora` re-applies and :func:`merge_lora` folds into plain weights.
    """

    name = "lora"

    def __init__(self, rank: int = 4, alpha: float | None = None, targets: list[str] | None = None, freeze_d: int | None = None):
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)  # alpha == rank: scale 1, as diffusers
        self.targets = list(targets or ["*"])
        self.freeze_d = freeze_d or 0
        self.resolved: dict = {"freeze_d": self.freeze_d}

    def prepare(self, model) -> None:
        frozen = frozen_discriminator_blocks(model, self.freeze_d)
        self.layers = inject_lora(model.generator, self.rank, self.alpha, self.targets)
        _set_trainable(model, lambda name: ("lora_" in name and name.startswith("generator."))
                       or (name.startswith("discriminator.") and not _matches(name, frozen)))

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.runs import save_safetensors

        metadata = {"format": "genadapt-stylegan2-lora", "rank": str(self.rank), "alpha": str(self.alpha), "base": model.base}
        return [save_safetensors(Path(out) / "lora.safetensors", lora_state(model.g_ema), metadata)]


# ----------------------------------------------------------------------------- MineGAN miner


class LatentMiner(nn.Module):
    """MineGAN's miner (Wang et al. CVPR 2020, §3.1): a small MLP M whose z' = M(z) feeds the frozen G, trained
    adversarially, min_M max_D E[log D(x)] + E[log(1 − D(G(M(z))))].

    FreezeD's MineGAN baseline uses Linear(d, d) - ReLU - Linear(d, d); we add a residual connection with the
    last layer initialised to zero, z' = z + MLP(z), so mining starts from the source distribution
    (G(M(z)) = G(z) at step 0), as LoRA's B = 0 does.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.net(z)


def load_miner(path: Path) -> LatentMiner:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    miner = LatentMiner(int(metadata["style_dim"]), int(metadata["hidden"]))
    miner.load_state_dict(state)
    return miner.eval().requires_grad_(False)


class Miner:
    """MineGAN (Wang et al. 2020): learn where to sample the frozen G's latent space.

    Trains: the miner and the discriminator (all but its first ``--freeze-d`` blocks, default 0), as MineGAN
    and FreezeD's ``--miner`` baseline do; every G weight stays bitwise the source. The artifact is
    ``miner.safetensors``.
    """

    name = "embedding"

    def __init__(self, freeze_d: int | None = None):
        self.freeze_d = freeze_d or 0
        self.resolved: dict = {"freeze_d": self.freeze_d}

    def prepare(self, model) -> None:
        frozen = frozen_discriminator_blocks(model, self.freeze_d)
        model.latent_map = LatentMiner(model.style_dim).to(model.generator.input.input.device)
        _set_trainable(model, lambda name: name.startswith("latent_map.")
                       or (name.startswith("discriminator.") and not _matches(name, frozen)))

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.runs import save_safetensors

        miner = model.latent_map
        metadata = {"format": "genadapt-stylegan2-miner", "style_dim": str(model.style_dim),
                    "hidden": str(miner.net[0].out_features), "base": model.base}
        return [save_safetensors(Path(out) / "miner.safetensors", dict(miner.state_dict()), metadata)]


def make_parameter_technique(config):
    """The GAN parameter technique a config names (``--train``)."""
    if config.train == "full":
        return FullFineTuning(freeze_d=config.freeze_d)
    if config.train == "freeze":
        return SelectiveFineTuning(config.trainable, config.freeze, config.preset, config.freeze_d)
    if config.train == "lora":
        return GANLoRA(config.rank, config.alpha, config.lora_targets, config.freeze_d)
    return Miner(freeze_d=config.freeze_d)
