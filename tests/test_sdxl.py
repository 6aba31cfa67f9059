"""SDXL: the same techniques through the same loop, on a tiny SDXL-shaped pipeline (two text
encoders, pooled embedding and size conditioning)."""

import pytest
import torch
from safetensors.torch import load_file

from diffusion_fixtures import build_tiny_sdxl_pipeline
from genadapt.api import adapt, load_run_model
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.export.lora import sgm_unet_key
from genadapt.families import diffusion

DATA = "builtin:digits/3?shots=4"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl")))


def _run(base, out, **values):
    settings = dict(base=base, data=DATA, steps=3, batch_size=3, checkpointing_steps=3, num_validation_images=1, sample_steps=2, learning_rate=1e-2, out=out)
    settings.update(values)
    adapt(AdaptConfig(**settings))


def _state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _output(model, prompt="a handwritten digit three"):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = diffusion.encode_text(model, diffusion.tokenize(model, [prompt] * 2))
    with torch.no_grad():
        return diffusion.predict(model, model.unet, latents, torch.tensor([10, 600]), text)


def test_conditioning_matches_the_sdxl_pipeline(base):
    model = diffusion.load(base)
    assert model.is_sdxl and set(model.modules()) == {"unet", "text_encoder", "text_encoder_2"}
    text = diffusion.encode_text(model, diffusion.tokenize(model, ["a digit", "three"]))
    embeds, _, pooled, _ = model.pipeline.encode_prompt(["a digit", "three"], do_classifier_free_guidance=False)
    assert torch.equal(text.embeds, embeds) and torch.equal(text.pooled, pooled)


def test_lora_on_unet_and_both_text_encoders_exports_load_and_agree(base, tmp_path):
    _run(base, tmp_path / "lora", train="lora", rank=2, alpha=4.0, lora_text_encoder=True)
    reference = diffusion.load(base)
    plain = _output(reference)

    model = diffusion.load(base)
    model.pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    for name, module in model.modules().items():  # base weights untouched, adapters on all three
        state = _state(module)
        assert any("lora" in key for key in state), name
        original = _state(reference.modules()[name])
        for key, value in state.items():
            if "lora" not in key:
                assert torch.equal(value, original[key.replace(".base_layer", "")]), key
    unmerged = _output(model)
    assert (unmerged - plain).abs().max() > 1e-5
    model.pipeline.fuse_lora()
    torch.testing.assert_close(_output(model), unmerged, atol=1e-5, rtol=1e-4)

    kohya = load_file(tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya) and any(k.startswith("lora_unet_output_blocks_") for k in kohya)
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    via_kohya = diffusion.load(base)
    via_kohya.pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights_kohya.safetensors")
    torch.testing.assert_close(_output(via_kohya), unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_output(load_run_model(str(tmp_path / "lora"))), unmerged, atol=1e-5, rtol=1e-4)


def test_sgm_names_follow_the_original_unet_layout():
    from types import SimpleNamespace

    sdxl = SimpleNamespace(layers_per_block=2, up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    assert sgm_unet_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", sdxl) == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_unet_key("up_blocks.0.attentions.2.proj_out", sdxl) == "output_blocks.2.1.proj_out"
    assert sgm_unet_key("mid_block.attentions.0.proj_in", sdxl) == "middle_block.1.proj_in"
    assert sgm_unet_key("mid_block.resnets.1.conv2", sdxl) == "middle_block.2.out_layers.3"
    assert sgm_unet_key("down_blocks.2.resnets.1.time_emb_proj", sdxl) == "input_blocks.8.0.emb_layers.1"
    assert sgm_unet_key("down_blocks.0.downsamplers.0.conv", sdxl) == "input_blocks.3.0.op"
    assert sgm_unet_key("up_blocks.0.upsamplers.0.conv", sdxl) == "output_blocks.2.2.conv"
    assert sgm_unet_key("up_blocks.1.upsamplers.0.conv", sdxl) == "output_blocks.5.2.conv"
    assert sgm_unet_key("conv_in", sdxl) == "input_blocks.0.0"
    assert sgm_unet_key("add_embedding.linear_2", sdxl) == "label_emb.0.2"
    assert sgm_unet_key("down_blocks.0.resnets.0.norm1", sdxl) is None


def test_kohya_twin_of_a_lora_on_every_kind_of_layer_loads_back_the_same(base, tmp_path):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
    _run(base, tmp_path / "lora", train="lora", rank=2, lora_targets=targets)
    kohya = load_file(tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors")
    for name in ("input_blocks_0_0", "input_blocks_3_0_op", "output_blocks_2_2_conv", "out_2", "time_embed_0", "label_emb_0_2", "in_layers_2", "skip_connection"):
        assert any(name in key for key in kohya), name
    via_diffusers, via_kohya = diffusion.load(base), diffusion.load(base)
    via_diffusers.pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    via_kohya.pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights_kohya.safetensors")
    assert (_output(via_diffusers) - _output(diffusion.load(base))).abs().max() > 1e-5
    torch.testing.assert_close(_output(via_kohya), _output(via_diffusers), atol=1e-5, rtol=1e-4)


def test_embedding_learns_new_rows_in_both_encoders_only(base, tmp_path):
    source = diffusion.load(base)
    before = [encoder.get_input_embeddings().weight.detach().clone() for _, encoder in source.text_encoders]
    _run(base, tmp_path / "ti", train="embedding", token="<three>", vectors=2, learning_rate=0.5)
    # The diffusers files hold the rows under the trigger word, the A1111 file's stem (export/embeddings.py).
    first = load_file(tmp_path / "ti" / "learned_embeds.safetensors")["three"]
    second = load_file(tmp_path / "ti" / "learned_embeds_2.safetensors")["three"]
    a1111 = load_file(tmp_path / "ti" / "three.safetensors")
    assert torch.equal(a1111["clip_l"], first) and torch.equal(a1111["clip_g"], second)
    model = load_run_model(str(tmp_path / "ti"))
    for rows_before, (_, encoder) in zip(before, model.text_encoders):
        rows_after = encoder.get_input_embeddings().weight.detach()
        assert rows_after.shape[0] == rows_before.shape[0] + 2
        assert torch.equal(rows_after[: len(rows_before)], rows_before)
        assert not torch.allclose(rows_after[len(rows_before):], rows_before.mean(0).expand(2, -1))
    assert all(torch.equal(a, b) for a, b in zip(_state(model.unet).values(), _state(source.unet).values()))
    assert (_output(model, "three three_1") - _output(model, "")).abs().max() > 0
    # The pooled embedding comes from the end-of-text token, not the placeholder (whose id is the largest).
    ids = diffusion.tokenize(model, ["a three three_1 digit"])
    tokenizer, encoder = model.text_encoders[1]
    hidden = encoder(ids[:, 1]).last_hidden_state
    eos = int((ids[0, 1] == tokenizer.eos_token_id).nonzero()[0])
    expected = encoder.text_projection(hidden[0, eos])
    torch.testing.assert_close(diffusion.encode_text(model, ids).pooled[0], expected)


def test_embedding_weight_blends_both_encoders_and_the_pooled_projection(base, tmp_path):
    """On SDXL --embedding-weight blends each encoder's hidden states and the pooled projection: 0 samples as the
    prompt without the trigger, 1 as the prompt written."""
    from genadapt import models

    _run(base, tmp_path / "ti", train="embedding", token="<seven>", vectors=2, learning_rate=0.5, steps=2, token_position="end")
    model = models.load_run(tmp_path / "ti")
    assert model.extras["trigger"] == "seven"

    def draw(prompt, **weight):
        return models.sample(model, 1, 0, [prompt], steps=2, **weight)

    written, without = draw("a digit seven"), draw("a digit")
    assert (written - without).abs().max() > 1e-4
    torch.testing.assert_close(draw("a digit seven", embedding_weight=0.0), without, atol=1e-5, rtol=0)
    torch.testing.assert_close(draw("a digit seven", embedding_weight=1.0), written, atol=1e-5, rtol=0)
    text = diffusion.weighted_trigger(model, ["a digit seven"], "seven", 0.5, True, None)
    full = model.pipeline.encode_prompt(["a digit seven"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    plain = model.pipeline.encode_prompt(["a digit"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    torch.testing.assert_close(text["pooled_prompt_embeds"], (full[2] + plain[2]) / 2)
    torch.testing.assert_close(text["prompt_embeds"], (full[0] + plain[0]) / 2)


def test_full_with_every_loss_trains_the_unet_only(base, tmp_path):
    source = diffusion.load(base)
    losses = [{"name": name} for name in ("prior", "ewc", "relational", "feature")]
    _run(base, tmp_path / "full", train="full", loss=losses, num_class_images=2, ewc_samples=2)
    adapted = diffusion.load(str(tmp_path / "full" / "pipeline"))
    assert adapted.is_sdxl
    assert any(not torch.equal(a, b) for a, b in zip(_state(source.unet).values(), _state(adapted.unet).values()))
    for name in ("vae", "text_encoder"):
        old, new = _state(getattr(source, name)), _state(getattr(adapted, name))
        assert all(torch.equal(old[k], new[k]) for k in old), name
    old, new = _state(source.pipeline.text_encoder_2), _state(adapted.pipeline.text_encoder_2)
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_freeze_keeps_unmatched_unet_blocks_bitwise(base, tmp_path):
    source = _state(diffusion.load(base).unet)
    _run(base, tmp_path / "freeze", train="freeze", trainable=["up_blocks.*"])
    adapted = _state(diffusion.load(str(tmp_path / "freeze" / "pipeline")).unet)
    assert all(torch.equal(source[k], adapted[k]) for k in source if not k.startswith("up_blocks."))
    assert any(not torch.equal(source[k], adapted[k]) for k in source if k.startswith("up_blocks."))


def test_distill_says_sdxl_is_not_supported(base):
    from genadapt.recipes.distill import load_teacher

    with pytest.raises(UserError, match="SDXL"):
        load_teacher(base)


def test_size_conditioning_follows_each_file_size_and_crop(base, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(folder / "wide.png")  # h 32, w 48
    Image.fromarray(rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)).save(folder / "tall.png")  # h 40, w 20
    # As diffusers' SDXL scripts: short side resized to 32, then a center crop: wide 48x32 -> left 8; tall -> 32x64, top 16.
    expected = {(32.0, 48.0, 0.0, 8.0, 32.0, 32.0), (40.0, 20.0, 16.0, 0.0, 32.0, 32.0)}
    seen = []
    original_predict = diffusion.predict

    def recording_predict(model, unet, noisy, timesteps, text, sizes=None):
        if sizes is not None:
            seen.extend(tuple(row) for row in sizes.tolist())
        return original_predict(model, unet, noisy, timesteps, text, sizes)

    monkeypatch.setattr(diffusion, "predict", recording_predict)
    _run(base, tmp_path / "run", data=str(folder), caption="a digit", train="lora", rank=2, steps=2, batch_size=4)
    assert seen and set(seen) == expected

    from genadapt.data import load_dataset

    padded = load_dataset(str(folder), resolution=32, fit="pad", caption="a digit")
    assert {record.crop_top_left for record in padded.records} == {(0, 0)}
