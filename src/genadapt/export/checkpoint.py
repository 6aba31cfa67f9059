"""Single-file checkpoints in the original Stable Diffusion (CompVis ldm) layout, the only kind A1111 lists.

One safetensors file with the UNet under `model.diffusion_model.` (openaimodel's `input_blocks`/`middle_block`/
`output_blocks` numbering, the same that :func:`genadapt.export.lora.sgm_unet_key` gives kohya's SDXL names), the
VAE under `first_stage_model.` (ldm's `encoder.down.{i}.block.{j}`, `mid.attn_1.q` as 1x1 convs, the decoder's
`up` levels numbered from the bottom) and the text encoder under `cond_stage_model.transformer.text_model.`.

Checked against the loader that reads it back: diffusers' `StableDiffusionPipeline.from_single_file`
(`loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, which detects SD 1.x by `cond_stage_model.transformer.text_model.embeddings.
position_embedding.weight`); `tests/test_exports.py` requires every weight back bitwise. ComfyUI reads the same
names (`comfy/supported_models.py` SD15.process_clip_state_dict: `cond_stage_model.transformer.text_model.`;
`comfy/model_detection.py` counts `model.diffusion_model.input_blocks`), as does A1111's ldm config.

SD 1.x only: SD 2.x stores OpenCLIP (`cond_stage_model.model.transformer.resblocks...`, q/k/v fused) and SDXL two
encoders (`conditioner.embedders.0/1`); neither is written, and the run says so before training.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from genadapt.errors import UserError
from genadapt.export.lora import sgm_unet_key
from genadapt.runs import save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_WIDTH = 1024  # SD 2.x's OpenCLIP-H text width (SD 1.x: CLIP-L, 768)

VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_ldm_key(name: str, config) -> str | None:
    """A diffusers UNet parameter name -> its name in the original UNet, or None."""
    module, _, parameter = name.rpartition(".")
    if module == "conv_norm_out":
        return f"out.0.{parameter}"
    parts = module.split(".")
    if len(parts) > 1 and parts[-1] in ("norm1", "norm2") and parts[-3] == "resnets":
        # ResBlock: in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, dropout, conv].
        conv = sgm_unet_key(".".join(parts[:-1] + ["conv1"]), config)
        block = conv.removesuffix(".in_layers.2") if conv else None
        return f"{block}.{'in_layers.0' if parts[-1] == 'norm1' else 'out_layers.0'}.{parameter}" if block else None
    original = sgm_unet_key(module, config)
    return f"{original}.{parameter}" if original else None


def vae_ldm_key(name: str, config) -> str:
    """A diffusers AutoencoderKL parameter name -> ldm's (the inverse of diffusers' convert_ldm_vae_checkpoint)."""
    levels = len(config.up_block_types)
    rules = (
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"encoder.down.{m[1]}.downsample.conv."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}."),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
    )
    for pattern, replace in rules:
        match = re.match(pattern, name)
        if match:
            return (replace(match) + name[match.end():]).replace(".conv_shortcut.", ".nin_shortcut.")
    return name  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def check_single_file(model, flag: str = "--save-single-file") -> None:
    """Refuse, before any training, a base whose original layout genadapt does not write, or a UNet with a
    module the original layout has no name for."""
    if model.is_sdxl:
        raise UserError(f"{flag}: SDXL single files (conditioner.embedders.0/1) are not written yet; the run's pipeline folder loads in diffusers and ComfyUI")
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if width == OPENCLIP_WIDTH:
        raise UserError(f"{flag}: this base looks like SD 2.x (text width {width}, OpenCLIP), whose single-file layout is not written; use the run's pipeline folder")
    missing = [name for name in model.unet.state_dict() if unet_ldm_key(name, model.unet.config) is None]
    if missing:
        raise UserError(f"{flag}: the UNet's {missing[0]} has no name in the original SD layout; use the run's pipeline folder")


def ldm_state(model) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoder under their original SD 1.x names, as they are (no dtype change)."""
    check_single_file(model)
    state = {UNET_PREFIX + unet_ldm_key(name, model.unet.config): value for name, value in model.unet.state_dict().items()}
    for name, value in model.vae.state_dict().items():
        key = vae_ldm_key(name, model.vae.config)
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's AttnBlock uses 1x1 convs where diffusers has Linear
        state[VAE_PREFIX + key] = value
    for name, value in model.text_encoder.state_dict().items():
        if not name.endswith("position_ids"):
            state[CLIP_PREFIX + name.removeprefix("text_model.")] = value
    return state


def save_single_file(model, path: Path, title: str) -> Path:
    """`<output name>.safetensors`: the whole pipeline's weights in the original layout, with the SAI model spec."""
    prediction = "v" if model.noise_scheduler.config.prediction_type == "v_prediction" else "epsilon"
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": title,
        "modelspec.prediction_type": prediction,
        "modelspec.resolution": f"{model.resolution}x{model.resolution}",
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
        "ss_training_comment": "trained with genadapt",
    }
    return save_safetensors(Path(path), ldm_state(model), metadata)
