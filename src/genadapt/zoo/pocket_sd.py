"""pocket-sd: Stable Diffusion's components in miniature, pretrained on the OpenMoji source split.

`AutoencoderKL` (32x32 RGB -> 8x8x4 latents), a small `CLIPTextModel` with a CLIP-format
tokenizer built from the caption vocabulary, a cross-attention `UNet2DConditionModel`, and
SD 1.x's noise schedule (scaled-linear betas, epsilon prediction). Saved as a diffusers
`StableDiffusionPipeline` folder, so diffusers, kohya and A1111-style tools see an SD layout.

Pretraining runs in stages (tokenizer, VAE, latent cache, UNet + text encoder), each
checkpointed atomically; rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from genadapt.runs import (
    append_jsonl,
    load_torch,
    module_states,
    progress,
    restore_states,
    save_torch,
    use_cpu,
    write_json,
    write_manifest,
    write_yaml,
)


@dataclass
class PocketSDConfig:
    seed: int = 0
    data: str = "builtin:openmoji/source/train"  # source/reference is held out for the KID on its card
    resolution: int = 32
    vocab_size: int = 2048
    # VAE: the probe in shared/research/cpu_pretraining.md, which reconstructs recognisably in 15 min.
    vae_channels: tuple = (32, 64, 64)
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # Text encoder: CLIP's architecture, tiny; 77 positions like SD so prompt tooling works.
    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    # UNet on 8x8x4 latents: cross-attention at 8x8 and 4x4 (SD puts it at every level but the last).
    unet_channels: tuple = (64, 128, 128)
    unet_heads: int = 4
    unet_steps: int = 6000  # length of the LR schedule
    unet_stop_after: int = 4500  # the shipped model is this step's EMA (CPU time ran out; see its card)
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # so classifier-free guidance works (Ho & Salimans 2022)
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    log_every: int = 50
    sample_every: int = 1500
    sample_prompts: tuple = (
        "grinning face",
        "red apple",
        "cat face",
        "rocket",
        "thumbs up sign medium skin tone",
        "house building",
        "sun with face",
        "automobile",
    )
    threads: int = 1  # 1 thread: with any other process on a 2-core box, 2 OpenMP threads stall at every barrier


def noise_scheduler_config() -> dict:
    """Stable Diffusion 1.x's schedule; clip_sample=False is required for latents (see cpu_pretraining.md)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def build_vae(config: PocketSDConfig):
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=config.resolution,
    )


def build_text_encoder(config: PocketSDConfig, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            projection_dim=config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_unet(config: PocketSDConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=config.resolution // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=1,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.unet_heads,  # diffusers' SD naming: this is the number of heads
        norm_num_groups=32,
    )




def _ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1.0 - decay)


def train_vae(config: PocketSDConfig, images, out: Path):
    """L1 reconstruction + KL (weight 1e-6), as the probe; checkpointed and resumable."""
    import torch
    import torch.nn.functional as F

    final = out / "vae"
    if (final / "config.json").is_file():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(0.5 * (1 + np.cos(np.pi * min(step, config.vae_steps) / config.vae_steps)))
    )
    step, state_path = 0, out / "checkpoints" / "vae-state.pt"
    if state_path.is_file():
        state = load_torch(state_path)
        restore_states(state, {"model": vae, "optimizer": optimizer, "schedule": schedule})
        torch.set_rng_state(state["rng"])
        step = state["step"]
        print(f"resuming from step {step} ({state_path})", file=sys.stderr)
    pixels = images.tensors()
    bar = progress(config.vae_steps, step, "pocket-sd VAE")
    vae.train()
    while step < config.vae_steps:
        batch = pixels[torch.randint(len(pixels), (config.vae_batch,))]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, batch)
        kl = posterior.kl().mean()
        loss = l1 + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        bar.update(1)
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if step % config.log_every == 0:
            append_jsonl(out / "log.jsonl", {"stage": "vae", "step": step, "l1": l1.item(), "kl": kl.item()})
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            save_torch(
                state_path,
                {**module_states({"model": vae, "optimizer": optimizer, "schedule": schedule}), "rng": torch.get_rng_state(), "step": step},
            )
    bar.close()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    # SD's scaling_factor: latents * factor have unit variance for the UNet.
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.save_pretrained(final)
    return vae


def encode_latents(vae, images, out: Path):
    """Posterior mean and std of every training image, computed once (the set is fixed)."""
    import torch
    from safetensors.torch import load_file

    from genadapt.runs import save_safetensors

    path = out / "latents.safetensors"
    if path.is_file():
        cached = load_file(path)
        return cached["mean"], cached["std"]
    vae.eval()
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.tensors().split(256):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    save_safetensors(path, {"mean": mean, "std": std})
    return mean, std


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**noise_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_unet(config: PocketSDConfig, images, vae, tokenizer, out: Path):
    """Denoising loss (Ho et al. 2020, eps-prediction) on cached latents, text encoder trained jointly."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from genadapt.grid import save_grid

    mean, std = encode_latents(vae, images, out)
    scale = vae.config.scaling_factor
    token_ids = tokenizer(images.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids

    torch.manual_seed(config.seed + 1)
    text_encoder = build_text_encoder(config, len(tokenizer))
    unet = build_unet(config)
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: float(
            min(1.0, (step + 1) / config.warmup_steps)
            * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(step, config.unet_steps) / config.unet_steps)))
        ),
    )
    noise_scheduler = DDPMScheduler.from_config(noise_scheduler_config())
    trained = {
        "unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text,
        "optimizer": optimizer, "schedule": schedule,
    }
    step, state_path = 0, out / "checkpoints" / "unet-state.pt"
    if state_path.is_file():
        state = load_torch(state_path)
        restore_states(state, trained)
        torch.set_rng_state(state["rng"])
        step = state["step"]
        print(f"resuming from step {step} ({state_path})", file=sys.stderr)

    end = min(config.unet_steps, config.unet_stop_after or config.unet_steps)
    bar = progress(end, step, "pocket-sd UNet")
    started, losses = time.time(), []
    while step < end:
        index = torch.randint(len(mean), (config.unet_batch,))
        latents = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
        ids = token_ids[index].clone()
        ids[torch.rand(len(ids)) < config.caption_dropout] = empty_ids[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        text_embeds = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, text_embeds).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        # EMA warm-up (as in the probe): early averages would otherwise be dominated by noise.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % config.log_every == 0:
            append_jsonl(out / "log.jsonl", {"stage": "unet", "step": step, "loss": float(np.mean(losses[-50:])), "lr": schedule.get_last_lr()[0], "seconds": time.time() - started})
        if step % config.checkpoint_every == 0 or step == end:
            save_torch(
                state_path,
                {**module_states(trained), "rng": torch.get_rng_state(), "step": step},
            )
        if step % config.sample_every == 0 or step == end:
            pipeline = make_pipeline(vae, ema_text, tokenizer, ema_unet)
            grid = sample_prompts(pipeline, list(config.sample_prompts), per_prompt=2, seed=config.seed)
            save_grid(grid, out / "samples" / f"step-{step:06d}.png", columns=len(config.sample_prompts), scale=2)
    bar.close()
    return ema_text, ema_unet


def sample_prompts(pipeline, prompts: list[str], per_prompt: int = 1, steps: int = 25, guidance: float = 4.0, seed: int = 0):
    """NCHW images in [-1, 1], `per_prompt` rows of one column per prompt."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(per_prompt):
        result = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt")
        rows.append(result.images.mul(2).sub(1))
    return torch.cat(rows)


def pipeline_from_checkpoint(out: Path, config: PocketSDConfig):
    """The EMA model of an unfinished run, as a pipeline: look at (or use) a run before it ends."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    state = load_torch(out / "checkpoints" / "unet-state.pt")
    text_encoder, unet = build_text_encoder(config, len(tokenizer)), build_unet(config)
    text_encoder.load_state_dict(state["ema_text"])
    unet.load_state_dict(state["ema_unet"])
    return make_pipeline(AutoencoderKL.from_pretrained(out / "vae"), text_encoder, tokenizer, unet), state["step"]


def pretrain(out: Path, config: PocketSDConfig | None = None) -> Path:
    """Every stage, resumable; returns the diffusers pipeline folder `out/pipeline`."""
    from transformers import CLIPTokenizer

    from genadapt.data import load_dataset
    from genadapt.zoo.tokenizer import train_clip_bpe

    config = config or PocketSDConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_cpu(config.threads)
    write_yaml(out / "config.yaml", {"model": "pocket-sd", **asdict(config)})
    images = load_dataset(config.data, resolution=config.resolution)
    write_manifest(out, config.seed, {"train": images})
    if not (out / "tokenizer" / "vocab.json").is_file():
        train_clip_bpe(images.captions, out / "tokenizer", vocab_size=config.vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    vae = train_vae(config, images, out)
    text_encoder, unet = train_unet(config, images, vae, tokenizer, out)
    import os
    import shutil

    pipeline = make_pipeline(vae, text_encoder, tokenizer, unet)
    staging = out / "pipeline.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    # transformers 5 saves only tokenizer.json; CLIP's own vocab.json + merges.txt are what SD tools read.
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy2(out / "tokenizer" / name, staging / "tokenizer" / name)
    write_json(staging / "genadapt.json", {"model": "pocket-sd", "resolution": config.resolution, "trained_on": config.data})
    shutil.rmtree(out / "pipeline", ignore_errors=True)
    os.replace(staging, out / "pipeline")
    return out / "pipeline"
