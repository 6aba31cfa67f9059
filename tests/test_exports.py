"""Every file genadapt exports, loaded by the tool it is for (or by that tool's loading rule, re-implemented from
its source where the tool cannot run here), and every file a user passes in, checked before use."""

import json
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_fixtures import build_tiny_pipeline, build_tiny_sdxl_pipeline
from genadapt import recipes
from genadapt.api import load_run_model
from genadapt.cli import app
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.export.lora import DORA_NOTE, KOHYA_FILE
from genadapt.families import diffusion

DATA = "builtin:digits/3?shots=4"
PROMPT = "a handwritten digit three"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    return str(build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl")))


def _train(base, out, **values):
    """A tiny run; returns the trained model as the loop left it (the peft-adapted modules themselves)."""
    settings = dict(base=base, data=DATA, steps=3, batch_size=3, checkpointing_steps=3, num_validation_images=1, sample_steps=1,
                    learning_rate=1e-2, out=out)
    settings.update(values)
    return recipes.adapt(AdaptConfig(**settings))["model"]


def _text(model, prompt=PROMPT):
    with torch.no_grad():
        return diffusion.encode_text(model, diffusion.tokenize(model, [prompt]))


def _unet_output(model):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return diffusion.predict(model, model.unet, latents, torch.tensor([500]), _text(model))


@pytest.fixture(scope="module")
def sd_lora(base, tmp_path_factory):
    """LoRA with text-encoder adapters, alpha != rank (the scale the files must carry)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, _train(base, out, train="lora", rank=2, alpha=4.0, lora_text_encoder=True)


# --------------------------------------------------------------------- ComfyUI's text-encoder LoRA keys, re-implemented

# comfy/lora.py LORA_CLIP_MAP: the CLIP layer parts a kohya LoRA may name, and their underscored spelling.
COMFY_CLIP_PARTS = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj", "self_attn.q_proj": "self_attn_q_proj",
                    "self_attn.v_proj": "self_attn_v_proj", "self_attn.out_proj": "self_attn_out_proj"}


def comfy_clip_keys(encoders):
    """ComfyUI's CLIP state-dict names for our encoders: {comfy key: (encoder index, our parameter name)}.
    ComfyUI holds SD's encoder as `clip_l.transformer.text_model.*`, SDXL's as clip_l and clip_g."""
    towers = ["clip_l", "clip_g"]
    keys = {}
    for index, encoder in enumerate(encoders):
        for name in encoder.state_dict():
            keys[f"{towers[index]}.transformer.text_model.{name.removeprefix('text_model.')}"] = (index, name)
    return keys


def comfy_model_lora_keys_clip(state_keys):
    """comfy/lora.py::model_lora_keys_clip, for the clip_l/clip_g towers: lora_te_ and lora_te1_ name clip_l's
    layers, lora_te2_ clip_g's (only when a clip_l is present, as for SDXL)."""
    key_map = {}
    clip_l = any(key.startswith("clip_l.") for key in state_keys)
    for layer in range(32):
        for part, kohya in COMFY_CLIP_PARTS.items():
            name = f"text_model_encoder_layers_{layer}_{kohya}"
            target = f"clip_l.transformer.text_model.encoder.layers.{layer}.{part}.weight"
            if target in state_keys:
                key_map[f"lora_te_{name}"] = key_map[f"lora_te1_{name}"] = target
            target = f"clip_g.transformer.text_model.encoder.layers.{layer}.{part}.weight"
            if target in state_keys and clip_l:
                key_map[f"lora_te2_{name}"] = target
    return key_map


def merge_text_lora_the_comfy_way(model, kohya):
    """Map every te key through ComfyUI's key map and add ΔW = up @ down · alpha / rank to the named weight
    (comfy/weight_adapter/lora.py::calculate_weight, alpha / mat2.shape[0]); returns the modules merged."""
    encoders = [encoder for _, encoder in model.text_encoders]
    ours = comfy_clip_keys(encoders)
    key_map = comfy_model_lora_keys_clip(set(ours))
    names = {key.split(".")[0] for key in kohya if key.startswith("lora_te")}
    missing = sorted(name for name in names if name not in key_map)
    assert not missing, f"ComfyUI maps no text-encoder module for {missing[:3]}"
    with torch.no_grad():
        for name in names:
            index, parameter = ours[key_map[name]]
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            weight = encoders[index].get_parameter(parameter)
            weight += (up @ down) * (float(kohya[f"{name}.alpha"]) / down.shape[0])
    return names


def test_kohya_text_encoder_keys_are_sd_scripts_names_and_merge_like_comfyui(base, sd_lora):
    out, trained = sd_lora
    kohya = load_file(out / KOHYA_FILE)
    text_keys = [key for key in kohya if key.startswith("lora_te")]
    assert text_keys and all(key.startswith("lora_te_text_model_encoder_layers_") for key in text_keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    merged = diffusion.load(base)
    assert len(merge_text_lora_the_comfy_way(merged, kohya)) == 4  # q, k, v, out of the one layer
    torch.testing.assert_close(_text(merged).embeds, _text(trained).embeds, atol=1e-5, rtol=1e-5)
    assert (_text(merged).embeds - _text(diffusion.load(base)).embeds).abs().max() > 1e-4  # the LoRA did something
    # diffusers loads the twin (its kohya converter strips `text_model.` for transformers 5's flat CLIPTextModel).
    via_diffusers = diffusion.load(base)
    via_diffusers.pipeline.load_lora_weights(str(out), weight_name=KOHYA_FILE)
    torch.testing.assert_close(_text(via_diffusers).embeds, _text(trained).embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_unet_output(via_diffusers), _unet_output(trained), atol=1e-5, rtol=1e-4)


def test_peft_folders_hold_unet_and_text_encoder_and_load_with_peft(base, sd_lora):
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    out, trained = sd_lora
    for folder in (out / "peft", out / "peft" / "text_encoder"):
        assert (folder / "adapter_model.safetensors").is_file() and json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (out / "peft" / "text_encoder_2").exists()
    fresh = diffusion.load(base)
    ids = diffusion.tokenize(fresh, [PROMPT])
    encoder = PeftModel.from_pretrained(fresh.text_encoder, str(out / "peft" / "text_encoder"))
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids)[0], trained.text_encoder(ids)[0], atol=1e-6, rtol=1e-6)
    # The UNet folder, through peft's config and state-dict loader (what genadapt's LyCORIS runs reload with).
    unet_model = diffusion.load(base)
    unet_model.unet.add_adapter(LoraConfig.from_pretrained(str(out / "peft")), adapter_name="peft")
    state = {key.removeprefix("base_model.model."): value for key, value in load_file(out / "peft" / "adapter_model.safetensors").items()}
    result = set_peft_model_state_dict(unet_model.unet, state, adapter_name="peft")
    assert not [key for key in result.unexpected_keys if "lora" in key]
    unet_model.pipeline.text_encoder = trained.text_encoder  # compare the UNets on the same conditioning
    torch.testing.assert_close(_unet_output(unet_model), _unet_output(trained), atol=1e-5, rtol=1e-4)


def test_sdxl_kohya_text_keys_merge_like_comfyui_and_peft_folders_load(sdxl_base, tmp_path):
    from peft import PeftModel

    trained = _train(sdxl_base, tmp_path / "run", train="lora", rank=2, alpha=4.0, lora_text_encoder=True)
    kohya = load_file(tmp_path / "run" / KOHYA_FILE)
    for prefix in ("lora_te1_", "lora_te2_"):
        keys = [key for key in kohya if key.startswith(prefix)]
        assert keys and all(key.startswith(f"{prefix}text_model_encoder_layers_") for key in keys)
    merged = diffusion.load(sdxl_base)
    assert len(merge_text_lora_the_comfy_way(merged, kohya)) == 16  # 4 projections x 2 layers x 2 encoders
    torch.testing.assert_close(_text(merged).embeds, _text(trained).embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_text(merged).pooled, _text(trained).pooled, atol=1e-5, rtol=1e-5)
    fresh = diffusion.load(sdxl_base)
    ids = diffusion.tokenize(fresh, [PROMPT])
    for position, name in enumerate(("text_encoder", "text_encoder_2")):
        encoder = PeftModel.from_pretrained(getattr(fresh.pipeline, name), str(tmp_path / "run" / "peft" / name))
        with torch.no_grad():
            torch.testing.assert_close(encoder(ids[:, position])[0], getattr(trained.pipeline, name)(ids[:, position])[0], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------- DoRA


def comfy_weight_decompose(dora_scale, weight, lora_diff):
    """comfy/weight_adapter/base.py::weight_decompose at strength 1: a dora_scale whose first dimension is the
    output size takes the per-output branch, which divides by the *base* weight's row norms; any other shape the
    per-input branch (column norms of W + ΔW)."""
    calc = weight + lora_diff
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    else:
        norm = calc.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def test_dora_run_writes_no_kohya_twin_says_why_and_its_diffusers_file_loads(base, tmp_path, capsys):
    trained = _train(base, tmp_path / "dora", train="lora", rank=2, use_dora=True, lora_text_encoder=True)
    assert DORA_NOTE in capsys.readouterr().out and len(DORA_NOTE.splitlines()) == 1
    assert not (tmp_path / "dora" / KOHYA_FILE).exists()
    model = load_run_model(str(tmp_path / "dora"))  # diffusers' load_lora_weights on the diffusers file
    torch.testing.assert_close(_unet_output(model), _unet_output(trained), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_text(model).embeds, _text(trained).embeds, atol=1e-5, rtol=1e-5)
    # Why: on a trained module, peft's W' = m · (W + ΔW) / ||W + ΔW||_row; ComfyUI, given peft's m either way round,
    # rescales by the base weight's norm or per input column, and A1111 per input column. Neither is peft's W'.
    layer = trained.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    weight = layer.base_layer.weight.detach()
    delta = (layer.lora_B["genadapt"].weight @ layer.lora_A["genadapt"].weight).detach() * layer.scaling["genadapt"]
    magnitude = layer.lora_magnitude_vector["genadapt"].weight.detach()
    peft_weight = magnitude[:, None] * (weight + delta) / (weight + delta).norm(dim=1, keepdim=True)
    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # that is the weight the trained layer applies
        torch.testing.assert_close(layer(probe), torch.nn.functional.linear(probe, peft_weight, layer.base_layer.bias), atol=1e-5, rtol=1e-5)
    per_output = comfy_weight_decompose(magnitude[:, None], weight, delta)
    per_input = comfy_weight_decompose(peft_weight.norm(dim=0, keepdim=True), weight, delta)
    assert (per_output - peft_weight).abs().max() > 1e-3 and (per_input - peft_weight).abs().max() > 1e-3  # ~7e-3, ~1e-2 here


# --------------------------------------------------------------------- embeddings: the trigger is the file stem


def test_embedding_trigger_is_the_file_stem_in_every_file(base, tmp_path):
    out = tmp_path / "ti"
    trained = _train(base, out, train="embedding", vectors=2, learning_rate=0.5)  # token <genadapt>
    assert (out / "trigger.txt").read_text() == "genadapt\n"
    assert set(load_file(out / "genadapt.safetensors")) == {"emb_params"}
    assert set(load_file(out / "learned_embeds.safetensors")) == {"genadapt"}
    prompts = json.loads((out / "prompts.json").read_text())
    assert all("genadapt" in prompt and "<genadapt>" not in prompt for prompt in prompts)
    # diffusers with no token= registers the dict's key (and genadapt_1 for the second vector).
    pipe = diffusion.load(base).pipeline
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    assert {"genadapt", "genadapt_1"} <= set(pipe.tokenizer.get_added_vocab())
    typed, _ = pipe.encode_prompt("a picture of genadapt", "cpu", 1, False)
    torch.testing.assert_close(typed, _text(trained, "a picture of <genadapt> <genadapt>_1").embeds, atol=1e-6, rtol=1e-6)
    # The run reloads under the same word, and prompts.json, sampled through the pipeline, means what training saw.
    reloaded = load_run_model(str(out))
    sampled, _ = reloaded.pipeline.encode_prompt(prompts[0], "cpu", 1, False)
    torch.testing.assert_close(sampled, _text(trained, prompts[0].replace("genadapt", "<genadapt> <genadapt>_1")).embeds, atol=1e-6, rtol=1e-6)


def test_embedding_trigger_follows_output_name_and_a_taken_word_keeps_the_placeholder(base, tmp_path, capsys):
    _train(base, tmp_path / "named", train="embedding", output_name="mystyle", steps=1)
    assert set(load_file(tmp_path / "named" / "mystyle.safetensors")) == {"emb_params"}
    assert set(load_file(tmp_path / "named" / "learned_embeds.safetensors")) == {"mystyle"}
    with safe_open(str(tmp_path / "named" / "mystyle.safetensors"), "pt") as handle:
        assert handle.metadata()["trigger"] == "mystyle" and handle.metadata()["token"] == "<genadapt>"
    capsys.readouterr()
    # "handwrit" is an entry of the tiny tokenizer's vocabulary, which diffusers refuses to add: its file keeps the placeholder.
    _train(base, tmp_path / "taken", train="embedding", output_name="handwrit", steps=1)
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: the trigger 'handwrit'")]
    assert len(note) == 1
    assert set(load_file(tmp_path / "taken" / "learned_embeds.safetensors")) == {"<genadapt>"}
    assert (tmp_path / "taken" / "handwrit.safetensors").is_file()
    assert (tmp_path / "taken" / "trigger.txt").read_text() == "handwrit\ndiffusers: <genadapt>\n"
    assert all("<genadapt>" in prompt for prompt in json.loads((tmp_path / "taken" / "prompts.json").read_text()))
    load_run_model(str(tmp_path / "taken"))


# --------------------------------------------------------------------- single-file checkpoints


def _config_only(pipeline_folder, out):
    """The pipeline's configs without any weights: diffusers must take every weight from the single file."""
    shutil.copytree(pipeline_folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return str(out)


@pytest.mark.parametrize("train, extra, stem", [("full", {}, "run"), ("freeze", {"trainable": ["up_blocks.*"], "output_name": "ckpt"}, "ckpt")])
def test_single_file_checkpoint_loads_in_diffusers_with_every_weight(base, tmp_path, train, extra, stem):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    _train(base, out, train=train, save_single_file=True, steps=1, **extra)
    path = out / f"{stem}.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=_config_only(out / "pipeline", tmp_path / "config"), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    adapted, source = diffusion.load(str(out / "pipeline")), diffusion.load(base)
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(adapted.pipeline, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(expected), name
        assert all(torch.equal(got[key], expected[key]) for key in expected), name
    assert any(not torch.equal(value, source.unet.state_dict()[key]) for key, value in adapted.unet.state_dict().items())


def test_single_file_refuses_sdxl_before_training_and_is_a_cli_flag(sdxl_base, tmp_path):
    with pytest.raises(UserError, match="SDXL single files") as error:
        _train(sdxl_base, tmp_path / "xl", train="full", save_single_file=True, steps=1)
    assert len(str(error.value).splitlines()) == 1 and not (tmp_path / "xl" / "pipeline").exists()
    help_text = CliRunner().invoke(app, ["adapt", "--help"]).output
    assert "--save-single-file" in help_text
    with pytest.raises(UserError, match="--save-single-file applies to --train full, freeze on diffusion bases"):
        AdaptConfig(base="pocket-stylegan2", data=DATA, out=tmp_path / "gan", train="freeze", save_single_file=True)


# --------------------------------------------------------------------- files users pass in


def _sample(*args):
    result = CliRunner().invoke(app, ["sample", *args, "-n", "1", "--steps", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    return result, errors


def _assert_one_line_error(result, errors, *needles):
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _header_file(path, header: dict, data_bytes: int = 0):
    """A safetensors file from its JSON header; the data region is a sparse hole (nothing is written)."""
    text = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + data_bytes)
    return path


def _bad_lora(kind, folder, good):
    path = folder / f"{kind}.safetensors"
    tensors = load_file(good)
    if kind == "pickle":
        torch.save(tensors, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "huge-header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif kind == "oversized":
        _header_file(path, {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, 2**30)
    elif kind == "other-model":  # every module renamed: a LoRA of some other network
        save_file({key.replace(".", ".other.", 1): value for key, value in tensors.items()}, str(path))
    elif kind == "wrong-shape":
        save_file({key: torch.zeros(value.shape[0], value.shape[1] + 1) if key.endswith("lora_A.weight") else value for key, value in tensors.items()}, str(path))
    elif kind == "nan":
        save_file({key: value.clone().fill_(float("nan")) if key.endswith("lora_B.weight") else value for key, value in tensors.items()}, str(path))
    elif kind == "loha":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 2)}, str(path))
    return path


BAD_LORAS = {
    "pickle": "PyTorch pickle", "empty": "is empty", "truncated": "truncated", "huge-header": "header claims",
    "oversized": "more than twice the base", "other-model": "none of its keys name a module of this base (e.g. ",
    "wrong-shape": "do not fit its weight", "nan": "NaN or inf", "loha": "LyCORIS LoHa/LoKr",
}


@pytest.mark.parametrize("kind", list(BAD_LORAS))
def test_a_bad_lora_file_is_one_error_line_through_the_cli(base, sd_lora, tmp_path, kind):
    good = sd_lora[0] / "pytorch_lora_weights.safetensors"
    path = _bad_lora(kind, tmp_path, good)
    result, errors = _sample(base, "--lora", f"{path}:0.8", "--out", str(tmp_path / "grid.png"))
    _assert_one_line_error(result, errors, str(path), BAD_LORAS[kind])
    assert not (tmp_path / "grid.png").exists()


def test_a_good_lora_file_and_a_nan_weight(base, sd_lora, tmp_path):
    good = sd_lora[0] / KOHYA_FILE
    result, _ = _sample(base, "--lora", f"{good}:0.5", "--out", str(tmp_path / "grid.png"))
    assert result.exit_code == 0 and (tmp_path / "grid.png").is_file(), result.output
    result, errors = _sample(base, "--lora", f"{good}:nan", "--out", str(tmp_path / "nan.png"))
    _assert_one_line_error(result, errors, "finite number")


@pytest.fixture(scope="module")
def embedding_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "run"
    _train(base, out, train="embedding", steps=1)
    return out


BAD_EMBEDDINGS = {"pickle": "PyTorch pickle", "truncated": "truncated", "wide": "this text encoder takes float [1..75, 32]",
                  "nan": "NaN or inf", "two": "holds 2 tensors"}


@pytest.mark.parametrize("kind", list(BAD_EMBEDDINGS))
def test_a_bad_embedding_file_in_a_run_is_one_error_line_through_the_cli(embedding_run, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(embedding_run, run)
    path = run / "learned_embeds.safetensors"
    (token, rows), = load_file(path).items()
    rows = rows.clone()  # load_file maps the file; rewriting it under a mapped tensor is a bus error
    if kind == "pickle":
        torch.save({token: rows}, path)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif kind == "wide":
        save_file({token: torch.zeros(1, 33)}, str(path))
    elif kind == "nan":
        save_file({token: rows.clone().fill_(float("nan"))}, str(path))
    elif kind == "two":
        save_file({token: rows, "other": rows.clone()}, str(path))
    result, errors = _sample(str(run), "--out", str(tmp_path / "grid.png"))
    _assert_one_line_error(result, errors, str(path), BAD_EMBEDDINGS[kind])


def test_a_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """0x80 is also pickle's protocol byte; a header of 0x4380 bytes starts with it (a real LoRA did)."""
    import struct

    import torch
    from safetensors.torch import save_file

    from genadapt.export.lora import inspect_safetensors

    for padding in range(200):
        path = tmp_path / "x.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * padding})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:  # build a header whose length is 0x80 exactly
        path = tmp_path / "x.safetensors"
        header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        header += b" " * (0x80 - len(header))
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    assert path.read_bytes()[:1] == b"\x80"
    tensors, _ = inspect_safetensors(path, "--lora")
    assert "w" in tensors
