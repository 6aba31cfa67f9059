"""The diffusion family: load a Stable Diffusion-shaped pipeline, compute its training loss, sample, save.

Works on pocket-sd, any diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` folder,
or a hub id (downloaded by diffusers only if the user names one; nothing here downloads on its own).

SDXL (Podell et al. 2023) conditions the UNet on both text encoders' penultimate hidden states,
concatenated, plus the second encoder's pooled projection and six "micro-conditioning" numbers
(original size, crop corner, target size); `encode_text` and `predict` hide that difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from genadapt.errors import UserError

FAMILY = "diffusion"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# Settings a run takes when the user gives none: LoRA, 200 steps, no augmentation, gradients clipped at 1 (as
# diffusers' training examples).
DEFAULTS = {"train": "lora", "steps": 200, "augment": "none", "num_validation_images": 8, "max_grad_norm": 1.0}
# compare's evaluation grids and generated images are small and quick; every run of a compare takes these.
COMPARE = {"num_validation_images": 4, "sample_steps": 10}
# What `compare` runs when --techniques is not given: one of each kind of technique.
COMPARE_TECHNIQUES = ("lora", "embedding", "freeze", "full", "ewc")


def is_base(base: str) -> bool:
    from genadapt.families import gan

    return not gan.is_base(base)


@dataclass
class TextCondition:
    """What the UNet is conditioned on: token states, and for SDXL the pooled text embedding."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, index) -> "TextCondition":
        return TextCondition(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def expand(self, count: int) -> "TextCondition":
        return TextCondition(self.embeds.expand(count, -1, -1), None if self.pooled is None else self.pooled.expand(count, -1))

    def detach(self) -> "TextCondition":
        return TextCondition(self.embeds.detach(), None if self.pooled is None else self.pooled.detach())


@dataclass
class DiffusionModel:
    pipeline: object  # diffusers.StableDiffusionPipeline
    base: str
    noise_scheduler: object  # DDPMScheduler with the pipeline's training schedule
    family: str = FAMILY
    extras: dict = field(default_factory=dict)  # technique state (added tokens, adapter names...)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def text_encoder(self):
        return self.pipeline.text_encoder

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipeline, "text_encoder_2", None) is not None

    @property
    def text_encoders(self) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
        pairs = [(self.pipeline.tokenizer, self.pipeline.text_encoder)]
        if self.is_sdxl:
            pairs.append((self.pipeline.tokenizer_2, self.pipeline.text_encoder_2))
        return pairs

    @property
    def vae(self):
        return self.pipeline.vae

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.pipeline.vae_scale_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        """The adaptable modules, by the prefix their parameter names carry (`unet.`, `text_encoder.`, `text_encoder_2.`)."""
        modules = {"unet": self.unet, "text_encoder": self.text_encoder}
        if self.is_sdxl:
            modules["text_encoder_2"] = self.pipeline.text_encoder_2
        return modules

    def named_parameters(self):
        for prefix, module in self.modules().items():
            for name, parameter in module.named_parameters():
                yield f"{prefix}.{name}", parameter


def resolve_base(base: str) -> str:
    if base == "pocket-sd":
        from genadapt.zoo import weights_dir

        return str(weights_dir("pocket-sd"))
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--base {base}: not a diffusers pipeline folder (no model_index.json); pass a folder saved with save_pretrained")
        return str(path)
    if base.startswith(("/", ".", "~")) or "\\" in base or base.count("/") != 1:
        # Not a hub id (org/name): a folder the user mistyped, which diffusers would look up on the hub.
        raise UserError(f"--base {base}: no such folder; pass pocket-sd, a pipeline folder saved with save_pretrained, or a hub id (org/name)")
    if path.parent.is_dir():  # `runs/my-base` where ./runs exists: a mistyped folder, not an org on the hub
        raise UserError(f"--base {base}: no such folder in {path.parent}/ (neither a run nor a pipeline folder); check the name, or, if {base} is a hub id, run from a folder without a {path.parent}/")
    return base  # a hub id: diffusers resolves it (from its cache when offline)


SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")
KNOWN_LIBRARIES = ("diffusers", "transformers")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


def _check_parts(base: str, location: str, index: dict, sdxl: bool) -> None:
    """The parts a Stable Diffusion (XL) pipeline needs, each from diffusers or transformers: a component that
    names another library is code from the folder, which genadapt never runs."""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        if spec[0] not in KNOWN_LIBRARIES:
            raise UserError(f"--base {base}: model_index.json asks for {name} from {spec[0]}.{spec[1]}, code shipped with the folder; genadapt runs no code from a model folder")
    if Path(location).is_dir():
        missing = [part for part in (SDXL_PARTS if sdxl else SD_PARTS) if not (Path(location) / part).is_dir()]
        if missing:
            kind = "an SDXL" if sdxl else "a Stable Diffusion"
            raise UserError(f"--base {base}: model_index.json says {kind} pipeline, but the folder has no {', '.join(missing)}; pass a complete pipeline folder")


def load(base: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionModel:
    """A frozen pipeline (every parameter requires_grad=False); techniques decide what trains."""
    from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    location = resolve_base(base)
    try:
        index = DiffusionPipeline.load_config(location)
    except Exception as exc:  # noqa: BLE001 - a missing, unreadable or malformed model_index.json is the user's folder
        raise UserError(f"--base {base}: model_index.json cannot be read ({_first_line(exc)}); pass a folder saved with save_pretrained") from None
    sdxl = index.get("_class_name") == SDXL_PIPELINE
    _check_parts(base, location, index, sdxl)
    # Weights are safetensors only (a .bin is a pickle), and no code from the folder runs (trust_remote_code=False).
    options = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False)
    try:
        if sdxl:
            pipeline = StableDiffusionXLPipeline.from_pretrained(location, **options)
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(location, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **options)
    except MemoryError:
        raise UserError(f"--base {base}: its config asks for a model larger than this machine's memory; check the config.json files") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt weights, bad configs: the folder, not genadapt
        raise UserError(f"--base {base}: cannot load a Stable Diffusion pipeline ({_first_line(exc)}); check the folder's files, or pass pocket-sd, another folder or a hub id") from None
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    model = DiffusionModel(pipeline=pipeline, base=base, noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config))
    for module in (*model.modules().values(), pipeline.vae):
        module.requires_grad_(False)
        module.eval()
    for tokenizer, encoder in model.text_encoders:
        # Configs with eos_token_id=2 (SD and SDXL's own) pool at the *largest* token id, which is an
        # added placeholder once textual inversion adds one (transformers#24650); pool at the real EOS.
        if tokenizer.eos_token_id is not None and hasattr(encoder, "text_model"):
            encoder.config.eos_token_id = encoder.text_model.eos_token_id = tokenizer.eos_token_id
    info = Path(location) / "genadapt.json"  # a distilled student: its textual-inversion teacher's trigger word
    if info.is_file():
        try:
            trigger = json.loads(info.read_text(encoding="utf-8")).get("trigger")
        except (ValueError, AttributeError) as exc:
            raise UserError(f"--base {base}: {info} is not a JSON object ({_first_line(exc)}); restore it or delete it") from None
        if trigger:
            model.extras["trigger"] = trigger
    return model


def encode_images(model: DiffusionModel, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of a fixed image set, computed once; latents are sampled per step."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(batch_size):
            posterior = model.vae.encode(chunk.to(model.vae.device, model.vae.dtype)).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    # Plain NCHW: the VAE can hand back channels-last strides, and torch 2.13's CPU GroupNorm
    # backward crashes on channels-last input when only later layers train.
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def tokenize(model: DiffusionModel, captions: list[str]) -> torch.Tensor:
    """Token ids, [N, L]; for SDXL both tokenizers' ids stacked, [N, 2, L]."""
    ids = [
        tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        for tokenizer, _ in model.text_encoders
    ]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def encode_text(model: DiffusionModel, token_ids: torch.Tensor, encoders: list | None = None) -> TextCondition:
    """The UNet's conditioning for `token_ids`; `encoders` replaces the model's (e.g. wrapped for DDP)."""
    encoders = encoders or [encoder for _, encoder in model.text_encoders]
    device = next(encoders[0].parameters()).device
    if not model.is_sdxl:
        return TextCondition(encoders[0](token_ids.to(device))[0])
    # As diffusers' SDXL pipeline: penultimate layer of each encoder, pooled projection of the second.
    # Each encoder runs where it lives (only a trained one is moved by accelerate); results meet on the first's device.
    states = []
    for position, encoder in enumerate(encoders):
        output = encoder(token_ids[:, position].to(next(encoder.parameters()).device), output_hidden_states=True)
        states.append(output.hidden_states[-2].to(device))
        pooled = output[0].to(device)
    return TextCondition(torch.cat(states, dim=-1), pooled)


def size_ids(model: DiffusionModel, records) -> torch.Tensor:
    """SDXL's six size numbers per image, [N, 6]: original (h, w), crop (top, left), target (h, w), as
    diffusers' SDXL training scripts record them; images without an original size count as rendered at size."""
    size = model.resolution
    rows = [(*(record.original_size or (size, size)), *record.crop_top_left, size, size) for record in records]
    return torch.tensor(rows, dtype=torch.float32)


def predict(
    model: DiffusionModel, unet, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition, sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """The UNet's output for x_t. SDXL also takes `sizes` ([N, 6] from `size_ids`); without them, the
    training resolution with no crop (what its pipeline uses by default at sampling)."""
    device = next(unet.parameters()).device  # inputs may still be on the CPU (cached latents, loss terms)
    extra = {}
    if text.pooled is not None:
        if sizes is None:
            sizes = torch.tensor([[model.resolution, model.resolution, 0, 0, model.resolution, model.resolution]]).expand(len(noisy), -1)
        time_ids = sizes.to(device=device, dtype=text.pooled.dtype)
        extra["added_cond_kwargs"] = {"text_embeds": text.pooled.to(device), "time_ids": time_ids}
    return unet(noisy.to(device), timesteps.to(device), text.embeds.to(device), **extra).sample


def add_noise(model: DiffusionModel, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None,
              noise: torch.Tensor | None = None):
    """Forward process q(x_t | x_0) (Ho et al. 2020, eq. 4): returns noisy latents, noise, timesteps."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    return model.noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def target_for(model: DiffusionModel, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = model.noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return model.noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction")


def predicted_x0(model: DiffusionModel, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """x̂_0 from the model output (eq. 15 of Ho et al. for eps; Salimans & Ho 2022 for v)."""
    alphas = model.noise_scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def denoise_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Simple diffusion loss, Ho et al. 2020 eq. 14: E ||target - model(x_t, t, c)||²."""
    return F.mse_loss(prediction.float(), target.float())


def sample(
    model: DiffusionModel,
    prompts: list[str],
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    negative_prompt: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
    trigger_weight: tuple[str, float] | None = None,
) -> torch.Tensor:
    """NCHW images in [-1, 1], one per prompt, deterministic by seed (DDIM unless the pipeline says otherwise).
    `trigger_weight` (word, w) weighs a learned trigger word in every prompt (`weighted_trigger`)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    images = []
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    for chunk in tqdm(chunks, desc="sampling", disable=not progress, unit="batch"):
        negative = [negative_prompt] * len(chunk) if negative_prompt else None
        with torch.no_grad():
            text = {"prompt": chunk, "negative_prompt": negative} if trigger_weight is None else weighted_trigger(model, chunk, *trigger_weight, guidance > 1, negative)
            result = model.pipeline(
                **text,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator,
                output_type="pt",
            )
        images.append(result.images.float().mul(2).sub(1))
    return torch.cat(images)


def without_word(prompt: str, word: str) -> str:
    """The prompt with every occurrence of the trigger `word` (and its spelled-out vectors, `word_1`...) removed,
    found as diffusers finds it: anywhere in the text (an added token splits `word,` or `(word)` too)."""
    import re

    return " ".join(re.sub(re.escape(word) + r"(?:_\d+)?", " ", prompt).split())


def weighted_trigger(model: DiffusionModel, prompts: list[str], word: str, weight: float, guided: bool, negative: list[str] | None) -> dict:
    """The pipeline's text arguments with the trigger `word` weighed by `weight`: each prompt's encoding is
    E(without) + weight * (E(with) - E(without)), where E(without) encodes the prompt with the word removed.
    This is a linear form of compel's blend with the word removed (damian0815/compel, DownweightMode.REMOVE, whose
    curve differs between 0, 0.5 and 1): 0 gives the prompt as if the word were absent, 1 the prompt as written,
    above 1 extrapolates past it. With the placeholder after the caption (--token-position end) a causal text
    encoder gives the caption's positions the same encoding in both, so only the trigger's positions and those
    after it move."""
    missing = [prompt for prompt in prompts if word not in prompt]
    if missing:
        raise UserError(f"--embedding-weight: the prompt {missing[0]!r} does not contain the trigger word {word!r}; give --prompt with it in every prompt, or drop --embedding-weight")

    def encode(texts: list[str], with_negative: bool) -> tuple:  # SD: (embeds, negative); SDXL adds (pooled, negative pooled)
        return model.pipeline.encode_prompt(texts, device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=with_negative,
                                            negative_prompt=negative if with_negative else None)

    # The negative side is encoded once, with the trigger's prompts.
    (with_word, negative_embeds, *pooled), (plain, _, *pooled_plain) = encode(prompts, guided), encode([without_word(p, word) for p in prompts], False)
    text = {"prompt_embeds": plain + weight * (with_word - plain), "negative_prompt_embeds": negative_embeds}
    if model.is_sdxl:
        text["pooled_prompt_embeds"] = pooled_plain[0] + weight * (pooled[0] - pooled_plain[0])
        text["negative_pooled_prompt_embeds"] = pooled[1]
    return text


def save(model: DiffusionModel, out: Path) -> Path:
    """A diffusers pipeline folder (atomic: written beside, then renamed)."""
    import os
    import shutil

    from genadapt.runfolder import disk_full_error
    from genadapt.runs import readable_mode

    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.pipeline.save_pretrained(staging, safe_serialization=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        full = disk_full_error(exc, out)
        if full is not None:
            raise full from None
        raise
    for file in staging.rglob("*"):
        if file.is_file():
            os.chmod(file, readable_mode())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out
