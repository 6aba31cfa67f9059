"""Random-weight Stable Diffusion 1.5- and SDXL-shaped pipeline folders, built offline, for benchmarks/gpu_check.sh.

    python benchmarks/gpu_shapes.py --kind sd15 --out DIR [--tiny]     # DIR/pipeline, DIR/data
    python benchmarks/gpu_shapes.py --kind sdxl --out DIR [--tiny]

Nothing is downloaded. The UNet takes the numbers of the published configs
(stable-diffusion-v1-5 `unet/config.json`: 860 M parameters; stable-diffusion-xl-base-1.0
`unet/config.json`: 2.6 G parameters), so a training step costs what it costs on the real model. The
text encoders keep the real widths (CLIP ViT-L/14's 768; SDXL's second encoder, OpenCLIP bigG, 1280 with
a 1280-d projection), so the UNet's cross-attention and SDXL's pooled conditioning see real shapes, but
have 2 layers instead of 12/32, and the VAE is small (4 levels, so 8x down to 4 latent channels, as SD's,
with narrow channels): only the UNet step is what the check measures, and genadapt caches the latents.
The tokenizer is a CLIP-format BPE trained here on a few words (as tests/diffusion_fixtures.py builds it),
so the vocabulary is small: textual inversion adds its rows to a small table, which is what it costs anyway.

Weights are saved in fp16 for the real shapes (half the disk: SDXL's UNet is 5.1 GB instead of 10.3 GB);
genadapt loads them as fp32, as it loads any base. `--tiny` keeps each architecture's block layout with a
few channels, for the CPU smoke path (`bash benchmarks/gpu_check.sh --cpu-smoke`).

The folder also gets `data/`: a few synthetic images with kohya `.txt` captions at the training resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- the published numbers

# Stable Diffusion 1.5, unet/config.json (diffusers 0.6 layout; the same as 1.4).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# Stable Diffusion XL base 1.0, unet/config.json.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,  # 768 (CLIP-L penultimate states) + 1280 (bigG penultimate states)
    "use_linear_projection": True,
    "upcast_attention": False,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 size ids x 256
}

# Text encoders at their real widths; depth cut to TEXT_LAYERS (see the module docstring).
TEXT_LAYERS = 2
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}

# A small VAE with SD's latent geometry: 4 levels (8x down), 4 latent channels.
SMALL_VAE = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 32}
SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
RESOLUTION = 512  # what gpu_check trains at (SDXL's native 1024 needs 4x the activations)

# --tiny: each architecture's block layout with a few channels, for the CPU path.
TINY = {
    "sd15": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32, "attention_head_dim": 2, "sample_size": 8},
    "sdxl": {"block_out_channels": [32, 32, 64], "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 2, 4],
             "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 8},
}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "projection_dim": 32}
TINY_VAE = {"block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 16}
TINY_RESOLUTION = 64  # 8x8 latents through a 4-level VAE

WORDS = ("a photo of a red flag, a blue square, a green circle, a striped banner, a yellow star on black, "
         "a white cross, a picture of a sign, an emoji, a tiny model, stripes and stars").split(", ")


def unet_config(kind: str, tiny: bool) -> dict:
    config = dict(SD15_UNET if kind == "sd15" else SDXL_UNET)
    if tiny:
        config.update(TINY[kind])
    return config


def _text_config(widths: dict, vocab_size: int, tiny: bool):
    from transformers import CLIPTextConfig

    widths = {**widths, **(TINY_TEXT if tiny else {})}
    return CLIPTextConfig(
        vocab_size=vocab_size, num_hidden_layers=1 if tiny else TEXT_LAYERS, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, **widths,
    )


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` smooth random images (low-frequency noise, upsampled) with one-line kohya captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(WORDS[index % len(WORDS)])
    return folder


def build(kind: str, out: Path, tiny: bool = False, device: str | None = None, images: int = 4) -> Path:
    """out/pipeline (a diffusers SD or SDXL pipeline folder with random weights) and out/data; returns out/pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from genadapt.zoo import pocket_sd
    from genadapt.zoo.tokenizer import train_clip_bpe

    if kind not in ("sd15", "sdxl"):
        raise SystemExit(f"--kind {kind}: choose sd15 or sdxl")
    out = Path(out)
    torch.manual_seed(0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train_clip_bpe(WORDS * 4, out / "tok", vocab_size=400)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tok")
    with torch.device(device):  # random init of 2.6 G parameters is seconds on a GPU, a minute on CPUs
        unet = UNet2DConditionModel(**unet_config(kind, tiny))
        vae_widths = TINY_VAE if tiny else SMALL_VAE
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=TINY_RESOLUTION if tiny else RESOLUTION,
            scaling_factor=SCALING[kind], force_upcast=True, **vae_widths,
        )
        text_encoder = CLIPTextModel(_text_config(CLIP_L, len(tokenizer), tiny))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(CLIP_BIGG, len(tokenizer), tiny)) if kind == "sdxl" else None
    modules = [unet, vae, text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
    dtype = torch.float32 if tiny else torch.float16
    for module in modules:
        if module.device.type != "cpu" or module.dtype != dtype:
            module.to("cpu", dtype)
    scheduler = DDIMScheduler(**pocket_sd.noise_scheduler_config())  # SD 1.x / SDXL's training schedule
    if kind == "sd15":
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(out / "tok", pad_token="!"), unet=unet, scheduler=scheduler,
        )
    pipeline.save_pretrained(out / "pipeline", safe_serialization=True)
    write_images(out / "data", images, TINY_RESOLUTION if tiny else RESOLUTION)
    parameters = {name: sum(p.numel() for p in module.parameters()) for name, module in
                  (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if module is not None}
    (out / "shape.json").write_text(json.dumps({"kind": kind, "tiny": tiny, "unet": unet_config(kind, tiny), "parameters": parameters,
                                                "resolution": TINY_RESOLUTION if tiny else RESOLUTION}, indent=2))
    return out / "pipeline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", required=True, choices=("sd15", "sdxl"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a few channels per block, for the CPU path")
    parser.add_argument("--device", default=None, help="where to initialise the weights (default: cuda when present)")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = build(args.kind, args.out, args.tiny, args.device)
    shape = json.loads((args.out / "shape.json").read_text())
    counts = ", ".join(f"{name} {count / 1e6:,.1f} M" for name, count in shape["parameters"].items())
    print(f"{args.kind}{' (tiny)' if args.tiny else ''}: {folder} ({counts}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
