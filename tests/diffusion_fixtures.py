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


def build_tiny_sdxl_pipeline(folder: Path) -> Path:
    """SDXL's component set in miniature: two CLIP encoders (the second with a projection),
    a UNet with text_time added conditioning and SDXL's block layout (layers_per_block=2). As in
    SDXL's own files, the encoder configs say eos_token_id=2 and tokenizer_2 pads with "!"."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    captions = load_dataset("builtin:digits", resolution=32).captions + ["a picture of a flag", "emoji"]
    train_clip_bpe(captions, folder / "tok", vocab_size=TINY.vocab_size)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tok")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=2,
        attention_head_dim=(2, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + six size numbers
        cross_attention_dim=64,  # both encoders' states, concatenated
        norm_num_groups=32,
    )
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    pipeline = StableDiffusionXLPipeline(
        vae=pocket_sd.build_vae(TINY),
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tok", pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(**pocket_sd.noise_scheduler_config()),
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"
