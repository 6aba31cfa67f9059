"""LoRA files for diffusers, peft and kohya/A1111/ComfyUI, with the scale kept right.

The alpha trap (diffusion_anchors.md §6, §7.9): kohya applies ΔW = (alpha / r) · up · down, peft
applies (lora_alpha / r), or lora_alpha / sqrt(r) with rsLoRA. The kohya twin therefore stores
`.alpha = scale · r` per module, never a default, so the same ΔW comes out in every tool.

Text-encoder names follow sd-scripts (`networks/lora.py` names modules `lora_te_` + the CLIPTextModel path),
which ComfyUI (`comfy/lora.py::model_lora_keys_clip`: `lora_te_text_model_encoder_layers_{n}_{...}`, and
`lora_te1_`/`lora_te2_` for SDXL) and A1111 (`extensions-builtin/Lora/networks.py`,
`convert_diffusers_name_to_compvis`) match literally. transformers 5 flattened `CLIPTextModel` (no `text_model`
level), so the path peft gives is put back under `text_model.` here.

DoRA runs get no kohya twin (see :data:`DORA_NOTE`); their diffusers file and peft folder hold the magnitude.
"""

from __future__ import annotations

import json
import os
import math
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from genadapt.errors import UserError
from genadapt.runs import readable_mode, save_safetensors

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PEFT_FOLDER = "peft"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # the key prefix PeftModel.save_pretrained writes
# peft: W' = m · (W + ΔW) / ||W + ΔW|| per output row (peft tuners/lora/dora.py). A1111
# (extensions-builtin/Lora/network.py::apply_weight_decompose) always normalises per input column, which no
# dora_scale turns into peft's per-row W'. ComfyUI (comfy/weight_adapter/base.py::weight_decompose) normalises per
# input column too, unless dora_scale.shape[0] is the output size; that branch divides by the *base* weight's row
# norm, a bug with an open fix (Comfy-Org/ComfyUI#15458). Only a dora_scale computed around that bug would match
# ComfyUI today, and it would be wrong in A1111, in diffusers (which reads dora_scale as peft's m) and in ComfyUI
# once the fix lands; so DoRA runs get no twin.
DORA_NOTE = (
    "note: no kohya twin for a DoRA run: A1111 and ComfyUI apply dora_scale per input column (ComfyUI's per-output "
    "branch divides by the base weight's norm), peft per output row of W+dW, so no dora_scale reproduces this run there; "
    f"use {DIFFUSERS_FILE} (diffusers) or the peft folder"
)


def adapter_state(module, adapter: str) -> dict[str, torch.Tensor]:
    """peft-named tensors (`...to_q.lora_A.weight`), adapter name stripped."""
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().float().cpu() for key, value in get_peft_model_state_dict(module, adapter_name=adapter).items()}


def to_kohya(state: dict[str, torch.Tensor], prefix: str, scale: float) -> dict[str, torch.Tensor]:
    """peft keys -> `lora_unet_down_blocks_0_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    (DoRA magnitudes are not converted: see :data:`DORA_NOTE`.)"""
    out = {}
    for key, value in state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                name = f"{prefix}_{module.replace('.', '_')}"
                out[name + kohya_part] = value
                if peft_part == ".lora_A.weight":
                    rank = value.shape[0]
                    out[name + ".alpha"] = torch.tensor(scale * rank)
                break
    return out


def kohya_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's peft keys under the CLIPTextModel path sd-scripts names (`text_model.encoder.layers.0...`):
    transformers 5's flattened CLIPTextModel gives `encoder.layers.0...`, which no kohya-format loader maps."""
    return {key if key.startswith("text_model.") or not key.startswith(CLIP_TEXT_PARTS) else f"text_model.{key}": value for key, value in state.items()}


CLIP_TEXT_PARTS = ("encoder.", "embeddings.", "final_layer_norm.")  # what CLIPTextTransformer holds (text_projection sits beside it)


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
    # DoRA on a text encoder: diffusers loads it with transformers' load_adapter, which renames a bare
    # `x.lora_magnitude_vector` to `x.lora_magnitude_vector.<adapter>` and so misses peft's parameter
    # `...<adapter>.weight` (the magnitude silently stays at its init); the `.weight` spelling loads.
    diffusers_text = [{f"{k}.weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()} for state in text_states]
    common = dict(
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=diffusers_text[0] or None,
        unet_lora_adapter_metadata=technique.peft_config(technique.targets).to_dict(),
        text_encoder_lora_adapter_metadata=text_metadata,
        weight_name=DIFFUSERS_FILE,
    )
    if model.is_sdxl:
        StableDiffusionXLPipeline.save_lora_weights(
            staging, text_encoder_2_lora_layers=diffusers_text[1] or None, text_encoder_2_lora_adapter_metadata=text_metadata, **common
        )
    else:
        StableDiffusionPipeline.save_lora_weights(staging, **common)
    (staging / DIFFUSERS_FILE).replace(out / DIFFUSERS_FILE)
    os.chmod(out / DIFFUSERS_FILE, readable_mode())
    shutil.rmtree(staging, ignore_errors=True)

    files = [out / DIFFUSERS_FILE]
    kohya = None
    if getattr(technique, "use_dora", False):
        print(DORA_NOTE)
    else:
        kohya = kohya_state(model, unet_state, text_states, technique.scale)
    if kohya is not None:
        files.append(save_safetensors(out / KOHYA_FILE, kohya, kohya_metadata(
            technique, metadata or {}, model.resolution, model.is_sdxl,
            "v" if model.noise_scheduler.config.prediction_type == "v_prediction" else "epsilon",
        )))

    peft_folder = out / PEFT_FOLDER
    write_peft_adapter(peft_folder, unet_state, technique.peft_config(technique.targets))
    if technique.trains_text_encoder:
        # One adapter folder per encoder, each what PeftModel.save_pretrained writes for that module alone.
        for name, text_state in zip(("text_encoder", "text_encoder_2"), text_states):
            write_peft_adapter(peft_folder / name, text_state, technique.peft_config(TEXT_ENCODER_TARGETS))
    return files + [peft_folder]


def write_peft_adapter(folder: Path, state: dict[str, torch.Tensor], config) -> Path:
    """peft's adapter layout (peft `PeftModel.save_pretrained`): `adapter_model.safetensors` with
    `base_model.model.<module>.lora_A.weight` keys (adapter name stripped) and `adapter_config.json`;
    `PeftModel.from_pretrained(module, folder)` loads it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / PEFT_WEIGHTS, {PEFT_PREFIX + key: value for key, value in state.items()}, {"format": "pt"})
    config.save_pretrained(str(folder))  # peft's own writer of adapter_config.json
    return folder


def kohya_state(model, unet_state: dict, text_states: list[dict], scale: float) -> dict | None:
    """kohya names: SD 1.x keeps diffusers' module paths (`lora_unet_`, `lora_te_`); SDXL uses the
    original UNet's paths and `lora_te1_`/`lora_te2_`. None (with a note) if a module has no SDXL name."""
    text_states = [kohya_text_state(text_state) for text_state in text_states]
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


# ----------------------------------------------------------------------------- files users pass in

MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header (safetensors/src/tensor.rs MAX_HEADER_SIZE)
MAX_TENSORS = 200_000  # SDXL's full LoCon with both text encoders is ~10k tensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def inspect_safetensors(path: Path, what: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """{key: (shape, dtype)} and the metadata of a .safetensors file a user passed, from its header alone (no
    tensor is read); anything but a whole safetensors file is a one-line UserError that names the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    again = "download or copy it again"
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{what} {path}: the file is empty; {again}")
    with path.open("rb") as handle:
        head, first = handle.read(8), handle.read(1)
    # A safetensors header is JSON right after its 8-byte length (whose first byte may well be 0x80); a torch.save
    # zip archive starts with PK, a bare pickle with its protocol byte 0x80 and no JSON after.
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and first != b"{"):
        raise UserError(f"{what} {path}: a PyTorch pickle named .safetensors; genadapt never unpickles, convert it to safetensors with the tool that wrote it")
    header = int.from_bytes(head, "little") if len(head) == 8 else -1
    if header > MAX_HEADER_BYTES:
        raise UserError(f"{what} {path}: not a safetensors file (its header claims {header:,} bytes, safetensors allows {MAX_HEADER_BYTES:,}); {again}")
    if header < 0 or 8 + header > size:
        raise UserError(f"{what} {path}: the file is truncated ({size:,} bytes, shorter than its own header says); {again}")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            if len(keys) > MAX_TENSORS:
                raise UserError(f"{what} {path}: {len(keys):,} tensors, more than any adapter holds ({MAX_TENSORS:,}); pass the adapter file, not a model")
            tensors = {}
            for key in keys:
                part = handle.get_slice(key)
                tensors[key] = (tuple(part.get_shape()), part.get_dtype())
    except SafetensorError as exc:
        reason = str(exc).rsplit(": ", 1)[-1]
        raise UserError(f"{what} {path}: not a readable safetensors file ({reason}); the file is damaged or truncated, {again}") from None
    return tensors, metadata


def module_weights(model) -> dict[str, dict[str, torch.Size]]:
    """{component: {module path: weight shape}} of every Linear/Conv the base has (a peft-wrapped module by its
    base layer's weight), the modules a LoRA can name."""
    found = {}
    for component, module in model.modules().items():
        shapes = {}
        for name, child in module.named_modules():
            weight = getattr(getattr(child, "base_layer", child), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim in (2, 4) and ".lora_" not in name and not name.endswith(".base_layer"):
                shapes[name] = weight.shape
        found[component] = shapes
    return found


KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude"}
PEFT_PARTS = {  # diffusers/peft suffixes, and the older diffusers ones its loader still converts
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "bias", ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", "_lora.down.weight": "down", "_lora.up.weight": "up", ".alpha": "alpha",
}
TEXT_COMPONENTS = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


def kohya_names(model, shapes: dict[str, dict[str, torch.Size]]) -> dict[str, tuple[str, str]]:
    """{kohya module name: (component, module path)}: the names diffusers' kohya loader and ComfyUI map
    (`lora_unet_` + diffusers path or the original UNet's path, `lora_te[1|2]_` + the CLIP path with or
    without `text_model_`)."""
    names = {}
    for path in shapes["unet"]:
        names["lora_unet_" + path.replace(".", "_")] = ("unet", path)
        sgm = sgm_unet_key(path, model.unet.config)
        if sgm is not None:
            names["lora_unet_" + sgm.replace(".", "_")] = ("unet", path)
    for prefix, component in TEXT_COMPONENTS.items():
        for path in shapes.get(component, {}):
            flat = path.removeprefix("text_model.")
            names[f"{prefix}_{flat.replace('.', '_')}"] = (component, path)
            names[f"{prefix}_text_model_{flat.replace('.', '_')}"] = (component, path)
    return names


def lora_modules(model, tensors: dict, path: Path, what: str) -> dict[tuple[str, str], dict[str, tuple]]:
    """{(component, module path): {part: (shape, dtype)}} for every key of a LoRA file, or a UserError that names a
    key which is no LoRA tensor or names no module of this base."""
    shapes = module_weights(model)
    kohya = None
    found, unmatched = {}, []
    for key, info in tensors.items():
        target = part = None
        name, _, suffix = key.partition(".")
        if name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            part = KOHYA_PARTS.get(suffix)
            if part is None and suffix.startswith(("hada_", "lokr_")):
                raise UserError(f"{what} {path}: a LyCORIS LoHa/LoKr file ({key}); --lora takes LoRA files, sample the LoHa/LoKr run folder itself")
            if part is None and suffix == "lora_mid.weight":
                raise UserError(f"{what} {path}: a LoCon file with Tucker cores ({key}), which diffusers' load_lora_weights (what --lora uses) cannot apply")
            kohya = kohya if kohya is not None else kohya_names(model, shapes)
            target = kohya.get(name)
        else:
            ending = next((end for end in PEFT_PARTS if key.endswith(end)), None)
            if ending is not None:
                part = PEFT_PARTS[ending]
                module = key[: -len(ending)].removeprefix(PEFT_PREFIX)
                component, _, rest = module.partition(".")
                if component not in shapes:
                    component, rest = "unet", module  # diffusers reads unprefixed keys as the UNet's
                rest = re.sub(r"\.processor\.(to_[qkv])$", r".\1", rest)  # diffusers' old attention-processor keys
                rest = re.sub(r"\.processor\.to_out$", ".to_out.0", rest)
                candidates = [rest, rest.removeprefix("text_model."), "text_model." + rest]
                target = next(((component, c) for c in candidates if c in shapes[component]), None)
        if part is None:
            raise UserError(f"{what} {path}: {key} is not a LoRA tensor (lora_down/lora_up/alpha, or lora_A/lora_B); pass a LoRA .safetensors file")
        if target is None:
            unmatched.append(key)
            continue
        found.setdefault(target, {})[part] = info
    if unmatched:
        amount = "none of its keys" if not found else f"{len(unmatched)} of its {len(tensors)} keys"
        raise UserError(f"{what} {path}: {amount} name a module of this base (e.g. {unmatched[0]}); it was trained for another model")
    if not found:
        raise UserError(f"{what} {path}: holds no LoRA tensors; pass a LoRA .safetensors file")
    for (component, module), parts in found.items():
        weight = shapes[component][module]
        check_lora_shapes(parts, weight, f"{what} {path}: {component} {module}")
    return found


def check_lora_shapes(parts: dict[str, tuple], weight: torch.Size, where: str) -> None:
    """down [r, in(, k, k)], up [out, r(, 1, 1)], alpha one number, a magnitude of out (or in) numbers, for a
    weight [out, in(, k, k)]."""
    out_features, in_features = weight[0], weight[1]
    down, up = parts.get("down"), parts.get("up")
    if down is None or up is None:
        raise UserError(f"{where}: has {'up' if down is None else 'down'} but no {'down' if down is None else 'up'} matrix; the file is incomplete")
    (down_shape, _), (up_shape, _) = down, up
    fits = (
        len(down_shape) == len(up_shape) == len(weight) and down_shape[1] == in_features and up_shape[0] == out_features
        and up_shape[1] == down_shape[0] and (len(weight) == 2 or (tuple(down_shape[2:]) in (tuple(weight[2:]), (1, 1)) and tuple(up_shape[2:]) == (1, 1)))
    )
    if not fits:
        raise UserError(f"{where}: down {list(down_shape)} and up {list(up_shape)} do not fit its weight {list(weight)}; the LoRA was trained for another model")
    if "alpha" in parts and math.prod(parts["alpha"][0]) != 1:
        raise UserError(f"{where}: alpha has shape {list(parts['alpha'][0])}, one number expected")
    if "magnitude" in parts and math.prod(parts["magnitude"][0]) not in (out_features, in_features):
        raise UserError(f"{where}: the DoRA magnitude has shape {list(parts['magnitude'][0])}, {out_features} numbers expected")


def check_lora_file(model, path: Path, what: str = "--lora") -> None:
    """Everything diffusers' load_lora_weights would trip on, as one-line UserErrors before it runs: a whole
    safetensors file, no larger than the base it adapts, every key a LoRA tensor of a module of this base with
    shapes that fit, and every value finite."""
    from safetensors.torch import load_file

    tensors, _ = inspect_safetensors(path, what)
    declared = sum(math.prod(shape) * DTYPE_BYTES.get(dtype, 8) for shape, dtype in tensors.values())
    base = sum(p.numel() * p.element_size() for module in model.modules().values() for p in module.parameters())
    if declared > 2 * base:
        raise UserError(f"{what} {path}: declares {declared / 2**20:,.1f} MiB of tensors, more than twice the base model it would adapt ({base / 2**20:,.1f} MiB); pass a LoRA of this model")
    lora_modules(model, tensors, path, what)
    for key, value in load_file(str(path)).items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{what} {path}: {key} holds NaN or inf; the run that wrote it diverged, retrain it or pass another file")
