"""Layer freezing / selective fine-tuning: only parameters that match the user's patterns train.

Patterns are shell-style (`fnmatch`) over parameter names. Diffusion: in full (`unet.up_blocks.*`,
`text_encoder.*`) or relative to the UNet (`up_blocks.*`). GAN: a pattern that starts with a module prefix
(`generator.`, `discriminator.`) matches full names; any other pattern matches the generator's own names
(`style.*`, `convs.3.*`), because G is what users pick layers of. FreezeD (Mo, Cho, Shin 2020, §3) is the
discriminator's side of the same rule: D's first blocks from the input stay frozen.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from genadapt.config import setting
from genadapt.errors import UserError
from genadapt.techniques import Implementation, Technique, register, set_trainable, trainable
from genadapt.techniques.full import GAN_LR, SINGLE_FILE_HELP, load_diffusion_pipeline_run, load_gan_model_run, save_gan_model, save_pipeline_run

PRESETS = {
    "attention": ["*attentions.*"],  # transformer blocks: self- and cross-attention, their norms and projections
    "cross-attention": ["*attn2.*"],
    "decoder": ["up_blocks.*", "conv_norm_out.*", "conv_out.*"],
    "encoder": ["conv_in.*", "down_blocks.*"],
    "norms": ["*norm*"],
}
# Generator layer groups (StyleGAN2 names, Karras et al. 2020 Fig. 2): the mapping network f (z -> w), the
# affine "A" blocks that turn w into per-layer styles (what BSA / FreezeD's --only_adain adapt), and the
# synthesis network g (constant input, modulated convs, noise strengths, ToRGB).
GAN_PRESETS = {
    "mapping": ["style.*"],
    "modulation": ["*.modulation.*"],
    "synthesis": ["input.*", "conv1.*", "convs.*", "to_rgb1.*", "to_rgbs.*"],
}
GAN_PREFIXES = ("generator.", "discriminator.", "latent_map.", "d_heads.")


class PatternSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trainable: list[str] = setting(list, "--train freeze: parameter patterns that train (repeatable), e.g. 'up_blocks.*'.")
    freeze: list[str] = setting(list, "--train freeze: parameter patterns kept frozen (repeatable).")
    preset: str | None = setting(None, "--train freeze: a named pattern set; diffusion attention, cross-attention, decoder, encoder, norms; GAN mapping, modulation, synthesis.")


class DiffusionPatternSettings(PatternSettings):
    """The diffusion freeze's settings: the patterns, and the single-file checkpoint (GANs have no such file)."""

    save_single_file: bool = setting(False, SINGLE_FILE_HELP)


class FreezeDSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freeze_d: int | None = setting(None, "GAN: FreezeD, the discriminator's first N blocks stay frozen.  [default: --train freeze all but the last two; lora/embedding 0]", ge=0)


class GANFreezeSettings(PatternSettings, FreezeDSettings):
    pass


def _matches(full_name: str, patterns: list[str]) -> bool:
    relative = full_name.split(".", 1)[1]
    return any(fnmatchcase(full_name, pattern) or fnmatchcase(relative, pattern) for pattern in patterns)


class DiffusionSelectiveFineTuning:
    name = "freeze"
    saves_pipeline = True  # the artifact is the whole pipeline, as large as the base
    weight_decay = 1e-2

    def __init__(self, settings: DiffusionPatternSettings):
        self.single_file = getattr(settings, "save_single_file", False)
        trainable_patterns = list(settings.trainable)
        if settings.preset is not None:
            if settings.preset not in PRESETS:
                raise UserError(f"--preset {settings.preset}: unknown; choose one of {', '.join(PRESETS)}")
            trainable_patterns += PRESETS[settings.preset]
        if not trainable_patterns and not settings.freeze:
            raise UserError("--train freeze needs --trainable PATTERN, --freeze PATTERN or --preset NAME (e.g. --trainable 'up_blocks.*')")
        self.trainable_patterns = trainable_patterns
        self.frozen_patterns = list(settings.freeze)
        self.trains_text_encoder = any(p.startswith("text_encoder") for p in self.trainable_patterns)

    def selected(self, model) -> list[str]:
        chosen = []
        for name, _ in model.named_parameters():
            in_scope = name.startswith("unet.") or self.trains_text_encoder
            wanted = _matches(name, self.trainable_patterns) if self.trainable_patterns else in_scope
            if wanted and not _matches(name, self.frozen_patterns):
                chosen.append(name)
        return chosen

    def prepare(self, model) -> None:
        if self.single_file:
            from genadapt.export.checkpoint import check_single_file

            check_single_file(model)  # before training, not after it
        chosen = set(self.selected(model))
        if not chosen:
            examples = ", ".join(name for name, _ in list(model.named_parameters())[:3])
            raise UserError(f"no parameter matches the freeze/trainable patterns; names look like {examples}")
        set_trainable(model, lambda name: name in chosen)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return save_pipeline_run(model, out, self.single_file)


def gan_matches(name: str, patterns: list[str]) -> bool:
    prefixed = [p for p in patterns if p.startswith(GAN_PREFIXES)]
    relative = [p for p in patterns if not p.startswith(GAN_PREFIXES)]
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


def train_discriminator_except_frozen(model, freeze_d: int, generator_side) -> None:
    """The generator-side tensors `generator_side(name)` picks, and every D weight but FreezeD's first blocks."""
    frozen = frozen_discriminator_blocks(model, freeze_d)
    set_trainable(model, lambda name: generator_side(name) or (name.startswith("discriminator.") and not gan_matches(name, frozen)))


class GANSelectiveFineTuning:
    """FreezeD (Mo, Cho, Shin 2020, §3) plus layer selection in G.

    D: its first ``freeze_d`` blocks from the input are frozen (default: FreezeD's own, all but the last two
    ResBlocks); G: parameters that match ``trainable`` patterns or a ``preset`` (``mapping``, ``modulation``,
    ``synthesis``) train, every G weight if none is given; ``frozen`` patterns win over both.
    """

    name = "freeze"
    weight_decay = 0.0

    def __init__(self, settings: GANFreezeSettings):
        trainable_patterns = list(settings.trainable)
        if settings.preset is not None:
            if settings.preset not in GAN_PRESETS:
                raise UserError(f"--preset {settings.preset}: unknown for GANs; choose one of {', '.join(GAN_PRESETS)}")
            trainable_patterns += GAN_PRESETS[settings.preset]
        self.trainable_patterns = trainable_patterns
        self.frozen_patterns = list(settings.freeze)
        self.freeze_d = settings.freeze_d
        self.resolved: dict = {}

    def prepare(self, model) -> None:
        freeze_d = freezed_default(model) if self.freeze_d is None else self.freeze_d
        self.resolved = {"freeze_d": freeze_d}
        frozen = self.frozen_patterns + frozen_discriminator_blocks(model, freeze_d)
        g_patterns = [p for p in self.trainable_patterns if not p.startswith(GAN_PREFIXES[1:])]
        d_patterns = [p for p in self.trainable_patterns if p.startswith("discriminator.")]

        def wanted(name: str) -> bool:
            if gan_matches(name, frozen):
                return False
            if name.startswith("generator."):
                return gan_matches(name, g_patterns) if g_patterns else True
            return gan_matches(name, d_patterns) if d_patterns else name.startswith("discriminator.")

        set_trainable(model, wanted)
        if not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("generator.")):
            examples = ", ".join(n for n, _ in list(model.generator.named_parameters())[:3])
            raise UserError(f"no generator parameter matches the trainable/freeze patterns; names look like {examples}")

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return save_gan_model(model, out, self.name)


register(Technique(
    name="freeze",
    kind="parameter",
    summary="only parameters matching patterns or a preset train (FreezeD for GANs)",
    families={
        "diffusion": Implementation(
            build=DiffusionSelectiveFineTuning, settings=DiffusionPatternSettings, learning_rate=1e-5,
            compare={"train": "freeze", "preset": "attention", "learning_rate": 2e-4}, load=load_diffusion_pipeline_run,
        ),
        # FreezeD with its default block count.
        "gan": Implementation(build=GANSelectiveFineTuning, settings=GANFreezeSettings, learning_rate=GAN_LR, compare={"train": "freeze"}, load=load_gan_model_run),
    },
))
