"""Run configs: one pydantic model, filled from a YAML/TOML file and CLI flags, validated at the edge.

The resolved config is written to every run folder as `config.yaml`; rerunning with
`--config RUN/config.yaml` reproduces the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genadapt.errors import UserError

PARAMETER_TECHNIQUES = ("full", "freeze", "lora", "embedding")
LOSS_TECHNIQUES = ("prior", "ewc", "relational", "feature", "cdc", "perceptual", "l2sp")
# Learning rates users of diffusers/kohya start from for each technique (diffusion_anchors.md §1).
DEFAULT_LR = {"full": 1e-5, "freeze": 1e-5, "lora": 1e-4, "embedding": 5e-3}
GAN_LR = 0.002  # StyleGAN2 / CDC / FreezeD Adam lr for every GAN technique (gan_anchors.md §7)
# Settings left unset take the family's default (filled in by AdaptConfig, so config.yaml shows them).
FAMILY_DEFAULTS = {
    "diffusion": {"train": "lora", "steps": 200, "augment": "none", "ewc_samples": 32, "num_validation_images": 8,
                  "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"]},
    # GAN: FreezeD (Mo et al. 2020) as the default technique; 1k steps (CDC README: close domains best at ~1k
    # iterations); DiffAugment color,translation,cutout (Zhao et al. 2020, recommended for <= hundreds of
    # images); 1,024 generated images for EWC's Fisher (Li et al. 2020 use a few thousand); LoRA on every layer.
    "gan": {"train": "freeze", "steps": 1000, "augment": "diffaugment", "ewc_samples": 1024, "num_validation_images": 32,
            "lora_targets": ["*"]},
}
GAN_ONLY = ("freeze_d", "r1_gamma")


class LossSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float | None = None  # None: the technique's documented default

    @classmethod
    def parse(cls, text: str) -> "LossSpec":
        name, _, weight = text.partition(":")
        try:
            return cls(name=name.strip(), weight=float(weight) if weight else None)
        except ValueError:
            raise UserError(f"--loss {text}: weight must be a number, e.g. --loss ewc:5000") from None


class AdaptConfig(BaseModel):
    """Everything one `genadapt adapt` run needs; every field is a CLI flag of the same name."""

    model_config = ConfigDict(extra="forbid")

    base: str = "pocket-sd"
    data: str
    caption: str | None = None
    shots: int | None = None
    seed: int = 0
    train: Literal["full", "freeze", "lora", "embedding"] | None = None
    loss: list[LossSpec] = Field(default_factory=list)
    steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    augment: str | None = None
    fit: Literal["crop", "pad"] = "crop"
    background: str = "white"
    strict: bool = False
    # full / freeze
    train_text_encoder: bool = False
    trainable: list[str] = Field(default_factory=list)
    freeze: list[str] = Field(default_factory=list)
    preset: str | None = None
    # lora
    rank: int = Field(4, ge=1)
    alpha: float | None = None
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_dora: bool = False
    use_rslora: bool = False
    lora_targets: list[str] | None = None
    lora_text_encoder: bool = False
    # embedding (textual inversion)
    token: str = "<genadapt>"
    init_token: str | None = None
    vectors: int = Field(1, ge=1)
    # loss techniques
    prior_prompt: str | None = None
    num_class_images: int = Field(50, ge=1)
    ewc_samples: int | None = Field(None, ge=1)
    # GAN bases only
    freeze_d: int | None = Field(None, ge=0)  # FreezeD: D's first N blocks frozen (None: FreezeD's default with --train freeze, else 0)
    r1_gamma: float | None = Field(None, ge=0)  # None: the base's pretraining γ if recorded, else 10 (StyleGAN2 256 px / CDC)
    allow_pickle: bool = False  # read a rosinality .pt base (torch.load weights_only=True)
    # bookkeeping
    checkpointing_steps: int = Field(100, ge=1)
    sample_every: int = Field(0, ge=0)
    validation_prompt: str | None = None
    num_validation_images: int | None = Field(None, ge=1)
    sample_steps: int = Field(25, ge=1)
    guidance_scale: float = 4.0
    out: Path

    @field_validator("loss", mode="before")
    @classmethod
    def _parse_losses(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [LossSpec.parse(item) if isinstance(item, str) else item for item in items]

    @field_validator("loss")
    @classmethod
    def _known_losses(cls, value):
        for spec in value:
            if spec.name not in LOSS_TECHNIQUES:
                raise ValueError(f"unknown loss {spec.name!r}; choose from {', '.join(LOSS_TECHNIQUES)}")
        return value

    @property
    def family(self) -> str:
        from genadapt.families.gan import is_gan_base

        return "gan" if is_gan_base(self.base) else "diffusion"

    @model_validator(mode="after")
    def _family_defaults(self):
        family = self.family
        if family == "diffusion":
            given = [name for name in GAN_ONLY if getattr(self, name) is not None] + (["allow_pickle"] if self.allow_pickle else [])
            if given:
                raise ValueError(f"--{given[0].replace('_', '-')} applies to GAN bases only (pocket-stylegan2, a StyleGAN2 folder or .pt)")
        for name, value in FAMILY_DEFAULTS[family].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        return self

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return GAN_LR if self.family == "gan" else DEFAULT_LR[self.train]

    @property
    def lora_alpha(self) -> float:
        # diffusers' convention alpha == rank (scale 1); kohya's default alpha=1 would silently scale by 1/rank.
        return self.alpha if self.alpha is not None else float(self.rank)


def read_config_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            return tomllib.loads(text)
        import yaml

        data = yaml.safe_load(text) or {}
    except Exception as exc:  # any parser error is the user's file
        raise UserError(f"--config {path}: cannot parse ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def build_config(model: type[BaseModel], file_values: dict, cli_values: dict):
    """File values, overridden by the CLI flags the user actually gave; one-line error on the first problem."""
    values = {**file_values, **{key: value for key, value in cli_values.items() if value is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "config"
        flag = "--" + field.replace("_", "-")
        raise UserError(f"{flag}: {error['msg']}") from None
