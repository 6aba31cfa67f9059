"""The diffusion adaptation loop: one readable recipe, driven by accelerate, knowing no technique.

Reads top to bottom: load the base, load the few shots, let the parameter technique decide what
trains and the loss techniques snapshot what they need, cache latents (and text embeddings when
the text encoder is frozen), then step; checkpoint atomically; save the artifact.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from genadapt.config import AdaptConfig
from genadapt.families import diffusion
from genadapt.runs import check_resumable, load_checkpoint, save_torch, use_cpu, write_json, write_manifest, write_yaml
from genadapt.techniques import Step, make_loss_techniques, make_parameter_technique

STATE_FILE = "checkpoints/state.pt"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def _load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


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


def adapt_diffusion(config: AdaptConfig, accelerator=None) -> dict:
    """Train one run into `config.out`; resumes from `checkpoints/state.pt` if it exists."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from genadapt.data import load_dataset

    use_cpu()
    out = Path(config.out)
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    main = accelerator.is_main_process

    model = diffusion.load(config.base)
    images = load_dataset(
        config.data,
        resolution=model.resolution,
        shots=config.shots,
        seed=config.seed,
        fit=config.fit,
        background=config.background,
        caption=config.caption,
        strict=config.strict,
    )
    torch.manual_seed(config.seed)  # adapter initialisation draws from the global generator
    technique = make_parameter_technique(config)
    technique.prepare(model)
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    captions = [technique.caption(c) if hasattr(technique, "caption") else c for c in images.captions]
    model.extras["captions"] = captions
    model.extras["training_metadata"] = {
        "ss_output_name": out.name,
        "ss_steps": config.steps,
        "ss_learning_rate": config.lr,
        "ss_seed": config.seed,
        "ss_num_train_images": len(images),
        "ss_sd_model_name": config.base,
    }
    losses = make_loss_techniques(config)
    for loss_technique in losses:
        loss_technique.prepare(model, images, config)

    resolved = {"family": "diffusion", **json.loads(config.model_dump_json())}
    check_resumable(out, STATE_FILE, resolved, ignored={"steps"})  # a longer run continues a shorter one
    if main:
        write_yaml(out / "config.yaml", resolved)
        write_manifest(out, config.seed, {"train": images}, {"base": config.base, "resolution": model.resolution})

    latents_mean, latents_std = diffusion.encode_images(model, images.tensors())
    scale = model.vae.config.scaling_factor
    token_ids = diffusion.tokenize(model, captions)
    sizes = diffusion.size_ids(model, images.records) if model.is_sdxl else None
    cached_text = None
    if not technique.trains_text_encoder:
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

    # One explicit generator drives batches, noise and timesteps, so a resumed run is the same run;
    # each process of a distributed run draws its own batches (seed + rank), as a sampler would.
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_checkpoint(state_path, {"trainable", "optimizer", "generators", "step", "history"})
        _load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if len(state["generators"]) != accelerator.num_processes:
            from genadapt.errors import UserError

            raise UserError(f"{state_path} was written by {len(state['generators'])} process(es); resume with the same number")
        generator.set_state(state["generators"][accelerator.process_index])
        start, history = state["step"], state["history"]

    bar = tqdm(total=config.steps, initial=start, desc=f"adapt {config.train}", unit="step", disable=not main, dynamic_ncols=True)
    started = time.time()
    for step_index in range(start, config.steps):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        noise_for_latents = torch.randn(latents_mean[index].shape, generator=generator)
        latents = (latents_mean[index] + latents_std[index] * noise_for_latents) * scale
        noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
        with accelerator.accumulate(unet):
            text = cached_text[index] if cached_text is not None else diffusion.encode_text(model, token_ids[index], text_encoders)
            batch_sizes = None if sizes is None else sizes[index]
            prediction = diffusion.predict(model, unet, noisy.to(accelerator.device), timesteps, text, batch_sizes)
            target = diffusion.target_for(model, latents, noise, timesteps).to(prediction.device)
            terms = {"denoise": diffusion.denoise_loss(prediction, target)}
            step = Step(
                index=step_index,
                model=model,
                batch={"latents": latents, "token_ids": token_ids[index], "text": text, "sizes": batch_sizes, "index": index},
                outputs={"noisy": noisy, "noise": noise, "timesteps": timesteps, "prediction": prediction, "target": target},
                generator=generator,
            )
            weighted = dict(terms)
            for loss_technique in losses:
                for name, value in loss_technique.loss(step).items():
                    terms[name] = value
                    weighted[name] = loss_technique.weight * value
            total = sum(weighted.values())
            accelerator.backward(total)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        record = {"step": step_index + 1, "loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = step_index + 1
        if done % config.checkpointing_steps == 0 or done == config.steps:
            # Every rank's generator, so each process of a resumed distributed run continues its own stream.
            generators = gather_object([generator.get_state()]) if accelerator.num_processes > 1 else [generator.get_state()]
            if main:
                save_torch(
                    state_path,
                    {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(), "generators": generators, "step": done, "history": history},
                )
        if main and config.sample_every and done % config.sample_every == 0 and done != config.steps:
            _sample_grid(model, config, validation_prompts(config, images.captions, technique), out / "samples" / f"step-{done:06d}.png")
    bar.close()

    summary = {"steps": config.steps, "train_seconds": time.time() - started, "trainable_parameters": technique.trained_parameters(model) if hasattr(technique, "trained_parameters") else sum(p.numel() for p in parameters)}
    if main:
        artifacts = technique.save(model, out)
        summary["artifacts"] = [str(Path(a).relative_to(out)) for a in artifacts]
        summary["artifact_bytes"] = sum(
            f.stat().st_size for a in artifacts for f in ([Path(a)] if Path(a).is_file() else Path(a).rglob("*")) if f.is_file()
        )
        _sample_grid(model, config, validation_prompts(config, images.captions, technique), out / "samples" / f"step-{config.steps:06d}.png")
        with (out / "log.jsonl").open("w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in history)
        write_json(out / "summary.json", summary)
        write_json(out / "prompts.json", captions)  # what the run trained on, token included: how to sample it
    accelerator.wait_for_everyone()
    summary["model"] = model
    summary["history"] = history
    return summary
