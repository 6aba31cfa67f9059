"""Run configs: one pydantic model, filled from a YAML/TOML file and CLI flags, validated at the edge.

The resolved config is written to every run folder as `config.yaml`; rerunning with
`--config RUN/config.yaml` reproduces the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from genadapt.errors import UserError

PARAMETER_TECHNIQUES = ("full", "freeze", "lora", "embedding")
LOSS_TECHNIQUES = ("prior", "ewc", "relational", "feature", "cdc", "perceptual", "l2sp")
# Learning rates users of diffusers/kohya start from for each technique (diffusion_anchors.md §1).
DEFAULT_LR = {"full": 1e-5, "freeze": 1e-5, "lora": 1e-4, "embedding": 5e-3}


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
    train: Literal["full", "freeze", "lora", "embedding"] = "lora"
    loss: list[LossSpec] = Field(default_factory=list)
    steps: int = Field(200, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    augment: str = "none"
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
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_text_encoder: bool = False
    # embedding (textual inversion)
    token: str = "<genadapt>"
    init_token: str | None = None
    vectors: int = Field(1, ge=1)
    # loss techniques
    prior_prompt: str | None = None
    num_class_images: int = Field(50, ge=1)
    ewc_samples: int = Field(32, ge=1)
    # bookkeeping
    checkpointing_steps: int = Field(100, ge=1)
    sample_every: int = Field(0, ge=0)
    validation_prompt: str | None = None
    num_validation_images: int = Field(8, ge=1)
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
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.train]

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
