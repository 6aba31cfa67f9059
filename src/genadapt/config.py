"""Run configs: pydantic models filled from a YAML/TOML file and CLI flags, validated at the edge.

The config is the truth. A field is read by the code the run uses, or refused:

* the settings every run reads are fields of :class:`AdaptConfig`; a field that only one family reads
  says so (`families`) and is refused on the other family;
* a technique's own settings live in its registered settings model (`genadapt.techniques`); such a flag
  is refused unless that technique is in the run ("--use-dora applies to --train lora on diffusion bases").

The resolved config, only what the run used, is written to every run folder as `config.yaml`;
rerunning with `--config RUN/config.yaml` reproduces the run.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from genadapt.errors import UserError


def setting(default: Any = None, help: str = "", families: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (),
            kinds: tuple[str, ...] | None = None, **constraints):
    """A config field: its help text, the families (and distill kinds) that read it (None: all), extra flag spellings."""
    extra = {"families": list(families) if families else None, "aliases": list(aliases), "kinds": list(kinds) if kinds else None}
    if default in (list, dict) or (callable(default) and not isinstance(default, type)):
        return Field(default_factory=default, description=help, json_schema_extra=extra, **constraints)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def field_families(model: type[BaseModel], name: str) -> list[str] | None:
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("families")


def field_kinds(model: type[BaseModel], name: str) -> list[str] | None:
    extra = model.model_fields[name].json_schema_extra or {}
    return extra.get("kinds")


def refuse_unread(config: BaseModel, family: str, kind: str | None = None) -> None:
    """A field given with a value other than its default, on a family (or distill kind) that does not read it."""
    model = type(config)
    for name in config.model_fields_set:
        if name not in model.model_fields:
            continue
        default = model.model_fields[name].get_default(call_default_factory=True)
        if getattr(config, name) in (None, default):
            continue
        families, kinds = field_families(model, name), field_kinds(model, name)
        if families and family not in families:
            raise UserError(f"{flag(name)} applies to {' and '.join(families)} {'teachers' if kind else 'bases'}; this one is a {family} model")
        if kind and kinds and kind not in kinds:
            raise UserError(f"{flag(name)} applies to --kind {' and '.join(kinds)}; this run is --kind {kind}")


def field_aliases(model: type[BaseModel], name: str) -> list[str]:
    extra = model.model_fields[name].json_schema_extra or {}
    return list(extra.get("aliases") or [])


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


DIFFUSION, GAN = ("diffusion",), ("gan",)


class AdaptConfig(BaseModel):
    """Everything one `genadapt adapt` run reads. Technique settings (`rank`, `use_dora`, `freeze_d`, ...) are
    passed flat beside these fields and validated by the techniques the run uses."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: str = setting("pocket-sd", "pocket-sd, pocket-stylegan2, a diffusers SD/SDXL pipeline folder, a StyleGAN2 model folder or rosinality .pt, or a hub id.", aliases=("--pretrained-model-name-or-path",))
    data: str = setting(..., "Folder of images, or builtin:... spec.", aliases=("--instance-data-dir", "--train-data-dir"))
    out: Path = setting(..., "Run folder; rerun the same command to resume.", aliases=("--output-dir",))
    output_name: str | None = setting(None, "File stem of the artifacts (the kohya LoRA file, the embedding file and its trigger word, the checkpoint).  [default: the run folder's name]", DIFFUSION)
    caption: str | None = setting(None, "Prompt for images without a caption of their own (a NAME.txt or metadata row).", DIFFUSION)
    instance_prompt: str | None = setting(None, "Prompt for every image, replacing their own captions (diffusers' DreamBooth --instance_prompt).", DIFFUSION)
    caption_extension: str = setting(".txt", "Sidecar caption extension, kohya's NAME.txt beside NAME.png.", DIFFUSION)
    caption_column: str = setting("text", "Caption column of metadata.jsonl / metadata.csv (Hugging Face imagefolder).", DIFFUSION)
    shots: int | None = setting(None, "Use a deterministic k-shot subset of the data.", ge=1)
    seed: int = setting(0, "Seed for shots, initialisation, noise and batches.", ge=0, lt=2**63)
    train: str | None = setting(None, "The parameter technique (what trains); --help lists them.  [default: the family's]")
    loss: list[LossSpec] = setting(list, "Loss technique NAME[:WEIGHT] (repeatable); --help lists them.")
    steps: int | None = setting(None, "Optimisation steps.  [default: the family's]", ge=1, aliases=("--max-train-steps",))
    learning_rate: float | None = setting(None, "Optimiser step size (a prodigy run's d multiplier).  [default: the technique's for this family; prodigy 1]", gt=0, aliases=("--lr",))
    batch_size: int = setting(4, "Images per step and process.", ge=1, aliases=("--train-batch-size",))
    gradient_accumulation_steps: int = setting(1, "Accumulate gradients over this many batches before each optimiser step.", ge=1)
    max_grad_norm: float | None = setting(None, "Clip the gradient norm (0: off).  [default: diffusion 1, GAN 0 as StyleGAN2]", ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "Autocast precision (fp16 needs a GPU; bf16 also runs on CPUs).")
    gradient_checkpointing: bool = setting(False, "Recompute UNet activations in the backward pass (less memory).", DIFFUSION)
    augment: str | None = setting(None, "Diffusion: none | flip | diffaugment[:policy] (pixel space, before encoding). GAN: none | diffaugment[:policy] | ada[:target].  [default: diffusion none, GAN diffaugment]")
    fit: Literal["crop", "pad"] = setting("crop", "Make images square by center-cropping or padding.")
    background: str = setting("white", "Colour transparent images are composited on.")
    strict: bool = setting(False, "Stop on any unusable image instead of skipping it.")
    cpu: bool = setting(False, "Train on the CPU even when a GPU is present.")
    allow_large_artifact: bool = setting(False, "Allow an adapter artifact above 2 GB (a typo like --rank 100000 is refused otherwise).", DIFFUSION)
    # training sizes, data variation, schedule and optimiser (docs/training.md)
    resolution: int | None = setting(None, "Training resolution (with --enable-bucket: buckets of about resolution² pixels).  [default: the base's native size]", DIFFUSION, ge=8)
    enable_bucket: bool = setting(False, "Aspect-ratio bucketing (kohya): each image trains at the bucket nearest its aspect ratio; batches are drawn within a bucket.", DIFFUSION)
    min_bucket_reso: int | None = setting(None, "--enable-bucket: the shortest bucket side.  [default: resolution / 2]", DIFFUSION, ge=8)
    max_bucket_reso: int | None = setting(None, "--enable-bucket: the longest bucket side.  [default: resolution x 2]", DIFFUSION, ge=8)
    bucket_reso_steps: int | None = setting(None, "--enable-bucket: bucket sides are multiples of this.  [default: the base's latent step (VAE factor x UNet downsampling): 64 px for SD 1.x/2.x, 32 px for SDXL, 16 px for pocket-sd]", DIFFUSION, ge=1)
    center_crop: bool = setting(False, "Crop at the center (genadapt's default; diffusers crops at random without it).", DIFFUSION)
    random_crop: bool = setting(False, "Crop at a random position drawn every step (images are then VAE-encoded every step).", DIFFUSION)
    random_flip: bool = setting(False, "Train on each image and its mirror: the same as --augment flip (kohya's --flip_aug).", DIFFUSION, aliases=("--flip-aug",))
    caption_dropout: float = setting(0.0, "Probability that a caption is the empty prompt, per image and step (kohya's caption_dropout_rate).", DIFFUSION, ge=0, le=1, aliases=("--caption-dropout-rate",))
    shuffle_caption: bool = setting(False, "Shuffle each caption's comma-separated tags every step, all but the first --keep-tokens (kohya).", DIFFUSION)
    keep_tokens: int = setting(0, "--shuffle-caption: the leading tags kept in place.", DIFFUSION, ge=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] = setting("constant", "Learning-rate schedule (diffusers' get_scheduler).")
    lr_warmup_steps: int = setting(0, "Linear warmup over this many optimiser steps (not --lr-scheduler constant).", ge=0)
    lr_num_cycles: int = setting(1, "--lr-scheduler cosine_with_restarts: the number of hard restarts.", ge=1, aliases=("--lr-scheduler-num-cycles",))
    lr_power: float = setting(1.0, "--lr-scheduler polynomial: the power.", gt=0, aliases=("--lr-scheduler-power",))
    optimizer: Literal["adamw", "adam", "adamw8bit", "prodigy", "adafactor"] = setting("adamw", "adamw, adam, adamw8bit (bitsandbytes, CUDA), prodigy, adafactor; GAN runs: adam or adamw.", aliases=("--optimizer-type",))
    adam_beta1: float | None = setting(None, "Adam's β1 (diffusers' --adam_beta1).  [default: diffusion 0.9, GAN 0 (StyleGAN2's)]", ge=0, lt=1)
    adam_beta2: float | None = setting(None, "Adam's β2 (diffusers' --adam_beta2).  [default: diffusion 0.999, GAN 0.99 (StyleGAN2's)]", ge=0, lt=1)
    adam_weight_decay: float | None = setting(None, "AdamW's decoupled weight decay (diffusers' --adam_weight_decay).  [default: the technique's, 1e-2 or 0]", ge=0)
    adam_epsilon: float = setting(1e-8, "Adam's ε (diffusers' --adam_epsilon): larger values damp the steps of parameters whose gradients are tiny.", gt=0)
    snr_gamma: float | None = setting(None, "Min-SNR loss weighting (Hang et al. 2023) with this gamma; 5 is the paper's.", DIFFUSION, gt=0, aliases=("--min-snr-gamma",))
    noise_offset: float = setting(0.0, "Offset noise (Guttenberg): add this times one normal draw per image and channel to the noise.", DIFFUSION, ge=0)
    use_ema: bool = setting(False, "Keep an EMA of the trained tensors and save it as the artifact (diffusers' EMAModel).", DIFFUSION)
    ema_decay: float = setting(0.9999, "--use-ema: the decay, capped by EMAModel's warm-up n / (9 + n) at the n-th optimiser step (the first copies the weights).", DIFFUSION, gt=0, lt=1)
    report_to: Literal["none", "tensorboard"] = setting("none", "Also log loss terms, learning rate and sample grids as TensorBoard events in RUN/logs.", aliases=("--log-with",))
    # bookkeeping
    checkpointing_steps: int = setting(100, "Checkpoint every N steps (atomic; rerun to resume).", ge=1)
    sample_every: int = setting(0, "Write a sample grid every N steps (0: only at the end).", ge=0)
    num_validation_images: int | None = setting(None, "Images in each sample grid.  [default: diffusion 8, GAN 32]", ge=1)
    validation_prompt: str | None = setting(None, "Prompt for sample grids.  [default: the training captions]", DIFFUSION)
    sample_steps: int = setting(25, "Sampler steps for grids and generated class/Fisher images.", DIFFUSION, ge=1)
    guidance_scale: float = setting(4.0, "Classifier-free guidance for grids and generated images.", DIFFUSION, ge=0)
    # what users of diffusers' example scripts type
    scale_lr: bool = setting(False, "Multiply the learning rate by batch size x accumulation steps x processes (diffusers' --scale_lr).")
    validation_epochs: int | None = setting(None, "Write a sample grid every N passes over the shots (diffusers' --validation_epochs; the step form is --sample-every).", ge=1)
    use_8bit_adam: bool = setting(False, "Same as --optimizer adamw8bit (diffusers' flag; bitsandbytes on CUDA).")
    resume_from_checkpoint: str | None = setting(None, "latest: resume from the run folder's checkpoint, which genadapt does anyway when --out holds one.")
    push_to_hub: bool = setting(False, "Refused: genadapt never uploads; upload the run folder yourself (huggingface-cli upload).")
    # best step by validation (genadapt.recipes.validation)
    validate_every: int = setting(0, "Score the run every N steps on held-out images (KID, copy rate), keep the best state, stop early (0: off).", ge=0)
    validation: str | None = setting(None, "Held-out images for --validate-every.  [default: the images of --data that are not the shots]")
    validation_samples: int = setting(32, "Samples per validation check.", ge=4)
    patience: int = setting(4, "Stop after this many validation checks without a better score (0: never stop early).", ge=0)
    copy_ceiling: float = setting(0.05, "A validation check whose copy rate exceeds this cannot be the best step.", ge=0, le=1)
    # GAN bases only
    r1_gamma: float | None = setting(None, "R1 weight.  [default: the base's pretraining value, else 10]", GAN, ge=0)
    allow_pickle: bool = setting(False, "Allow a rosinality .pt base, a pickle: read with torch.load(weights_only=True), the restricted unpickler.", GAN)
    # what the techniques read: {field: value} as given, validated into `sections`
    technique_values: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    _sections: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_technique_values(cls, values):
        if not isinstance(values, dict):
            return values
        own = {k: v for k, v in values.items() if k in cls.model_fields}
        rest = {k: v for k, v in values.items() if k not in cls.model_fields}
        own["technique_values"] = {**dict(own.get("technique_values") or {}), **{k: v for k, v in rest.items() if v is not None}}
        return own

    @field_validator("loss", mode="before")
    @classmethod
    def _parse_losses(cls, value):
        items = [value] if isinstance(value, str) else list(value or [])
        return [LossSpec.parse(item) if isinstance(item, str) else item for item in items]

    @property
    def family(self) -> str:
        from genadapt.families import family_of

        return family_of(self.base)

    @model_validator(mode="after")
    def _resolve(self):
        from genadapt import techniques
        from genadapt.families import family_module

        family = self.family
        if self.push_to_hub:
            raise UserError("--push-to-hub: genadapt never uploads; when the run ends, upload its folder with `huggingface-cli upload USER/NAME RUN`")
        if self.resume_from_checkpoint not in (None, "latest"):
            raise UserError(f"--resume-from-checkpoint {self.resume_from_checkpoint}: genadapt resumes from the --out folder's own checkpoint; pass latest or leave it out")
        if self.use_8bit_adam:
            if self.optimizer not in ("adamw", "adamw8bit"):
                raise UserError(f"--use-8bit-adam and --optimizer {self.optimizer} disagree; pass one of them")
            self.optimizer = "adamw8bit"
        if self.validation_epochs is not None and self.sample_every:
            raise UserError("--validation-epochs and --sample-every both set the sample-grid interval; pass one")
        for name in type(self).model_fields:
            families = field_families(type(self), name)
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if families and family not in families and getattr(self, name) not in (None, default):
                raise UserError(f"{flag(name)} applies to {' and '.join(families)} bases; this base ({self.base}) is a {family} model")
        for name, value in family_module(family).DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        check_augment(family, self.augment)
        from genadapt.recipes.optim import check_settings

        check_settings(self, family)  # optimiser, schedule, EMA and data settings that contradict each other

        parameter = techniques.get(self.train, "parameter", family)
        if self.learning_rate is None:
            self.learning_rate = parameter.learning_rate
        active = [(self.train, parameter)]
        seen = set()
        for spec in self.loss:
            implementation = techniques.get(spec.name, "loss", family)
            if spec.name in seen:
                raise UserError(f"--loss {spec.name} is given twice; give it once, with its weight (--loss {spec.name}:W)")
            seen.add(spec.name)
            if spec.weight is None:
                spec.weight = implementation.default_weight
            elif not spec.weight >= 0 or spec.weight == float("inf"):
                raise UserError(f"--loss {spec.name}:{spec.weight}: a loss weight must be a finite number >= 0")
            active.append((spec.name, implementation))

        pending = dict(self.technique_values)
        sections = {}
        for name, implementation in active:
            model = implementation.settings
            values = {key: pending[key] for key in model.model_fields if key in pending}
            try:
                sections[name] = model(**values)
            except ValidationError as exc:
                raise UserError(_first_error(exc)) from None
        used = {key for section in sections.values() for key in type(section).model_fields}
        for key in pending:
            if key not in used:
                raise UserError(_not_read(key, family, self.train))
        self._sections = sections
        self.technique_values = {}
        return self

    def section(self, technique: str) -> BaseModel:
        """The validated settings of `technique` (the parameter technique or one of the losses)."""
        return self._sections[technique]

    def resolved(self) -> dict:
        """What the run used, flat, in the form `--config` reads back: `config.yaml`."""
        family = self.family
        data = self.model_dump(mode="json", exclude={"technique_values"})
        out = {k: v for k, v in data.items() if family in (field_families(type(self), k) or [family])}
        for section in self._sections.values():
            out.update(section.model_dump(mode="json"))
        return out

    @property
    def lr(self) -> float:
        return self.learning_rate


def check_augment(family: str, spec: str) -> None:
    """--augment values the family's loop applies; anything else is refused here, before training."""
    from genadapt.data.augment import AugmentSpecError, make_augment

    kind = spec.strip().lower().partition(":")[0]
    if family == "diffusion":
        if kind not in ("none", "flip", "diffaugment"):
            raise UserError(f"--augment {spec}: diffusion runs take none, flip or diffaugment[:policy] (applied to the images before encoding)")
        if kind != "diffaugment":
            return
    try:
        make_augment(spec)
    except AugmentSpecError as exc:
        raise UserError(f"--augment {spec}: {str(exc).splitlines()[0]}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "config"
    message = error["msg"].removeprefix("Value error, ")
    return f"{flag(field)}: {message}"


def _not_read(key: str, family: str, train: str) -> str:
    from genadapt import techniques

    readers = techniques.readers(key)
    if not readers:
        return f"{flag(key)}: not a setting of genadapt adapt; see genadapt adapt --help"
    here = [(name, kind) for name, kind, f in readers if f == family]
    where = here or [(name, kind) for name, kind, _ in readers]
    groups = {}
    for name, kind in where:
        groups.setdefault("--train" if kind == "parameter" else "--loss", []).append(name)
    users = " or ".join(f"{flag_name} {', '.join(dict.fromkeys(names))}" for flag_name, names in groups.items())
    families = sorted({f for _, _, f in readers if (here and f == family) or not here})
    return f"{flag(key)} applies to {users} on {' and '.join(families)} bases (this run: --train {train} on a {family} base)"


def read_config_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror}); check its permissions") from None
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
        raise UserError(_first_error(exc)) from None


# ----------------------------------------------------------------------------- distill

DISTILL_KINDS = ("progressive", "consistency", "architecture")
# diffusers' train_lcm_distill_lora_sd_wds.py: LoRA on every attention, feed-forward and conv layer.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
# The papers' learning rates: PD CIFAR-10 config (Adam 5e-5), LCM-LoRA script (AdamW 1e-4), BK-SDM (AdamW 5e-5);
# a StyleGAN2 student: StyleGAN2's generator rate (equalized learning rate makes it scale-free).
DISTILL_LR = {"progressive": 5e-5, "consistency": 1e-4, "architecture": 5e-5, "gan": 2e-3}
# Student sampling steps: PD/LCM's few-step targets; a BK student samples like its teacher.
DEFAULT_STUDENT_STEPS = {"progressive": 2, "consistency": 4, "architecture": 25}
PROGRESSIVE, CONSISTENCY, ARCHITECTURE = ("progressive",), ("consistency",), ("architecture",)


class DistillConfig(BaseModel):
    """Everything one `genadapt distill` run reads; every field is a flag of the same name. A field that only
    one kind or family reads is refused on the others."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    teacher: str = setting("pocket-sd", "pocket-sd, a pipeline folder, an adapt run folder, or a GAN (pocket-stylegan2, a StyleGAN2 folder) for --kind architecture.")
    kind: Literal["progressive", "consistency", "architecture"] = setting(..., "progressive (fewer steps), consistency (LCM-LoRA, 1-4 steps), architecture (BK-SDM; GAN Compression for GANs).")
    out: str = setting(..., "Run folder; rerun to resume.", aliases=("--output-dir",))
    data: str | None = setting(None, "The shots: their captions are the prompts the student learns on.", DIFFUSION)
    caption_extension: str = setting(".txt", "--data: sidecar caption extension, kohya's NAME.txt beside NAME.png.", DIFFUSION)
    caption_column: str = setting("text", "--data: caption column of metadata.jsonl / metadata.csv (Hugging Face imagefolder).", DIFFUSION)
    prompts: list[str] = setting(list, "Prompts to distil on (repeatable).", DIFFUSION, aliases=("--prompt",))
    num_samples: int = setting(64, "Teacher samples to distil on (prompts cycled).", DIFFUSION, ge=1)
    teacher_sample_steps: int = setting(50, "Teacher DDIM steps for those samples.", DIFFUSION, ge=1)
    guidance: float = setting(4.0, "Teacher classifier-free guidance, diffusers convention (1 = none).", DIFFUSION, ge=1.0)
    steps: int = setting(500, "Optimiser steps (per round for progressive).", ge=1)
    learning_rate: float | None = setting(None, "Optimiser step size.  [default: progressive 5e-5, consistency 1e-4, architecture 5e-5, GAN 2e-3]", gt=0, allow_inf_nan=False, aliases=("--lr",))
    batch_size: int = setting(8, "Samples per step.", ge=1, aliases=("--train-batch-size",))
    max_grad_norm: float = setting(1.0, "Clip the gradient norm (0: off).", ge=0)
    seed: int = setting(0, "Seed.", ge=0, lt=2**63)
    student_steps: int | None = setting(None, "Target sampling steps.  [default: progressive 2, consistency 4, architecture 25]", DIFFUSION, ge=1)
    # progressive
    teacher_steps: int = setting(8, "The first round's teacher DDIM steps (divides 1000).", DIFFUSION, kinds=PROGRESSIVE, ge=2)
    prediction_type: Literal["epsilon", "v_prediction"] | None = setting(None, "The student's parametrisation.  [default: the teacher's]", DIFFUSION, kinds=PROGRESSIVE)
    # consistency
    num_ddim_timesteps: int = setting(50, "K: the skipping-step grid (step T / K).", DIFFUSION, kinds=CONSISTENCY, ge=1)
    timestep_scaling: float = setting(10.0, "LCM's boundary-condition timestep scaling.", DIFFUSION, kinds=CONSISTENCY, gt=0)
    loss_type: Literal["huber", "l2"] = setting("huber", "Consistency loss.", DIFFUSION, kinds=CONSISTENCY)
    huber_c: float = setting(0.001, "Pseudo-Huber c.", DIFFUSION, kinds=CONSISTENCY, gt=0)
    guidance_max: float | None = setting(None, "Draw g ~ U[guidance, guidance_max] per sample, as the LCM-LoRA script.", DIFFUSION, kinds=CONSISTENCY)
    rank: int = setting(8, "LCM-LoRA rank.", DIFFUSION, kinds=CONSISTENCY, ge=1)
    alpha: float | None = setting(None, "LCM-LoRA alpha.  [default: rank, scale 1, as the LCM-LoRA script]", DIFFUSION, kinds=CONSISTENCY, gt=0)
    lora_targets: list[str] = setting(lambda: list(LCM_LORA_TARGETS), "Modules LCM-LoRA wraps (repeatable).", DIFFUSION, kinds=CONSISTENCY)
    lr_warmup_steps: int = setting(0, "Linear learning-rate warmup steps.", DIFFUSION, kinds=CONSISTENCY, ge=0)
    # architecture
    remove_blocks: list[Literal["layer", "mid", "innermost"]] = setting(lambda: ["mid", "innermost"], "BK-SDM blocks to remove: layer, mid, innermost (repeatable).", DIFFUSION, kinds=ARCHITECTURE)
    lambda_task: float = setting(1.0, "BK-SDM task-loss weight.", DIFFUSION, kinds=ARCHITECTURE, ge=0)
    lambda_out: float = setting(1.0, "Output-distillation weight.", kinds=ARCHITECTURE, ge=0)
    lambda_feat: float = setting(1.0, "Feature-distillation weight.", kinds=ARCHITECTURE, ge=0)
    student_width: float = setting(0.5, "GAN teacher: the student's channel multiplier per resolution.", GAN, kinds=ARCHITECTURE, gt=0, le=1)
    # report and bookkeeping
    eval_images: int = setting(8, "Report: images compared with the teacher for the same noise.", ge=1)
    reference_steps: int = setting(50, "Report: the teacher's many-step reference.", DIFFUSION, ge=1)
    kid_images: int = setting(128, "Report: samples per set for KID against the teacher's many-step samples; 0 skips it.", DIFFUSION, ge=0)
    features: str = setting("pocket", "Report: KID feature space: pocket, an eval-encoder folder, or inception:PATH.", DIFFUSION)
    checkpointing_steps: int = setting(100, "Checkpoint every N steps.", ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "Autocast precision (fp16 needs a GPU).", DIFFUSION)

    @field_validator("prompts", "lora_targets", "remove_blocks", mode="before")
    @classmethod
    def _comma_lists(cls, value):
        return comma_list(value)

    @model_validator(mode="after")
    def _refuse_unread(self):
        family = self.family
        if family == "gan" and self.kind != "architecture":
            raise UserError(f"--kind {self.kind}: a GAN teacher ({self.teacher}) has no sampling steps to cut; only --kind architecture applies to GANs")
        refuse_unread(self, family, self.kind)
        for name in ("caption_extension", "caption_column"):
            if self.data is None and getattr(self, name) != type(self).model_fields[name].get_default():
                raise UserError(f"{flag(name)} reads the captions of --data; pass --data with it, or drop it")
        return self

    @property
    def family(self) -> str:
        from genadapt.families import family_of

        return family_of(self.teacher_base())

    def teacher_base(self) -> str:
        """The teacher's base: itself, or the base an adapt run folder recorded."""
        from genadapt.models import is_run, run_record

        return (run_record(self.teacher).get("base") or self.teacher) if is_run(self.teacher) else self.teacher

    @property
    def n_steps(self) -> int:
        return self.student_steps or DEFAULT_STUDENT_STEPS[self.kind]

    @property
    def lr(self) -> float:
        return self.learning_rate or DISTILL_LR["gan" if self.family == "gan" else self.kind]


def comma_list(value):
    """`--shots 1,5,10` and `--shots 1 --shots 5`: both the same list."""
    if value is None:
        return value
    items = [value] if isinstance(value, (str, int, float)) else list(value)
    out = []
    for item in items:
        out += [part.strip() for part in item.split(",") if part.strip()] if isinstance(item, str) else [item]
    return out


# ----------------------------------------------------------------------------- compare

# The training settings a compare --variant may change beside its technique's own (rank, lora_targets, ...); every
# other adapt setting is compare's to set alike for every run (recipes.compare.shared_settings) or left at its default.
VARIANT_TRAINING = (
    "learning_rate", "loss", "optimizer", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "max_grad_norm", "augment", "snr_gamma", "noise_offset", "use_ema", "ema_decay", "r1_gamma",
    "caption_dropout", "shuffle_caption", "keep_tokens", "random_flip",
)
VARIANT_NAME = re.compile(r"[a-z][a-z0-9_]*")
VARIANT_EXAMPLE = "e.g. --variant lora_r16=lora,rank=16"


def parse_variant(spec: str, family: str) -> tuple[str, str, dict]:
    """`NAME=TECHNIQUE,KEY=VALUE,...` as (NAME, TECHNIQUE, the technique's compare preset with the values over it, as
    given). A part without `=` continues the list before it (`lora_targets=to_q,to_v`); a repeated key adds to its list.
    CompareConfig.resolve_variant validates and types the result."""
    from genadapt import techniques

    head, *parts = [part.strip() for part in spec.split(",")]
    name, _, technique = (side.strip() for side in head.partition("="))
    presets = techniques.compare_presets(family)
    if not technique:
        raise UserError(f"--variant {spec}: write NAME=TECHNIQUE,KEY=VALUE,..., {VARIANT_EXAMPLE}")
    if not VARIANT_NAME.fullmatch(name):
        raise UserError(f"--variant {spec}: NAME {name!r} must be lower-case letters, digits and _, starting with a letter (it names run folders), {VARIANT_EXAMPLE}")
    if name == "base" or name in techniques.registry():
        what = "the unadapted base" if name == "base" else "a technique"
        raise UserError(f"--variant {spec}: {name} names {what} already; give the variant another name, {VARIANT_EXAMPLE}")
    if technique not in presets:
        raise UserError(f"--variant {spec}: {technique} is not a compare technique for {family} bases; choose from {', '.join(presets)}")
    preset = dict(presets[technique])
    values: dict[str, list[str]] = {}
    key = None
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            _check_variant_key(name, key, _settings_of(preset, family))
            values.setdefault(key, []).append(value.strip())
        elif key is None:
            raise UserError(f"--variant {spec}: {part!r} is not KEY=VALUE, {VARIANT_EXAMPLE}")
        elif part:
            values[key].append(part)
    for key, items in values.items():
        if _takes_a_list(key, preset, family):
            preset[key] = items
        elif len(items) > 1:
            raise UserError(f"--variant {name}: {key} takes one value, not {','.join(items)} (a variant's values cannot hold commas)")
        else:
            preset[key] = items[0]
    return name, technique, preset


def _settings_of(preset: dict, family: str) -> list[type[BaseModel]]:
    """The settings models of a compare preset's techniques: its parameter technique and its losses."""
    from genadapt import techniques

    names = [preset["train"], *(LossSpec.parse(item).name for item in preset.get("loss", []))]
    return [techniques.registry()[name].families[family].settings for name in names]


def _check_variant_key(name: str, key: str, models: list[type[BaseModel]]) -> None:
    from genadapt import techniques

    if key in VARIANT_TRAINING or any(key in model.model_fields for model in models):
        return
    if key == "train":
        raise UserError(f"--variant {name}: the technique is the one after NAME= (NAME=TECHNIQUE,...), not train=")
    if key in CompareConfig.model_fields or key in AdaptConfig.model_fields:
        also = f" (compare's --{key.replace('_', '-')})" if key in CompareConfig.model_fields else ""
        raise UserError(f"--variant {name}: {key} is compare's to set alike for every run{also}; a variant sets its technique's settings "
                        f"and {', '.join(VARIANT_TRAINING)}")
    if techniques.readers(key):
        raise UserError(f"--variant {name}: {key} is not read by this variant's technique; see genadapt adapt --help")
    raise UserError(f"--variant {name}: {key} is not a setting of genadapt adapt; see genadapt adapt --help")


def _takes_a_list(key: str, preset: dict, family: str) -> bool:
    """Whether `key` (an adapt field or a setting of the variant's techniques) holds a list."""
    import typing

    if key in AdaptConfig.model_fields:
        annotation = AdaptConfig.model_fields[key].annotation
    else:
        annotation = next(model for model in _settings_of(preset, family) if key in model.model_fields).model_fields[key].annotation
    kinds = [annotation, *typing.get_args(annotation)] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]
    return any(typing.get_origin(kind) is list for kind in kinds)


class CompareConfig(BaseModel):
    """Everything one `genadapt compare` reads; every field is a flag of the same name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: str = setting("pocket-sd", "The pretrained model to adapt.")
    data: str = setting(..., "Folder or builtin spec; shots are drawn from it deterministically.")
    reference: str | None = setting(None, "Held-out real images of the target.  [default: hold out --reference-share of --data, by seed]")
    out: Path = setting(Path("runs/compare"), "Folder for runs, results.json and report.html; rerun to resume.")
    shots: list[int] = setting(lambda: [1, 5, 10], "Shot counts, comma-separated or repeated.")
    techniques: list[str] | None = setting(None, "Techniques, comma-separated or repeated; --help lists them.  [default: diffusion lora,embedding,freeze,full,ewc; GAN full,freeze,lora,embedding,ewc,cdc]")
    budget_minutes: float = setting(15.0, "Wall-clock budget; steps per run are planned from a timing probe.", gt=0, allow_inf_nan=False)
    steps: int | None = setting(None, "Train every run this many steps (no timing probe: the same plan on every machine).", ge=1)
    min_steps: int = setting(20, "Drop runs rather than train any below this many steps.", ge=1)
    max_steps: int | None = setting(None, "Cap on planned steps.  [default: diffusion 400, GAN 1000]", ge=1)
    batch_size: int = setting(4, "Images per step.", ge=1)
    samples: int = setting(64, "Generated images per run for evaluation.", ge=4)
    replicates: int = setting(3, "Runs per technique and shot count, each with its own seed (and k-shot draw where the pool allows); the budget may lower it.", ge=1)
    copy_ceiling: float = setting(0.05, "Disqualify a technique whose mean copy rate exceeds this.", ge=0, le=1)
    diversity_floor: float = setting(0.5, "Disqualify a technique whose intra-cluster diversity is below this times the lesser of the held-out target images' own and the base's.", ge=0)
    seed: int = setting(0, "Seed for shots, training and sampling.", ge=0, lt=2**63)
    caption: str | None = setting(None, "Prompt for images without a caption of their own.", DIFFUSION)
    caption_extension: str = setting(".txt", "Sidecar caption extension, kohya's NAME.txt beside NAME.png.", DIFFUSION)
    caption_column: str = setting("text", "Caption column of metadata.jsonl / metadata.csv (Hugging Face imagefolder).", DIFFUSION)
    fit: Literal["crop", "pad"] = setting("crop", "Make images square by center-cropping or padding (the shots, the pool and --reference alike).")
    background: str = setting("white", "Colour transparent images are composited on (the shots, the pool and --reference alike).")
    strict: bool = setting(False, "Stop on any unusable image in --data or --reference instead of skipping it.")
    probe_steps: int = setting(5, "Steps of the timing probe per technique: the first (warm-up) is charged once per run, the others price a step.", ge=1)
    sample_steps: int = setting(25, "Sampler steps for evaluation samples.", DIFFUSION, ge=1)
    reference_share: float = setting(0.3, "Without --reference: the share of --data held out as the reference.", gt=0, lt=1)
    validate_every: int | None = setting(None, "Validate every run every N steps on held-out pool images and keep its best step (0: off).  [default: steps / 4]", ge=0)
    patience: int = setting(4, "Stop a run after this many validation checks without a better score (0: never early).", ge=0)
    validation_samples: int = setting(16, "Samples per validation check of each run; more makes the kept step less noisy and each check dearer.", ge=4)
    lr_probe: int = setting(3, "Learning rates each technique tries, 3x apart around its default, in short runs on the largest shot count scored on held-out pool images; the best trains the real runs (1: the default rate, no probe).", ge=1, le=7)
    lr_probe_steps: int | None = setting(None, "Steps of each learning-rate probe run.  Rounded down to even: checked at half way and at the end.  [default: a quarter of the run steps, at least --min-steps, at most the run steps]", ge=1)
    executor: Literal["local", "ray"] = setting("local", "Where the runs go: local (this machine, --jobs at a time) or ray (tasks on a Ray cluster).")
    jobs: int = setting(1, "--executor local: runs at a time, each in its own process with one thread.", ge=1)
    address: str | None = setting(None, "--executor ray: the cluster (auto, or ray://HOST:10001).  [default: start a local one]")
    cpus_per_run: float = setting(1.0, "--executor ray: CPUs each run declares.", gt=0)
    gpus_per_run: float = setting(0.0, "--executor ray: GPUs each run declares.", ge=0)
    retries: int = setting(2, "--executor ray: retries of a run whose worker died or that raised, before it is reported as failed.", ge=0)
    variant: list[str] = setting(list, "A technique with other settings, compared beside the rest under its own name: NAME=TECHNIQUE,KEY=VALUE,... (repeatable), e.g. --variant lora_r16=lora,rank=16; KEY is a setting of genadapt adapt the technique reads (rank, lora_targets, learning_rate, loss, ...).")

    @model_validator(mode="after")
    def _executor_settings(self):
        def changed(name: str) -> bool:
            return getattr(self, name) != type(self).model_fields[name].get_default()

        ray_only = [name for name in ("address", "cpus_per_run", "gpus_per_run", "retries") if changed(name)]
        if self.executor == "local" and ray_only:
            raise UserError(f"{flag(ray_only[0])} applies to --executor ray")
        if self.validate_every == 0 and changed("validation_samples"):
            raise UserError("--validation-samples applies when runs are validated; --validate-every 0 turns validation off")
        if self.lr_probe == 1 and self.lr_probe_steps is not None:
            raise UserError("--lr-probe-steps applies when --lr-probe is 2 or more (with --lr-probe 1 no probe runs)")
        if self.executor == "ray" and changed("jobs"):
            raise UserError("--jobs applies to --executor local; Ray runs as many tasks as the cluster's resources allow (--cpus-per-run)")
        return self

    @field_validator("shots", "techniques", mode="before")
    @classmethod
    def _comma_lists(cls, value):
        return comma_list(value)

    @field_validator("shots")
    @classmethod
    def _positive(cls, value):
        if not value or min(value) < 1:
            raise ValueError("shot counts must be >= 1, e.g. --shots 1,5,10")
        return sorted(set(value))

    @model_validator(mode="after")
    def _resolve(self):
        from genadapt import techniques
        from genadapt.families import family_module, family_of

        family = family_of(self.base)
        refuse_unread(self, family)
        presets = techniques.compare_presets(family)
        if self.techniques is None:
            self.techniques = list(family_module(family).COMPARE_TECHNIQUES)
        variants = self.variants()
        for name in self.techniques:
            if name not in presets and name not in variants:
                raise UserError(f"--techniques {name}: not a compare technique for {family} bases; choose from {', '.join(presets)}, or define it with --variant {name}=TECHNIQUE,KEY=VALUE")
        self.techniques += [name for name in variants if name not in self.techniques]
        return self

    def variants(self) -> dict[str, tuple[str, dict]]:
        """{NAME: (technique, adapt settings)} of each --variant: the technique's compare preset with its settings over
        it, validated as the runs will read them and typed (rank 16, not '16')."""
        variants = {}
        for spec in self.variant:
            name, technique, preset = self.resolve_variant(spec)
            if name in variants:
                raise UserError(f"--variant {name}: given twice; give each variant its own name")
            variants[name] = (technique, preset)
        return variants

    def resolve_variant(self, spec: str) -> tuple[str, str, dict]:
        """One --variant's (NAME, technique, adapt settings), checked as an adapt run of this compare reads them."""
        from genadapt.families import family_module

        name, technique, preset = parse_variant(spec, self.family)
        try:
            config = AdaptConfig(base=self.base, data=self.data, out=Path("variant"), **family_module(self.family).COMPARE, **preset)
        except ValidationError as exc:
            raise UserError(f"--variant {name}: {_first_error(exc)}") from None
        except UserError as exc:
            raise UserError(f"--variant {name}: {exc}") from None
        resolved = config.resolved()
        losses = [loss.name if loss.weight is None else f"{loss.name}:{loss.weight:g}" for loss in config.loss]
        return name, technique, {key: losses if key == "loss" else resolved[key] for key in preset}

    def preset(self, technique: str) -> dict:
        """The adapt settings `compare` runs TECHNIQUE (a registered one or a --variant) with."""
        from genadapt import techniques

        variants = self.variants()
        return variants[technique][1] if technique in variants else techniques.compare_presets(self.family)[technique]

    @property
    def family(self) -> str:
        from genadapt.families import family_of

        return family_of(self.base)
