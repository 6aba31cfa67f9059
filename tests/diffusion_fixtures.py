"""A tiny random Stable Diffusion pipeline (same components as pocket-sd), built in seconds for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from genadapt.data import load_dataset
from genadapt.zoo import pocket_sd
from genadapt.zoo.tokenizer import train_clip_bpe

TINY = pocket_sd.PocketSDConfig(
    vae_channels=(16, 16, 16), text_hidden=32, text_layers=1, text_heads=2, unet_channels=(32, 32, 32), unet_heads=2, vocab_size=300
)


def build_tiny_pipeline(folder: Path) -> Path:
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    captions = load_dataset("builtin:digits", resolution=32).captions + ["a picture of a flag", "emoji"]
    train_clip_bpe(captions, folder / "tok", vocab_size=TINY.vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok")
    vae = pocket_sd.build_vae(TINY)
    text_encoder = pocket_sd.build_text_encoder(TINY, len(tokenizer))
    unet = pocket_sd.build_unet(TINY)
    with torch.no_grad():  # diffusers zero-initialises output convs; perturb so outputs depend on every layer
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    pipeline = pocket_sd.make_pipeline(vae, text_encoder, tokenizer, unet)
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
