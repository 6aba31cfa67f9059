"""The diffusion adaptation loop: one readable recipe, driven by accelerate, knowing no technique.

Reads top to bottom: load the base on the accelerator's device, load the few shots, let the parameter
technique decide what trains and the loss techniques snapshot what they need, cache latents (of every
augmented variant, and text embeddings when the text encoder is frozen), then step; checkpoint
atomically; save the artifact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from genadapt import techniques
from genadapt.config import AdaptConfig
from genadapt.families import artifact_bytes, diffusion
from genadapt.recipes import (
    GracefulStop, append_log, check_finite, check_ranks_agree, gather_states, global_slice, load_trainable_state, make_accelerator,
    process_generators, restore_generators, rewrite_log, stopped, trainable_state, write_run_record,
)
from genadapt.runfolder import check_not_shorter, check_same_data, data_digest
from genadapt.runs import check_resumable, load_checkpoint, save_torch, use_cpu, write_json, write_manifest
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

    `flip`: each image and its mirror. `diffaugment[:policy]`: the image and AUGMENT_VARIANTS − 1 draws of
    DiffAugment (Zhao et al. 2020) from a generator seeded by the run's seed."""
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


def adapt_diffusion(config: AdaptConfig, accelerator=None) -> dict:
    """Train one run into `config.out`; resumes from `checkpoints/state.pt` if it exists."""
    from tqdm.auto import tqdm

    from genadapt.data import load_dataset

    use_cpu()
    out = Path(config.out)
    accelerator = accelerator or make_accelerator(config.mixed_precision, config.gradient_accumulation_steps, config.cpu)
    main = accelerator.is_main_process

    model = diffusion.load(config.base, device=accelerator.device)
    images = load_dataset(
        config.data, resolution=model.resolution, shots=config.shots, seed=config.seed, fit=config.fit,
        background=config.background, caption=config.caption, caption_extension=config.caption_extension,
        caption_column=config.caption_column, strict=config.strict,
    )
    torch.manual_seed(config.seed)  # adapter initialisation draws from the global generator
    technique = techniques.get(config.train, "parameter", "diffusion").build(config.section(config.train))
    technique.prepare(model)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    captions = [technique.caption(c) if hasattr(technique, "caption") else c for c in images.captions]
    model.extras["captions"] = captions
    model.extras["training_metadata"] = {
        "ss_output_name": config.output_name or out.name, "ss_steps": config.steps, "ss_learning_rate": config.lr, "ss_seed": config.seed,
        "ss_num_train_images": len(images), "ss_sd_model_name": config.base,
    }
    losses = []
    for spec in config.loss:
        loss_technique = techniques.get(spec.name, "loss", "diffusion").build(config.section(spec.name))
        loss_technique.prepare(model, images, config)
        losses.append((spec.weight, loss_technique))

    resolved = config.resolved()
    check_resumable(out, STATE_FILE, resolved, ignored={"steps"})  # a longer run continues a shorter one
    check_same_data(out, STATE_FILE, images)
    if main:
        write_run_record(out, config, "diffusion", device=str(accelerator.device), processes=accelerator.num_processes)
        write_manifest(out, config.seed, {"train": images}, {"base": config.base, "resolution": model.resolution, "data_sha256": data_digest(images)})

    pixels, source_index = augmented_pixels(images.tensors(), config.augment, config.seed)
    latents_mean, latents_std = diffusion.encode_images(model, pixels)
    latents_mean, latents_std = latents_mean.cpu(), latents_std.cpu()
    scale = model.vae.config.scaling_factor
    token_ids = diffusion.tokenize(model, captions)[source_index]
    sizes = diffusion.size_ids(model, images.records)[source_index] if model.is_sdxl else None
    trains_text = any(p.requires_grad for n, p in model.named_parameters() if n.startswith("text_encoder"))
    cached_text = None
    if not trains_text:
        with torch.no_grad():
            cached_text = diffusion.encode_text(model, token_ids)

    parameters = technique.parameters(model)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=technique.weight_decay)

    # Only modules with trainable weights go through prepare (DDP refuses a module with none).
    def prepared(module):
        return accelerator.prepare(module) if any(p.requires_grad for p in module.parameters()) else module

    unet = prepared(model.unet)
    text_encoders = [prepared(encoder) for _, encoder in model.text_encoders]
    optimizer = accelerator.prepare(optimizer)

    # One stream every process shares draws the global batch, noise and timesteps (each process takes its
    # slice); a per-process stream serves the loss techniques. Both are checkpointed: a resumed run is the same run.
    shared, local = process_generators(config.seed, accelerator)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_checkpoint(state_path, {"trainable", "optimizer", "shared_generator", "local_generators", "step", "history"})
        load_trainable_state(model, state["trainable"], state_path)
        optimizer.load_state_dict(state["optimizer"])
        restore_generators(state, shared, local, accelerator, state_path)
        start, history = state["step"], state["history"]
        check_not_shorter(start, config.steps, out)
    if main:
        rewrite_log(out, history)  # steps after the last checkpoint are run again

    def checkpoint(done: int) -> None:
        locals_ = gather_states(local, accelerator)
        if main:
            save_torch(state_path, {
                "trainable": trainable_state(model), "optimizer": optimizer.state_dict(), "shared_generator": shared.get_state(),
                "local_generators": locals_, "step": done, "history": history,
            })

    device = accelerator.device
    bar = tqdm(total=config.steps, initial=start, desc=f"adapt {config.train}", unit="step", disable=not main, dynamic_ncols=True)
    started = time.time()
    timesteps_total = model.noise_scheduler.config.num_train_timesteps
    with GracefulStop() as stop:
        for step_index in range(start, config.steps):
            index = global_slice(lambda n: torch.randint(len(latents_mean), (n,), generator=shared), config.batch_size, accelerator)
            shape = latents_mean.shape[1:]
            posterior_noise = global_slice(lambda n: torch.randn((n, *shape), generator=shared), config.batch_size, accelerator)
            noise = global_slice(lambda n: torch.randn((n, *shape), generator=shared), config.batch_size, accelerator)
            timesteps = global_slice(lambda n: torch.randint(0, timesteps_total, (n,), generator=shared), config.batch_size, accelerator)
            latents = (latents_mean[index] + latents_std[index] * posterior_noise) * scale
            noisy, noise, timesteps = diffusion.add_noise(model, latents, shared, timesteps=timesteps, noise=noise)
            with accelerator.accumulate(unet):
                text = cached_text[index] if cached_text is not None else diffusion.encode_text(model, token_ids[index], text_encoders)
                batch_sizes = None if sizes is None else sizes[index]
                prediction = diffusion.predict(model, unet, noisy.to(device), timesteps, text, batch_sizes)
                target = diffusion.target_for(model, latents, noise, timesteps).to(prediction.device)
                terms = {"denoise": diffusion.denoise_loss(prediction, target)}
                step = Step(
                    index=step_index,
                    model=model,
                    batch={"latents": latents, "token_ids": token_ids[index], "text": text, "sizes": batch_sizes, "index": source_index[index]},
                    outputs={"noisy": noisy, "noise": noise, "timesteps": timesteps, "prediction": prediction, "target": target},
                    generator=local,
                )
                total = terms["denoise"]
                for weight, loss_technique in losses:
                    for name, value in loss_technique.loss(step).items():
                        terms[name] = value
                        total = total + weight * value.to(total.device)
                check_finite(terms, step_index + 1, out)
                accelerator.backward(total)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    check_finite({"gradient norm": torch.as_tensor(norm)}, step_index + 1, out)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            done = step_index + 1
            record = {"step": done, "loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
            history.append(record)
            if main:
                append_log(out, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            stopping = stop.requested(accelerator)
            if done % config.checkpointing_steps == 0 or done == config.steps or stopping:
                checkpoint(done)
            if stopping and done != config.steps:
                raise stopped(done, out)
            if main and config.sample_every and done % config.sample_every == 0 and done != config.steps:
                _sample_grid(model, config, validation_prompts(config, images.captions, technique), out / "samples" / f"step-{done:06d}.png")
    bar.close()

    weights_digest = check_ranks_agree(model, accelerator)
    trained = technique.trained_parameters(model) if hasattr(technique, "trained_parameters") else sum(p.numel() for p in parameters)
    summary = {"family": "diffusion", "steps": config.steps, "train_seconds": time.time() - started, "trainable_parameters": trained,
               "device": str(device), "processes": accelerator.num_processes, "weights_sha256": weights_digest,
               "train_images": len(images), "train_variants": len(latents_mean)}
    if main:
        artifacts = technique.save(model, out)
        summary["artifacts"] = [str(Path(a).relative_to(out)) for a in artifacts]
        summary["artifact_bytes"] = artifact_bytes(artifacts)
        _sample_grid(model, config, validation_prompts(config, images.captions, technique), out / "samples" / f"step-{config.steps:06d}.png")
        write_json(out / "prompts.json", captions)  # what the run trained on, token included: how to sample it
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    summary["model"] = model
    summary["history"] = history
    return summary
