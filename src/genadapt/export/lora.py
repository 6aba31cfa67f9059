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


def kohya_metadata(technique, metadata: dict, resolution: int) -> dict[str, str]:
    """sd-scripts' minimum `ss_*` keys plus the SAI model spec, all strings (safetensors requires it)."""
    values = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(technique.rank),
        "ss_network_alpha": str(technique.scale * technique.rank),
        "ss_network_args": json.dumps({"use_dora": technique.use_dora, "use_rslora": technique.use_rslora}),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_training_comment": "trained with genadapt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(timezone.utc).date().isoformat(),
    }
    values.update({key: str(value) for key, value in metadata.items()})
    return values


def save_lora(model, technique, out: Path, metadata: dict | None = None) -> list[Path]:
    """Write the diffusers file, its kohya twin, and a peft adapter folder into `out`."""
    from diffusers import StableDiffusionPipeline

    from genadapt.techniques.lora import ADAPTER, TEXT_ENCODER_TARGETS

    out.mkdir(parents=True, exist_ok=True)
    unet_state = adapter_state(model.unet, ADAPTER)
    text_state = adapter_state(model.text_encoder, ADAPTER) if technique.trains_text_encoder else {}

    staging = out / ".lora.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    # peft key names, as diffusers' own scripts save them: converting to the legacy `lora.down/up`
    # names renames only attention layers, and a file mixing both namings loads partially.
    StableDiffusionPipeline.save_lora_weights(
        staging,
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=text_state or None,
        unet_lora_adapter_metadata=technique.peft_config(technique.targets).to_dict(),
        text_encoder_lora_adapter_metadata=technique.peft_config(TEXT_ENCODER_TARGETS).to_dict() if text_state else None,
        weight_name=DIFFUSERS_FILE,
    )
    (staging / DIFFUSERS_FILE).replace(out / DIFFUSERS_FILE)
    shutil.rmtree(staging, ignore_errors=True)

    kohya = to_kohya(unet_state, "lora_unet", technique.scale)
    kohya.update(to_kohya(text_state, "lora_te", technique.scale))
    save_safetensors(out / KOHYA_FILE, kohya, kohya_metadata(technique, metadata or {}, model.resolution))

    peft_folder = out / "peft"
    peft_folder.mkdir(exist_ok=True)
    save_safetensors(peft_folder / "adapter_model.safetensors", {f"base_model.model.{k}": v for k, v in unet_state.items()})
    config = technique.peft_config(technique.targets).to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], (set, list)) else config["target_modules"]
    (peft_folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    return [out / DIFFUSERS_FILE, out / KOHYA_FILE, peft_folder]
