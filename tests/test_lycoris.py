"""LoHa and LoKr: the LyCORIS file, merged by ComfyUI's and A1111's rule, is the UNet peft trained; runs reload.

The merge below is written from the loaders' code, not from genadapt's exporter:
ComfyUI `comfy/weight_adapter/loha.py` / `lokr.py` (`calculate_weight`) and `comfy/lora.py` (`load_lora`: the
`<module>.alpha` key, `lora_unet_<diffusers path with _>` names), A1111 `extensions-builtin/Lora/network_hada.py`,
`network_lokr.py`, `lyco_helpers.py` and `network.py` (`calc_scale`: alpha / dim, 1 without a dim).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from diffusion_fixtures import build_tiny_pipeline, build_tiny_sdxl_pipeline
from genadapt import recipes
from genadapt.api import load_run_model
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import diffusion

DATA = "builtin:digits/3?shots=4"
# Linear attention projections, 1x1 convs (factored like a Linear) and 3x3 convs (a Tucker core with use_tucker).
EVERY_KIND = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

# On the tiny UNet every targeted dimension is 32 or 64, split by LyCORIS's factorization into 4·8 or 8·8.
# `parts`: the keys of a Linear or 1x1 conv; `kxk_parts`: those of a 3x3 conv.
CASES = {
    "loha": dict(
        settings=dict(train="loha", rank=2, alpha=3.0, use_tucker=True, lora_targets=EVERY_KIND),
        parts={"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        kxk_parts={"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    ),
    # rank 1 is below half of every Kronecker block: both halves factored; peft's Tucker w2 on 3x3 convs is
    # written rebuilt as a full lokr_w2, since ComfyUI cannot apply lokr_t2 (ComfyUI#11245).
    "lokr-factored": dict(
        settings=dict(train="lokr", rank=1, alpha=2.0, decompose_both=True, use_tucker=True, lora_targets=EVERY_KIND),
        parts={"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}, kxk_parts={"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"},
    ),
    # rank 4 reaches half of the 8-wide W2 block: both halves full ("full dimension"), where alpha is ignored.
    "lokr-full": dict(
        settings=dict(train="lokr", rank=4, alpha=2.0, lora_targets=ATTENTION),
        parts={"lokr_w1", "lokr_w2", "alpha"}, kxk_parts=set(),
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, base, tmp_path_factory):
    """(case name, run folder, the model as training left it) for one short run at a learning rate that moves."""
    case = request.param
    out = tmp_path_factory.mktemp(case) / "run"
    config = AdaptConfig(
        base=base, data=DATA, steps=4, batch_size=3, checkpointing_steps=4, num_validation_images=1, sample_steps=1,
        learning_rate=1e-2, out=out, **CASES[case]["settings"],
    )
    model = recipes.adapt(config)["model"]
    model.unet.eval()
    return case, out, model


def _unet_output(model):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = diffusion.encode_text(model, diffusion.tokenize(model, ["a handwritten digit three"] * 2))
    with torch.no_grad():
        return diffusion.predict(model, model.unet, latents, torch.tensor([10, 600]), text)


def _lycoris_file(case, run):
    return run / f"{CASES[case]['settings']['train']}.safetensors"


def _modules(state):
    """{module key: {part: tensor}}, split at the first dot as A1111's `load_network` does."""
    grouped = {}
    for key, value in state.items():
        module, _, part = key.partition(".")
        grouped.setdefault(module, {})[part] = value
    return grouped


def _targeted(unet, targets):
    """{path: module} of the base modules peft wraps for `targets`: an exact name or a `.name` suffix (peft's list matching)."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets)}


def loha_delta(w, alpha):
    """ComfyUI LoHaAdapter.calculate_weight: scale = alpha / w1_b.shape[0] (1 without alpha);
    (w1_a @ w1_b) * (w2_a @ w2_b), or the Tucker rebuild einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)."""
    scale = alpha / w["hada_w1_b"].shape[0] if alpha is not None else 1.0
    if "hada_t1" in w:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t1"], w["hada_w1_b"], w["hada_w1_a"])
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", w["hada_t2"], w["hada_w2_b"], w["hada_w2_a"])
    else:
        m1 = w["hada_w1_a"] @ w["hada_w1_b"]
        m2 = w["hada_w2_a"] @ w["hada_w2_b"]
    return scale * (m1 * m2)


def lokr_delta(w, alpha):
    """ComfyUI LoKrAdapter.calculate_weight: dim from w1_b, then overwritten by w2_b, when factored; scale =
    alpha / dim, or 1 when no half is factored; kron(w1, w2), w1 unsqueezed to 4-d for a 4-d w2. (Its lokr_t2
    branch is left out: genadapt writes no lokr_t2, the keys test checks.)"""
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        dim = w["lokr_w1_b"].shape[0]
        w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        dim = w["lokr_w2_b"].shape[0]
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2)


def merge_like_comfyui(model, state):
    """W += ΔW.reshape(W.shape) for every module of a LyCORIS state dict, in place; every key must be used."""
    names = {"lora_unet_" + name.replace(".", "_"): module for name, module in model.unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    with torch.no_grad():
        for key, parts in _modules(state).items():
            alpha = parts["alpha"].item() if "alpha" in parts else None
            delta = loha_delta(parts, alpha) if "hada_w1_a" in parts else lokr_delta(parts, alpha)
            names[key].weight += delta.reshape(names[key].weight.shape)
    return model


def test_lycoris_file_merged_by_the_loaders_rule_is_the_trained_unet(trained, base):
    case, run, model = trained
    adapted, plain = _unet_output(model), _unet_output(diffusion.load(base))
    # The run must have moved ΔW well past the tolerance, or a wrong scale would pass unnoticed.
    assert (adapted - plain).abs().max() > 1e-3
    merged = merge_like_comfyui(diffusion.load(base), load_file(_lycoris_file(case, run)))
    torch.testing.assert_close(_unet_output(merged), adapted, atol=1e-5, rtol=1e-4)


def test_lycoris_keys_are_complete_per_module_with_kohya_metadata(trained, base):
    case, run, model = trained
    spec = CASES[case]
    state = load_file(_lycoris_file(case, run))
    targeted = _targeted(diffusion.load(base).unet, spec["settings"]["lora_targets"])
    expected = set()
    for name, module in targeted.items():
        kxk = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
        expected |= {"lora_unet_" + name.replace(".", "_") + "." + part for part in (spec["kxk_parts"] if kxk else spec["parts"])}
    assert targeted and set(state) == expected
    assert all(state[key].ndim == 0 for key in state if key.endswith(".alpha"))

    with safe_open(str(_lycoris_file(case, run)), "pt") as handle:
        metadata = handle.metadata()
    settings = spec["settings"]
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == settings["train"]
    assert metadata["ss_network_dim"] == str(settings["rank"]) and float(metadata["ss_network_alpha"]) == settings["alpha"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora" and metadata["ss_base_model_version"] == "sd_v1"


def test_run_reloads_to_the_trained_model(trained):
    case, run, model = trained
    reloaded = load_run_model(str(run))
    torch.testing.assert_close(_unet_output(reloaded), _unet_output(model), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in reloaded.unet.parameters())


def test_base_weights_never_change(trained, base):
    case, run, model = trained
    source = diffusion.load(base)
    reference = source.unet.state_dict()
    for adapted in (model, load_run_model(str(run))):
        base_weights = {k.replace(".base_layer", ""): v for k, v in adapted.unet.state_dict().items() if not any(p in k for p in ("hada_", "lokr_"))}
        assert set(base_weights) == set(reference)
        assert all(torch.equal(value, reference[key]) for key, value in base_weights.items())
        for name in ("vae", "text_encoder"):
            old, new = getattr(source, name).state_dict(), getattr(adapted, name).state_dict()
            assert all(torch.equal(old[k], new[k]) for k in old), f"{name} must stay frozen"


def test_peft_trains_at_the_scale_lycoris_uses(trained):
    """alpha / r per module (LyCORIS `LohaModule`, `LokrModule`); LoKr at full dimension ignores alpha, so
    peft's own alpha / r is pinned to 1 there."""
    from peft.tuners.lycoris_utils import LycorisLayer

    case, run, model = trained
    settings = CASES[case]["settings"]
    scales = {layer.scaling["genadapt"] for layer in model.unet.modules() if isinstance(layer, LycorisLayer)}
    assert scales == ({1.0} if case == "lokr-full" else {settings["alpha"] / settings["rank"]})


def test_lokr_file_folds_a_full_dimension_scale_the_loaders_drop():
    """With both halves full the loaders apply scale 1, so a peft scale other than 1 must be in lokr_w1."""
    from genadapt.export.lycoris import lokr_module

    w1, w2 = torch.randn(4, 4), torch.randn(8, 8)
    written = lokr_module({"lokr_w1": w1, "lokr_w2": w2}, scaling=0.5, rank=4)
    torch.testing.assert_close(lokr_delta(written, written["alpha"].item()), 0.5 * torch.kron(w1, w2))


def test_lokr_factor_zero_is_refused(tmp_path):
    with pytest.raises(UserError, match="--factor"):
        AdaptConfig(base="pocket-sd", data=DATA, out=tmp_path / "run", train="lokr", factor=0)


def test_sdxl_file_names_the_original_unet_and_merges_to_the_trained_unet(tmp_path):
    """SDXL files name SGM modules (`lora_unet_input_blocks_4_1_...`), which A1111 maps by replacing the prefix."""
    from genadapt.export.lora import sgm_unet_key

    base = str(build_tiny_sdxl_pipeline(tmp_path / "sdxl"))
    config = AdaptConfig(
        base=base, data=DATA, steps=3, batch_size=3, checkpointing_steps=3, num_validation_images=1, sample_steps=1,
        learning_rate=1e-2, out=tmp_path / "run", train="lokr", rank=1, alpha=2.0,
    )
    model = recipes.adapt(config)["model"]
    model.unet.eval()
    state = load_file(tmp_path / "run" / "lokr.safetensors")
    assert state and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in state)

    merged = diffusion.load(base)
    by_sgm = {"lora_unet_" + sgm_unet_key(name, merged.unet.config).replace(".", "_"): module
              for name, module in _targeted(merged.unet, ATTENTION).items()}
    with torch.no_grad():
        for key, parts in _modules(state).items():
            by_sgm[key].weight += lokr_delta(parts, parts["alpha"].item()).reshape(by_sgm[key].weight.shape)
    adapted = _unet_output(model)
    assert (adapted - _unet_output(diffusion.load(base))).abs().max() > 1e-3
    torch.testing.assert_close(_unet_output(merged), adapted, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_unet_output(load_run_model(str(tmp_path / "run"))), adapted, atol=1e-6, rtol=0)
