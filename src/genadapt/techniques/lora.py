"""LoRA (Hu et al. 2021, eq. 3): W' = W + (alpha / r) · B A with A ∈ R^{r×k}, B ∈ R^{d×r}, B initialised to 0.

Diffusion: through peft on the UNet (and the text encoders with `--lora-text-encoder`); DoRA (Liu et al. 2024)
adds a learned magnitude, rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r). GAN: a weight parametrization
on StyleGAN2's EqualLinear and ModulatedConv2d layers (:class:`LoRADelta`). The base weights never change;
the artifact is the adapter alone.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch.nn.utils import parametrize

from genadapt.config import setting
from genadapt.errors import UserError
from genadapt.families import AdapterLayer
from genadapt.techniques import Implementation, Technique, register, set_trainable, trainable
from genadapt.techniques.freeze import FreezeDSettings, train_discriminator_except_frozen
from genadapt.techniques.full import GAN_LR

ADAPTER = "genadapt"
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # as diffusers' DreamBooth LoRA
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class RankSettings(BaseModel):
    """What every low-rank adapter reads (LoRA, LoHa, LoKr)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = setting(4, "Adapter rank r.", ge=1, le=4096, aliases=("--network-dim",))
    alpha: float | None = setting(None, "Adapter alpha; the update is scaled by alpha / r.  [default: rank, i.e. scale 1 as diffusers]", gt=0, allow_inf_nan=False, aliases=("--network-alpha",))

    @property
    def resolved_alpha(self) -> float:
        # diffusers' convention alpha == rank (scale 1); kohya's default alpha=1 would silently scale by 1/rank.
        return float(self.alpha if self.alpha is not None else self.rank)


class LoRASettings(RankSettings):
    lora_dropout: float = setting(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    use_dora: bool = setting(False, "DoRA: weight-decomposed LoRA (Liu et al. 2024).")
    use_rslora: bool = setting(False, "rsLoRA: scale alpha / sqrt(rank) (Kalajdzievski 2023).")
    lora_targets: list[str] = setting(lambda: list(ATTENTION_TARGETS), "Module names the adapter wraps (repeatable).  [default: to_q to_k to_v to_out.0; GAN: every layer]")
    lora_text_encoder: bool = setting(False, "Also put adapters on the text encoder(s) (q/k/v/out projections).")
    train_text_encoder: bool = setting(False, "--train lora: the same as --lora-text-encoder, as diffusers' LoRA scripts spell it; --train full: also train the text encoder(s).")


class GANLoRASettings(RankSettings, FreezeDSettings):
    lora_targets: list[str] = setting(lambda: ["*"], "Generator layers the adapter wraps, fnmatch patterns (e.g. 'convs.*', '*.modulation').  [default: every layer]")


class LoRA:
    name = "lora"
    weight_decay = 1e-2

    def __init__(self, settings: LoRASettings):
        self.settings = settings
        self.rank = settings.rank
        self.alpha = settings.resolved_alpha
        self.use_dora = settings.use_dora
        self.use_rslora = settings.use_rslora
        self.targets = list(settings.lora_targets)
        self.trains_text_encoder = settings.lora_text_encoder or settings.train_text_encoder

    def peft_config(self, targets):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.settings.lora_dropout,
            target_modules=targets,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapted model starts equal to the base
        )

    @property
    def scale(self) -> float:
        """The factor on B·A that peft applies; what kohya's `alpha / r` must reproduce."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def prepare(self, model) -> None:
        inject_peft(model, self.peft_config(self.targets), self.targets, self.peft_config(TEXT_ENCODER_TARGETS) if self.trains_text_encoder else None)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.export.lora import save_lora

        return save_lora(model, self, Path(out), model.extras.get("training_metadata", {}))


def inject_peft(model, unet_config, targets: list[str], text_config=None) -> None:
    """A peft adapter (any tuner: LoRA, LoHa, LoKr) on the UNet, and on the text encoders when `text_config`
    is given; only the adapters' tensors train."""
    try:
        model.unet.add_adapter(unet_config, adapter_name=ADAPTER)
    except ValueError as exc:
        raise UserError(f"--lora-targets {','.join(targets)}: {str(exc).splitlines()[0]}") from None
    if text_config is not None:
        from peft import inject_adapter_in_model

        # transformers' own add_adapter demands a newer peft than PyPI has; peft injects the same layers.
        for _, encoder in model.text_encoders:
            inject_adapter_in_model(text_config, encoder, adapter_name=ADAPTER)
    from genadapt.families import adapter_parameters

    adapters = {id(p) for module in model.modules().values() for p in adapter_parameters(module)}
    for _, parameter in model.named_parameters():
        parameter.requires_grad_(id(parameter) in adapters)


def load_diffusion_lora(load_base, run: Path):
    """The base with the run's diffusers LoRA file loaded as adapter `run` at weight 1."""
    from genadapt.export.lora import DIFFUSERS_FILE

    model = load_base()
    add_lora_file(model, Path(run) / DIFFUSERS_FILE, "run", 1.0, what="run LoRA")
    return model


def add_lora_file(model, file: Path, name: str, weight: float, what: str = "--lora") -> None:
    """Load a diffusers/kohya LoRA file as adapter `name`, composed with the adapters already loaded. The file is
    checked first (`export.lora.check_lora_file`), so a bad one is a one-line UserError, never a traceback."""
    import math

    from genadapt.export.lora import check_lora_file

    file = Path(file)
    if not math.isfinite(weight):
        raise UserError(f"--lora {file}:{weight}: the weight must be a finite number, e.g. --lora {file}:0.8")
    check_lora_file(model, file, what)
    try:
        model.pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {file}: diffusers cannot load it ({first[:200]}); pass a diffusers or kohya LoRA of this base") from None
    adapters = model.extras.setdefault("adapters", {})
    adapters[name] = weight
    model.pipeline.set_adapters(list(adapters), adapter_weights=list(adapters.values()))


# ----------------------------------------------------------------------------- GAN


class LoRADelta(AdapterLayer, nn.Module):
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

    def forward(self, weight: Tensor) -> Tensor:
        if not self.adapters_enabled:
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


def inject_lora(generator: nn.Module, rank: int, alpha: float, targets: list[str] | None = None) -> list[str]:
    """Add a LoRADelta to every EqualLinear / ModulatedConv2d of ``generator`` whose name matches ``targets``
    (fnmatch; default all). Returns the adapted module names."""
    from genadapt.families.stylegan2_nets import EqualLinear, ModulatedConv2d

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
        parametrize.register_parametrization(module, "weight", LoRADelta(module.weight, rank, alpha).to(module.weight.device))
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
    weight_decay = 0.0

    def __init__(self, settings: GANLoRASettings):
        self.rank = settings.rank
        self.alpha = settings.resolved_alpha
        self.targets = list(settings.lora_targets)
        self.freeze_d = settings.freeze_d or 0
        self.resolved: dict = {"freeze_d": self.freeze_d}

    def prepare(self, model) -> None:
        self.layers = inject_lora(model.generator, self.rank, self.alpha, self.targets)
        train_discriminator_except_frozen(model, self.freeze_d, lambda name: "lora_" in name and name.startswith("generator."))

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.runs import save_safetensors

        metadata = {"format": "genadapt-stylegan2-lora", "rank": str(self.rank), "alpha": str(self.alpha), "base": model.base}
        return [save_safetensors(Path(out) / "lora.safetensors", lora_state(model.g_ema), metadata)]


def load_gan_lora(load_base, run: Path):
    model = load_base()
    load_lora(model.g_ema, Path(run) / "lora.safetensors")
    return model


register(Technique(
    name="lora",
    kind="parameter",
    summary="low-rank adapters; the base never changes (composable at sampling)",
    families={
        "diffusion": Implementation(
            build=LoRA, settings=LoRASettings, learning_rate=1e-4,
            # benchmarks/lora_learning_rate.py: at 1e-3 it copied the shots and scored worse than the base.
            compare={"train": "lora", "rank": 4, "learning_rate": 1e-4}, load=load_diffusion_lora,
        ),
        "gan": Implementation(build=GANLoRA, settings=GANLoRASettings, learning_rate=GAN_LR, compare={"train": "lora", "rank": 4}, load=load_gan_lora),
    },
))
