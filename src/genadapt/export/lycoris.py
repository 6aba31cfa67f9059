"""LyCORIS files (LoHa, LoKr) for A1111, ComfyUI and LyCORIS, with the scale kept right; and the peft folder
a run is reloaded from.

A LyCORIS file names each adapted module as kohya does (`lora_unet_<diffusers module path, . -> _>`; SDXL: the
original UNet's paths, as the LoRA twin) and holds the module's factors under the names and orientations peft
already uses, since peft's LoHa/LoKr layers copy LyCORIS's modules (`lycoris/modules/loha.py`, `lokr.py`):

* LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in·k·k] (and `hada_w2_*`); with Tucker (`use_tucker`) on a k×k
  conv, `hada_w*_a` [r, out], `hada_w*_b` [r, in], `hada_t*` [r, r, k, k].
* LoKr: `lokr_w1` [a, c] or `lokr_w1_a` [a, r] · `lokr_w1_b` [r, c]; `lokr_w2` [b, d(, k, k)] or `lokr_w2_a`
  [b, r] · `lokr_w2_b` [r, d·k·k]. ΔW = w1 ⊗ w2 (w1 unsqueezed to 4-d for a 4-d w2), out = a·b, in = c·d.
  A Tucker w2 (peft `lokr_t2` [r, r, k, k], `lokr_w2_a` [r, b], `lokr_w2_b` [r, d]) is written rebuilt, as a full
  4-d `lokr_w2`: ComfyUI cannot apply `lokr_t2` (see :func:`lokr_module`).

How the loaders scale ΔW (ComfyUI `comfy/weight_adapter/loha.py`, `lokr.py`; A1111
`extensions-builtin/Lora/network.py` `calc_scale`, `network_hada.py`, `network_lokr.py`):

* LoHa: alpha / dim with dim = `hada_w1_b.shape[0]` (= r): peft's `scaling` is alpha / r, so `.alpha` = scaling · r.
* LoKr: alpha / dim with dim = `lokr_w2_b.shape[0]` if w2 is factored, else `lokr_w1_b.shape[0]`; when neither
  half is factored there is no dim and the scale is 1, whatever alpha says. peft scales by alpha / r in every
  case, so a module with two full halves has its scale folded into `lokr_w1` (and `.alpha` = r, as LyCORIS writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from genadapt.errors import UserError
from genadapt.export.lora import adapter_state, kohya_metadata, sgm_unet_key
from genadapt.runs import save_safetensors

PEFT_FOLDER = "peft"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what a PeftModel's saved keys carry, as export/lora.py writes them


def lycoris_layers(unet, adapter: str) -> dict[str, object]:
    """{UNet module path: its peft LoHa/LoKr layer} for every module that carries `adapter`."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, (LoHaLayer, LoKrLayer)) and adapter in module.scaling}


def layer_tensors(layer, adapter: str) -> dict[str, torch.Tensor]:
    """The layer's factors by their LyCORIS names (`hada_w1_a`, `lokr_w2_b`, ...), float32 on the CPU."""
    return {
        part: getattr(layer, part)[adapter].detach().float().cpu().clone()
        for part in layer.adapter_layer_names
        if adapter in getattr(layer, part)
    }


def loha_module(tensors: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """One module's LoHa keys: the factors as they are, `.alpha` so that alpha / w1_b.shape[0] is peft's scaling."""
    return {**tensors, "alpha": torch.tensor(scaling * tensors["hada_w1_b"].shape[0])}


def lokr_module(tensors: dict[str, torch.Tensor], scaling: float, rank: int) -> dict[str, torch.Tensor]:
    """One module's LoKr keys. The loaders take dim from the factored half (w2 first, as ComfyUI's
    `calculate_weight` overwrites w1's dim with w2's) and use scale 1 when neither half is factored."""
    tensors = dict(tensors)
    if "lokr_t2" in tensors:
        # ComfyUI passes its Tucker rebuild of w2, a strided einsum view, to torch.kron, which rejects it; ComfyUI
        # logs the error and leaves the module unpatched (ComfyUI#11245). The same w2 as one full [b, d, k, k]
        # `lokr_w2` loads in every tool; it costs b·d·k² numbers, small beside the conv it adapts.
        t2, w2_a, w2_b = (tensors.pop(part) for part in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
        tensors["lokr_w2"] = torch.einsum("i j k l, i p, j r -> p r k l", t2, w2_a, w2_b).contiguous()
    factored = [part for part in ("lokr_w2_b", "lokr_w1_b") if part in tensors]
    if factored:
        return {**tensors, "alpha": torch.tensor(scaling * tensors[factored[0]].shape[0])}
    if scaling != 1.0:
        tensors["lokr_w1"] = tensors["lokr_w1"] * scaling
    return {**tensors, "alpha": torch.tensor(float(rank))}


def lycoris_state(model, adapter: str) -> dict[str, torch.Tensor] | None:
    """The UNet's LoHa/LoKr adapter as one LyCORIS state dict, or None (with a note) when an SDXL module has no
    name in the original UNet that kohya-style files use."""
    from peft.tuners.loha import LoHaLayer

    state = {}
    for module, layer in lycoris_layers(model.unet, adapter).items():
        name = sgm_unet_key(module, model.unet.config) if model.is_sdxl else module
        if name is None:
            print(f"note: no kohya SDXL name for UNet module {module}; only the peft folder holds this adapter")
            return None
        tensors, scaling = layer_tensors(layer, adapter), float(layer.scaling[adapter])
        converted = loha_module(tensors, scaling) if isinstance(layer, LoHaLayer) else lokr_module(tensors, scaling, int(layer.r[adapter]))
        key = "lora_unet_" + name.replace(".", "_")
        state.update({f"{key}.{part}": value for part, value in converted.items()})
    return state


def lycoris_metadata(technique, metadata: dict, model) -> dict[str, str]:
    """sd-scripts' keys as LyCORIS's kohya network writes them (`ss_network_module` lycoris.kohya, its
    `network_args` with the algo), on top of the LoRA twin's `ss_*` and model spec keys."""
    # kohya_metadata reads a LoRA technique's fields; LoHa/LoKr have no DoRA/rsLoRA flags.
    lora_like = SimpleNamespace(rank=technique.rank, scale=technique.alpha / technique.rank, use_dora=False, use_rslora=False)
    prediction = "v" if model.noise_scheduler.config.prediction_type == "v_prediction" else "epsilon"
    values = kohya_metadata(lora_like, {}, model.resolution, model.is_sdxl, prediction)
    values.update({
        "ss_network_module": "lycoris.kohya",
        # sd-scripts records `--network_args k=v ...` as a JSON object of strings.
        "ss_network_args": json.dumps({key: str(value) for key, value in technique.network_args.items()}),
        "modelspec.title": str(metadata.get("ss_output_name", f"genadapt {technique.name}")),
    })
    values.update({key: str(value) for key, value in metadata.items()})
    return values


def save_peft_folder(unet, adapter: str, folder: Path) -> Path:
    """`adapter_config.json` (the config the adapter was built with, patterns included) and
    `adapter_model.safetensors` (peft key names), which :func:`load_peft_folder` rebuilds the adapter from."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / PEFT_WEIGHTS, {PEFT_PREFIX + key: value for key, value in adapter_state(unet, adapter).items()})
    unet.peft_config[adapter].save_pretrained(str(folder))
    return folder


def save_lycoris(model, technique, out: Path, metadata: dict | None = None) -> list[Path]:
    """Write `<technique>.safetensors` (the LyCORIS file) and the peft folder into `out`."""
    from genadapt.techniques.lora import ADAPTER

    out.mkdir(parents=True, exist_ok=True)
    files = []
    state = lycoris_state(model, ADAPTER)
    if state is not None:
        files.append(save_safetensors(out / f"{technique.name}.safetensors", state, lycoris_metadata(technique, metadata or {}, model)))
    return files + [save_peft_folder(model.unet, ADAPTER, out / PEFT_FOLDER)]


def load_peft_folder(model, folder: Path, config_class) -> None:
    """Inject the folder's adapter into `model.unet` with the config it was trained with and fill its tensors;
    the adapter is frozen and in eval mode, like the rest of a loaded model."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from genadapt.families import adapter_parameters
    from genadapt.techniques.lora import ADAPTER

    if not (folder / PEFT_WEIGHTS).is_file() or not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: no peft adapter (adapter_config.json, {PEFT_WEIGHTS}); rerun the adapt command that made this run")
    model.unet.add_adapter(config_class.from_pretrained(str(folder)), adapter_name=ADAPTER)
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(folder / PEFT_WEIGHTS)).items()}
    expected = set(adapter_state(model.unet, ADAPTER))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{folder}: the adapter does not fit this base (missing {missing[:3]}, unexpected {extra[:3]}); load it onto the base it was trained on")
    set_peft_model_state_dict(model.unet, state, adapter_name=ADAPTER)
    for parameter in adapter_parameters(model.unet):
        parameter.requires_grad_(False)
    model.unet.eval()
