"""The diffusion adaptation loop: one readable recipe, driven by accelerate, knowing no technique.

Reads top to bottom: load the base on the accelerator's device, load the few shots at the training resolution,
let the parameter technique decide what trains and the loss techniques snapshot what they need, fit the images to
their buckets (one square bucket unless --enable-bucket) and cache latents (of every augmented variant, and text
embeddings when the text encoder is frozen and captions do not vary per step), then step; checkpoint atomically;
save the artifact (with --use-ema, the EMA of the trained tensors).

What varies per step is drawn from the stream every process shares, for the whole global batch (so N processes at
batch B train the run of one at N·B, and a resumed run repeats the uninterrupted one): the bucket, the images,
random crops (images are then VAE-encoded every step), the posterior and diffusion noise, the offset noise, the
timesteps, and the caption shuffles and dropouts (captions are then encoded every step).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genadapt import techniques
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import artifact_bytes, diffusion
from genadapt.recipes import (
    GracefulStop, add_terms, effective_lr, end_of_step, sample_interval, append_log, check_finite, check_ranks_agree, gather_states, global_slice, load_trainable_state, make_accelerator,
    process_generators, restore_generators, rewrite_log, trainable_state, write_run_record,
)
from genadapt.recipes import optim
from genadapt.recipes.logging import Reporter
from genadapt.runfolder import check_not_shorter, check_same_data, data_digest
from genadapt.runs import check_resumable, field_defaults, load_checkpoint, save_torch, use_cpu, write_json, write_manifest
from genadapt.techniques import Step

STATE_FILE = "checkpoints/state.pt"
# Random augmentation policies are cached as this many variants of each image, encoded once (kohya caches
# the flipped twin of every latent the same way; a flip has exactly two variants).
AUGMENT_VARIANTS = 8


def _sample_grid(model, config: AdaptConfig, prompts: list[str], path: Path) -> Path:
    from genadapt.grid import save_grid

    images = diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=config.seed)
    return save_grid(images, path, columns=min(8, len(prompts)), scale=2)


def validation_prompts(config: AdaptConfig, captions: list[str], technique) -> list[str]:
    if config.validation_prompt:
        prompts = [config.validation_prompt]
    else:
        prompts = list(dict.fromkeys(captions)) or [""]
    if hasattr(technique, "caption"):
        prompts = [technique.caption(prompt) for prompt in prompts]
    return [prompts[i % len(prompts)] for i in range(config.num_validation_images)]


def augmented_pixels(pixels: torch.Tensor, spec: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every variant the run trains on, in pixel space, and the index of the image each came from.

    `flip` (and --random-flip): each image and its mirror. `diffaugment[:policy]`: the image and AUGMENT_VARIANTS − 1
    draws of DiffAugment (Zhao et al. 2020) from a generator seeded by the run's seed."""
    kind = spec.strip().lower().partition(":")[0]
    if kind == "none":
        return pixels, torch.arange(len(pixels))
    if kind == "flip":
        variants = [pixels, pixels.flip(-1)]
    else:
        from genadapt.data.augment import make_augment

        augment = make_augment(spec)
        generator = torch.Generator().manual_seed(seed + 4)
        variants = [pixels] + [augment(pixels, generator) for _ in range(AUGMENT_VARIANTS - 1)]
    return torch.cat(variants), torch.arange(len(pixels)).repeat(len(variants))


def augment_spec(config: AdaptConfig) -> str:
    """--random-flip is --augment flip (both orientations of every image, cached, drawn uniformly)."""
    return "flip" if config.random_flip else config.augment


# ----------------------------------------------------------------------------- what one step trains on


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float NCHW in [-1, 1], as ImageSet.tensors."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@dataclass
class Bucket:
    """The variants that train at one size; a batch is drawn from one bucket."""

    size: tuple[int, int]  # (height, width), pixels
    source: torch.Tensor  # [n] the image each variant is
    flip: torch.Tensor  # [n] bool: the variant is mirrored
    mean: torch.Tensor | None = None  # [n, c, h, w] VAE posterior, cached; None: encoded every step (random crops)
    std: torch.Tensor | None = None
    sizes: torch.Tensor | None = None  # [n, 6] SDXL's size ids; None: drawn with the crop every step
    fitted: list | None = None  # random crops: each variant's resized image (data.buckets.Fitted)

    def __len__(self) -> int:
        return len(self.source)


def size_row(original, crop, size) -> tuple:
    """SDXL's micro-conditioning, as diffusers' SDXL scripts: original (h, w), crop (top, left), target (h, w)."""
    return (*original, *crop, *size)


def training_buckets(model, images, config: AdaptConfig, resolution: int, bucket_settings) -> tuple[list[Bucket], list[str]]:
    """The buckets the run draws batches from, and one line per distinct way images were resized or cropped."""
    from genadapt.data import buckets as sizing

    spec = augment_spec(config)
    flipping = spec.strip().lower().startswith("flip")
    if not (config.enable_bucket or config.random_crop):
        # The loader fitted every image square (--fit crop or pad) at the resolution.
        pixels, source = augmented_pixels(images.tensors(), spec, config.seed)
        mean, std = diffusion.encode_images(model, pixels)
        flip = (torch.arange(len(pixels)) >= len(images)) if flipping else torch.zeros(len(pixels), dtype=torch.bool)
        square = (resolution, resolution)
        sizes = torch.tensor([size_row(images.records[i].original_size or square, images.records[i].crop_top_left, square) for i in source.tolist()],
                             dtype=torch.float32)
        return [Bucket(square, source, flip, mean.cpu(), std.cpu(), sizes)], sizing.square_notes(images.records, resolution, config.fit)

    natives = sizing.source_images(images, config.data, config.background)
    step, low, high = bucket_settings if config.enable_bucket else (None, None, None)
    buckets_wh, fitted = sizing.plan(natives, resolution, step, config.enable_bucket, low, high)
    notes = sizing.resize_notes(fitted, buckets_wh, config.random_crop)
    out = []
    for number, (width, height) in enumerate(buckets_wh):
        members = [item for item in fitted if item.bucket == (height, width)]
        if not members:
            continue
        sources = torch.tensor([item.source for item in members])
        if config.random_crop:
            copies = 2 if flipping else 1
            flip = torch.arange(len(members) * copies) >= len(members)
            out.append(Bucket((height, width), sources.repeat(copies), flip, fitted=members * copies))
            continue
        pixels = to_tensor(np.stack([item.center() for item in members]))
        # Each bucket draws its own DiffAugment variants (the first keeps the run's stream of a single bucket).
        pixels, index = augmented_pixels(pixels, spec, config.seed + 1_000_003 * number)
        mean, std = diffusion.encode_images(model, pixels)
        flip = (torch.arange(len(pixels)) >= len(members)) if flipping else torch.zeros(len(pixels), dtype=torch.bool)
        sizes = torch.tensor([size_row(members[i].original, members[i].crop, (height, width)) for i in index.tolist()], dtype=torch.float32)
        out.append(Bucket((height, width), sources[index], flip, mean.cpu(), std.cpu(), sizes))
    return out, notes


def random_crops(model, bucket: Bucket, index: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This step's crops of the chosen variants (a position per image from `draws`, uniform in [0, 1)²), their VAE
    posterior, and SDXL's size ids with the crop's corner (mirrored for a flipped variant)."""
    height, width = bucket.size
    crops, rows = [], []
    for position, variant in enumerate(index.tolist()):
        item = bucket.fitted[variant]
        room_top, room_left = item.room
        top = min(room_top, int(draws[position, 0] * (room_top + 1)))
        left = min(room_left, int(draws[position, 1] * (room_left + 1)))
        crop = item.pixels[top:top + height, left:left + width]
        if bucket.flip[variant]:
            crop, left = crop[:, ::-1], room_left - left  # the mirror of this crop is the flipped image's crop at room − left
        crops.append(crop)
        rows.append(size_row(item.original, (top, left), bucket.size))
    mean, std = diffusion.encode_images(model, to_tensor(np.stack(crops)))
    return mean.cpu(), std.cpu(), torch.tensor(rows, dtype=torch.float32)


def vary_caption(caption: str, keep_tokens: int, keys: torch.Tensor | None, drop: bool) -> str:
    """kohya's caption handling: with `keys`, the comma-separated tags after the first `keep_tokens` are shuffled
    (in the order of `keys`); `drop` makes it the empty prompt (caption dropout)."""
    if drop:
        return ""
    if keys is None:
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.argsort(keys[: len(flexible)]).tolist()
    return ", ".join(fixed + [flexible[i] for i in order])


def step_captions(raw: list[str], sources: torch.Tensor, config: AdaptConfig, technique, shared, accelerator, max_tags: int) -> list[str]:
    """This step's captions of `sources`: shuffled (--shuffle-caption), put in the technique's form (textual
    inversion's placeholder), then dropped (--caption-dropout)."""
    batch = len(sources)
    keys = global_slice(lambda n: torch.rand((n, max_tags), generator=shared), batch, accelerator) if config.shuffle_caption else None
    drop = global_slice(lambda n: torch.rand(n, generator=shared), batch, accelerator) < config.caption_dropout if config.caption_dropout > 0 else None
    out = []
    for position, source in enumerate(sources.tolist()):
        caption = vary_caption(raw[source], config.keep_tokens, None if keys is None else keys[position], False)
        if hasattr(technique, "caption"):
            caption = technique.caption(caption)
        out.append(vary_caption(caption, 0, None, bool(drop is not None and drop[position])))
    return out


# ----------------------------------------------------------------------------- the loss


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023), as diffusers' scripts: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1)
    for v-prediction, SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def denoise_term(model, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    if snr_gamma is None:
        return diffusion.denoise_loss(prediction, target)
    weights = min_snr_weights(model.noise_scheduler, timesteps.cpu(), snr_gamma).to(prediction.device)
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()


# ----------------------------------------------------------------------------- the loop


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)


def training_metadata(config: AdaptConfig, out: Path, images, resolution: int) -> dict:
    """kohya's `ss_*` record of the run (written into the kohya LoRA file)."""
    return {
        "ss_output_name": config.output_name or out.name, "ss_steps": config.steps, "ss_learning_rate": config.lr, "ss_seed": config.seed,
        "ss_num_train_images": len(images), "ss_sd_model_name": config.base, "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": config.enable_bucket, "ss_lr_scheduler": config.lr_scheduler, "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_optimizer": config.optimizer, "ss_noise_offset": config.noise_offset, "ss_min_snr_gamma": config.snr_gamma,
        "ss_caption_dropout_rate": config.caption_dropout, "ss_shuffle_caption": config.shuffle_caption, "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": augment_spec(config) == "flip",
    }


ARTIFACT_CEILING = 2 * 1024**3  # bytes: an adapter larger than this is almost always a typo (--rank 100000 wrote 27 GB)


def check_artifact_size(technique, model, parameters, config) -> None:
    """An adapter's artifact (fp32 tensors) above 2 GB needs --allow-large-artifact; a whole pipeline (full, freeze)
    is as large as the base, which the user chose."""
    if getattr(technique, "saves_pipeline", False) or config.allow_large_artifact:
        return
    count = technique.trained_parameters(model) if hasattr(technique, "trained_parameters") else sum(p.numel() for p in parameters)
    size = count * 4
    if size > ARTIFACT_CEILING:
        raise UserError(f"--train {config.train}: its artifact would be {size / 1024**3:.1f} GB ({count:,} trained values); "
                        "lower --rank (or the adapter's size), or pass --allow-large-artifact if you mean it")


def adapt_diffusion(config: AdaptConfig, accelerator=None) -> dict:
    """Train one run into `config.out`; resumes from `checkpoints/state.pt` if it exists."""
    from tqdm.auto import tqdm

    from genadapt.data import buckets as sizing
    from genadapt.data import load_dataset

    use_cpu()
    out = Path(config.out)
    accelerator = accelerator or make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, config.cpu)
    main = accelerator.is_main_process

    model = diffusion.load(config.base, device=accelerator.device)
    latent_step = sizing.latent_step(model)
    resolution = config.resolution or model.resolution
    sizing.check_resolution(resolution, latent_step, config.base)
    bucket_settings = sizing.check_bucket_settings(config, resolution, latent_step) if config.enable_bucket else None
    images = load_dataset(
        config.data, resolution=resolution, shots=config.shots, seed=config.seed, fit=config.fit,
        background=config.background, caption=config.caption, caption_extension=config.caption_extension,
        caption_column=config.caption_column, strict=config.strict,
    )
    if config.instance_prompt is not None:
        images = images.with_captions(config.instance_prompt)  # diffusers' DreamBooth: one prompt for every image
    torch.manual_seed(config.seed)  # adapter initialisation draws from the global generator
    technique = techniques.get(config.train, "parameter", "diffusion").build(config.section(config.train))
    technique.prepare(model)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    uncaptioned = sum(1 for caption in images.captions if not caption.strip())
    if main and uncaptioned and config.caption is None and not hasattr(technique, "caption"):
        _warn(f"{uncaptioned} of {len(images)} image(s) have no caption (no {config.caption_extension} file or metadata row) and neither --caption "
              "nor --instance-prompt is given, so they train on the empty prompt")
    captions = [technique.caption(c) if hasattr(technique, "caption") else c for c in images.captions]
    model.extras["captions"] = captions
    model.extras["training_metadata"] = training_metadata(config, out, images, resolution)
    losses = []
    for spec in config.loss:
        loss_technique = techniques.get(spec.name, "loss", "diffusion").build(config.section(spec.name))
        loss_technique.prepare(model, images, config)
        losses.append((spec.weight, loss_technique))

    resolved = {**config.resolved(), "resolution": resolution}
    if bucket_settings is not None:
        resolved.update(dict(zip(("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"), bucket_settings)))
    check_resumable(out, STATE_FILE, resolved, ignored={"steps"}, defaults=field_defaults(type(config)))  # a longer run continues a shorter one
    check_same_data(out, STATE_FILE, images)
    if main:
        # config.yaml with the resolution (and buckets) the run resolved from the base
        write_run_record(out, config, "diffusion", resolved, device=str(accelerator.device), processes=accelerator.num_processes)
        write_manifest(out, config.seed, {"train": images}, {"base": config.base, "resolution": resolution, "data_sha256": data_digest(images)})

    buckets, notes = training_buckets(model, images, config, resolution, bucket_settings)
    if main:
        for line in notes:
            _note(line)
    scale = model.vae.config.scaling_factor
    token_ids = diffusion.tokenize(model, captions)  # per image
    trains_text = any(p.requires_grad for n, p in model.named_parameters() if n.startswith("text_encoder"))
    captions_vary = config.shuffle_caption or config.caption_dropout > 0
    max_tags = max(len(caption.split(",")) for caption in images.captions)
    cached_text = None
    if not trains_text and not captions_vary:
        with torch.no_grad():
            cached_text = diffusion.encode_text(model, token_ids)

    parameters = technique.parameters(model)
    check_artifact_size(technique, model, parameters, config)
    weight_decay, betas, eps = optim.adam_settings(config, technique.weight_decay, (0.9, 0.999))
    optimizer = optim.make_optimizer(config.optimizer, parameters, effective_lr(config, accelerator), weight_decay, betas, eps)
    schedule_steps = max(1, config.steps // config.gradient_accumulation_steps)  # optimiser steps
    scheduler = optim.make_scheduler(config, optimizer, schedule_steps)

    # Only modules with trainable weights go through prepare (DDP refuses a module with none).
    def prepared(module):
        return accelerator.prepare(module) if any(p.requires_grad for p in module.parameters()) else module

    unet = prepared(model.unet)
    text_encoders = [prepared(encoder) for _, encoder in model.text_encoders]
    optimizer = accelerator.prepare(optimizer)
    ema = optim.make_ema(config, parameters)

    # One stream every process shares draws the global batch, noise and timesteps (each process takes its
    # slice); a per-process stream serves the loss techniques. Both are checkpointed: a resumed run is the same run.
    shared, local = process_generators(config.seed, accelerator)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        required = {"trainable", "optimizer", "scheduler", "shared_generator", "local_generators", "step", "history"} | ({"ema"} if ema else set())
        state = load_checkpoint(state_path, required)
        optim.check_schedule_steps(config, state, schedule_steps, state_path)
        load_trainable_state(model, state["trainable"], state_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            optim.load_ema_state(ema, state["ema"], accelerator.device, state_path)
        restore_generators(state, shared, local, accelerator, state_path)
        start, history = state["step"], state["history"]
        check_not_shorter(start, config.steps, out)
    validation = None
    if config.validate_every:
        from genadapt.recipes.validation import Validation, validation_images

        if accelerator.num_processes > 1:
            raise UserError("--validate-every runs on one process; drop --num-processes, or score the run afterwards with genadapt evaluate")
        prompts_for_validation = validation_prompts(config, images.captions, technique)

        def validation_sample(model, n, seed):
            prompts = [prompts_for_validation[i % len(prompts_for_validation)] for i in range(n)]
            return diffusion.sample(model, prompts, steps=config.sample_steps, guidance=config.guidance_scale, seed=seed + 5)

        validation = Validation(config.validate_every, config.validation_samples, config.patience, config.copy_ceiling,
                                validation_images(config, images, resolution), images, validation_sample, config.seed, out)
        if state_path.is_file() and "validation" in state:
            validation.load_state_dict(state["validation"])
    if main:
        rewrite_log(out, history)  # steps after the last checkpoint are run again
    accelerator.step = start  # gradient accumulation counts micro-batches from the run's start, also when resumed

    def checkpoint(done: int) -> None:
        locals_ = gather_states(local, accelerator)
        if main:
            save_torch(state_path, {
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "schedule_steps": schedule_steps, **({"ema": optim.ema_state(ema)} if ema is not None else {}),
                "shared_generator": shared.get_state(), "local_generators": locals_, "step": done, "history": history,
                **({"validation": validation.state_dict()} if validation is not None else {}),
            })

    def sample_grid(path: Path) -> Path:
        """A grid of the weights the run would save: the EMA's, with --use-ema."""
        if ema is None:
            return _sample_grid(model, config, validation_prompts(config, images.captions, technique), path)
        ema.store(parameters)
        ema.copy_to(parameters)
        try:
            return _sample_grid(model, config, validation_prompts(config, images.captions, technique), path)
        finally:
            ema.restore(parameters)

    device = accelerator.device
    bar = tqdm(total=config.steps, initial=start, desc=f"adapt {config.train}", unit="step", disable=not main, dynamic_ncols=True)
    started, first_step_seconds = time.time(), None  # the first step pays one-off warm-up: compare's timing probe sets it apart
    timesteps_total = model.noise_scheduler.config.num_train_timesteps
    weights = torch.tensor([float(len(bucket)) for bucket in buckets])
    def snapshot() -> dict:
        """The state a validation check keeps when it is the best: what the run would save."""
        return {"trainable": trainable_state(model), **({"ema": optim.ema_state(ema)} if ema is not None else {})}

    grid_every = sample_interval(config, len(images))
    with GracefulStop() as stop, Reporter(out, config.report_to, main, start) as reporter:
        for step_index in range(start, config.steps):
            if validation is not None and validation.stop:
                break  # stopped early: no better validation score for --patience checks
            bucket = buckets[int(torch.multinomial(weights, 1, generator=shared))] if len(buckets) > 1 else buckets[0]
            index = global_slice(lambda n: torch.randint(len(bucket), (n,), generator=shared), config.batch_size, accelerator)
            if bucket.mean is None:
                draws = global_slice(lambda n: torch.rand((n, 2), generator=shared), config.batch_size, accelerator)
                mean, std, batch_sizes = random_crops(model, bucket, index, draws)
            else:
                mean, std, batch_sizes = bucket.mean[index], bucket.std[index], bucket.sizes[index]
            shape = mean.shape[1:]
            posterior_noise = global_slice(lambda n: torch.randn((n, *shape), generator=shared), config.batch_size, accelerator)
            noise = global_slice(lambda n: torch.randn((n, *shape), generator=shared), config.batch_size, accelerator)
            if config.noise_offset:  # Guttenberg's offset noise, as diffusers: one normal draw per image and channel
                noise = noise + config.noise_offset * global_slice(lambda n: torch.randn((n, shape[0], 1, 1), generator=shared), config.batch_size, accelerator)
            timesteps = global_slice(lambda n: torch.randint(0, timesteps_total, (n,), generator=shared), config.batch_size, accelerator)
            latents = (mean + std * posterior_noise) * scale
            noisy, noise, timesteps = diffusion.add_noise(model, latents, shared, timesteps=timesteps, noise=noise)
            sources = bucket.source[index]
            if captions_vary:
                batch_tokens = diffusion.tokenize(model, step_captions(images.captions, sources, config, technique, shared, accelerator, max_tags))
            else:
                batch_tokens = token_ids[sources]
            batch_sizes = batch_sizes if model.is_sdxl else None
            with accelerator.accumulate(unet):
                if cached_text is not None:
                    text = cached_text[sources]
                elif trains_text:
                    text = diffusion.encode_text(model, batch_tokens, text_encoders)
                else:
                    with torch.no_grad():
                        text = diffusion.encode_text(model, batch_tokens, text_encoders)
                prediction = diffusion.predict(model, unet, noisy.to(device), timesteps, text, batch_sizes)
                target = diffusion.target_for(model, latents, noise, timesteps).to(prediction.device)
                terms = {"denoise": denoise_term(model, prediction, target, timesteps, config.snr_gamma)}
                step = Step(
                    index=step_index,
                    model=model,
                    batch={"latents": latents, "token_ids": batch_tokens, "text": text, "sizes": batch_sizes, "index": sources},
                    outputs={"noisy": noisy, "noise": noise, "timesteps": timesteps, "prediction": prediction, "target": target},
                    generator=local,
                )
                total = terms["denoise"]
                for weight, loss_technique in losses:
                    total = add_terms(terms, total, weight, loss_technique.loss(step))
                check_finite(terms, step_index + 1, out)
                accelerator.backward(total)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    check_finite({"gradient norm": torch.as_tensor(norm)}, step_index + 1, out)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                    if ema is not None:
                        ema.step(parameters)

            done = step_index + 1
            record = {"step": done, "loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}, "lr": lr}
            history.append(record)
            if main:
                append_log(out, record)
                reporter.log(done, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            end_of_step(done, model, config, accelerator, stop, validation, snapshot, checkpoint, bar, out)
            if first_step_seconds is None:
                first_step_seconds = time.time() - started
            if main and grid_every and done % grid_every == 0 and done != config.steps:
                reporter.image(sample_grid(out / "samples" / f"step-{done:06d}.png"), done)
        bar.close()

        if validation is not None and validation.best_state is not None:  # the best validated step is what the run saves
            load_trainable_state(model, validation.best_state["trainable"], state_path)
            if ema is not None:
                optim.load_ema_state(ema, validation.best_state["ema"], accelerator.device, state_path)
        if ema is not None:
            ema.copy_to(parameters)  # the run's weights are the EMA's from here: digest, artifact, final grid
        weights_digest = check_ranks_agree(model, accelerator)
        trained = technique.trained_parameters(model) if hasattr(technique, "trained_parameters") else sum(p.numel() for p in parameters)
        summary = {"family": "diffusion", "steps": config.steps, "train_seconds": time.time() - started, "first_step_seconds": first_step_seconds,
                   "trainable_parameters": trained,
                   "device": str(device), "processes": accelerator.num_processes, "weights_sha256": weights_digest,
                   "train_images": len(images), "train_variants": sum(len(bucket) for bucket in buckets), "resolution": resolution,
                   "saved_weights": "ema" if ema is not None else "trained"}
        if ema is not None:
            summary["ema_decay"] = config.ema_decay
        if validation is not None:
            summary["validation"] = validation.summary()
            summary["trained_steps"] = len(history)
        if config.enable_bucket:
            counts = {}
            for bucket in buckets:
                key = f"{bucket.size[1]}x{bucket.size[0]}"
                counts[key] = counts.get(key, 0) + len(bucket)
            summary["buckets"] = counts
        if main:
            artifacts = technique.save(model, out)
            summary["artifacts"] = [str(Path(a).relative_to(out)) for a in artifacts]
            summary["artifact_bytes"] = artifact_bytes(artifacts)
            grid = _sample_grid(model, config, validation_prompts(config, images.captions, technique), out / "samples" / f"step-{config.steps:06d}.png")
            reporter.image(grid, config.steps)
            write_json(out / "prompts.json", captions)  # what the run trained on, token included: how to sample it
            write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    summary["model"] = model
    summary["history"] = history
    return summary
