"""LoRA files for diffusers, peft and kohya/A1111/ComfyUI, with the scale kept right.

The alpha trap (diffusion_anchors.md §6, §7.9): kohya applies ΔW = (alpha / r) · up · down, peft
applies (lora_alpha / r), or lora_alpha / sqrt(r) with rsLoRA. The kohya twin therefore stores
`.alpha = scale · r` per module, never a default, so the same ΔW comes out in every tool.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from genadapt.runs import save_safetensors

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def adapter_state(module, adapter: str) -> dict[str, torch.Tensor]:
    """peft-named tensors (`...to_q.lora_A.weight`), adapter name stripped."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().float().cpu() for key, value in get_peft_model_state_dict(module, adapter_name=adapter).items()}


def to_kohya(state: dict[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """peft keys -> `lora_unet_down_blocks_0_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    out = {}
    for key, value in state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"), (".lora_magnitude_vector", ".dora_scale")):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                name = f"{prefix}_{module.replace('.', '_')}"
                out[name + kohya_part] = value
                if peft_part == ".lora_A.weight":
                    rank = value.shape[0]
                    out[name + ".alpha"] = torch.tensor(scale * rank)
                break
    return out


RESNET_TO_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def sgm_unet_key(module: str, unet_config) -> str | None:
    """diffusers UNet module path -> the original (SGM) path that kohya's SDXL LoRAs name, or None.

    SGM numbers blocks flat: input_blocks[1 + level·(L+1) + j], output_blocks[level·(L+1) + j] with L
    diffusers' layers_per_block (each input level but the last ends with a downsampler at index
    (level+1)·(L+1); each output level has L+1 layers, the last holding the upsampler); inside a block
    0 is the resnet, then the transformer, then the upsampler. The inverse of diffusers'
    `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key`.
    """
    import re

    if module in TOP_LEVEL_TO_SGM:
        return TOP_LEVEL_TO_SGM[module]
    layers = unet_config.layers_per_block
    parts = module.split(".")
    inner = {"resnets": "0", "attentions": "1"}
    if parts[0] == "down_blocks" and parts[2:5] == ["downsamplers", "0", "conv"]:
        return f"input_blocks.{(int(parts[1]) + 1) * (layers + 1)}.0.op"
    if parts[0] == "up_blocks" and parts[2:5] == ["upsamplers", "0", "conv"]:
        level = int(parts[1])
        position = 2 if "CrossAttn" in unet_config.up_block_types[level] else 1
        return f"output_blocks.{level * (layers + 1) + layers}.{position}.conv"
    if re.fullmatch(r"(down|up)_blocks", parts[0]) and len(parts) > 4 and parts[2] in inner:
        level, layer = int(parts[1]), int(parts[3])
        offset = 1 if parts[0] == "down_blocks" else 0
        block = f"{'input' if offset else 'output'}_blocks.{offset + level * (layers + 1) + layer}.{inner[parts[2]]}"
        kind, rest = parts[2], parts[4:]
    elif parts[0] == "mid_block" and len(parts) > 3 and parts[1] in inner:
        block = f"middle_block.{int(parts[2]) * 2 if parts[1] == 'resnets' else 1}"
        kind, rest = parts[1], parts[3:]
    else:
        return None
    if kind == "resnets":
        name = ".".join(rest)
        if name not in RESNET_TO_SGM:
            return None
        rest = [RESNET_TO_SGM[name]]
    return ".".join([block, *rest])


def kohya_metadata(technique, metadata: dict, resolution: int, sdxl: bool = False, prediction_type: str = "epsilon") -> dict[str, str]:
    """sd-scripts' minimum `ss_*` keys plus the SAI model spec, all strings (safetensors requires it)."""
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(technique.rank),
        "ss_network_alpha": str(technique.scale * technique.rank),
        "ss_network_args": json.dumps({"use_dora": technique.use_dora, "use_rslora": technique.use_rslora}),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_training_comment": "trained with genadapt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        # SDXL twins name the original UNet's modules, so kohya records Stability's implementation.
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": str(metadata.get("ss_output_name", "genadapt LoRA")),
        "modelspec.prediction_type": prediction_type,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
    }
    values.update({key: str(value) for key, value in metadata.items()})
    return values


def save_lora(model, technique, out: Path, metadata: dict | None = None) -> list[Path]:
    """Write the diffusers file, its kohya twin, and a peft adapter folder into `out`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from genadapt.techniques.lora import ADAPTER, TEXT_ENCODER_TARGETS

    out.mkdir(parents=True, exist_ok=True)
    unet_state = adapter_state(model.unet, ADAPTER)
    text_states = [adapter_state(encoder, ADAPTER) if technique.trains_text_encoder else {} for _, encoder in model.text_encoders]
    text_metadata = technique.peft_config(TEXT_ENCODER_TARGETS).to_dict() if technique.trains_text_encoder else None

    staging = out / ".lora.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    # peft key names, as diffusers' own scripts save them: converting to the legacy `lora.down/up`
    # names renames only attention layers, and a file mixing both namings loads partially.
    common = dict(
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=text_states[0] or None,
        unet_lora_adapter_metadata=technique.peft_config(technique.targets).to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
        weight_name=DIFFUSERS_FILE,
    )
    if model.is_sdxl:
        StableDiffusionXLPipeline.save_lora_weights(
            staging, text_encoder_2_lora_layers=text_states[1] or None, text_encoder_2_lora_adapter_metadata=text_metadata, **common
        )
    else:
        StableDiffusionPipeline.save_lora_weights(staging, **common)
    (staging / DIFFUSERS_FILE).replace(out / DIFFUSERS_FILE)
    shutil.rmtree(staging, ignore_errors=True)

    files = [out / DIFFUSERS_FILE]
    kohya = kohya_state(model, unet_state, text_states, technique.scale)
    if kohya is not None:
        files.append(save_safetensors(out / KOHYA_FILE, kohya, kohya_metadata(
            technique, metadata or {}, model.resolution, model.is_sdxl,
            "v" if model.noise_scheduler.config.prediction_type == "v_prediction" else "epsilon",
        )))

    peft_folder = out / "peft"
    peft_folder.mkdir(exist_ok=True)
    save_safetensors(peft_folder / "adapter_model.safetensors", {f"base_model.model.{k}": v for k, v in unet_state.items()})
    config = technique.peft_config(technique.targets).to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], (set, list)) else config["target_modules"]
    (peft_folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    return files + [peft_folder]


def kohya_state(model, unet_state: dict, text_states: list[dict], scale: float) -> dict | None:
    """kohya names: SD 1.x keeps diffusers' module paths (`lora_unet_`, `lora_te_`); SDXL uses the
    original UNet's paths and `lora_te1_`/`lora_te2_`. None (with a note) if a module has no SDXL name."""
    if not model.is_sdxl:
        return {**to_kohya(unet_state, "lora_unet", scale), **to_kohya(text_states[0], "lora_te", scale)}
    renamed = {}
    for key, value in unet_state.items():
        module, _, suffix = key.partition(".lora_")
        sgm = sgm_unet_key(module, model.unet.config)
        if sgm is None:
            print(f"note: no kohya SDXL name for UNet module {module}; only the diffusers file holds this LoRA")
            return None
        renamed[f"{sgm}.lora_{suffix}"] = value
    state = to_kohya(renamed, "lora_unet", scale)
    for prefix, text_state in zip(("lora_te1", "lora_te2"), text_states):
        state.update(to_kohya(text_state, prefix, scale))
    return state
