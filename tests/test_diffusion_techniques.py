"""Each diffusion technique's defining property, on a tiny random SD pipeline."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_fixtures import build_tiny_pipeline
from genadapt.api import adapt, load_run_model
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import diffusion

DATA = "builtin:digits/3?shots=4"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


def _run(base, out, **values):
    settings = dict(base=base, data=DATA, steps=4, batch_size=3, checkpointing_steps=2, num_validation_images=2, sample_steps=2, learning_rate=1e-2, out=out)
    settings.update(values)
    config = AdaptConfig(**settings)
    adapt(config)
    return config


def _state(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def _unet_output(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = diffusion.encode_text(model, diffusion.tokenize(model, ["a handwritten digit three"] * 2))
    with torch.no_grad():
        return diffusion.predict(model, model.unet, latents, torch.tensor([10, 600]), text)


def test_full_changes_unet_and_nothing_else(base, tmp_path):
    source = diffusion.load(base)
    _run(base, tmp_path / "full", train="full")
    adapted = diffusion.load(str(tmp_path / "full" / "pipeline"))
    before, after = _state(source.unet), _state(adapted.unet)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 0.9 * len(before)
    for name in ("vae", "text_encoder"):
        old, new = _state(getattr(source, name)), _state(getattr(adapted, name))
        assert all(torch.equal(old[k], new[k]) for k in old), f"{name} must stay frozen"


def test_freeze_keeps_unmatched_weights_bitwise(base, tmp_path):
    source = _state(diffusion.load(base).unet)
    _run(base, tmp_path / "freeze", train="freeze", trainable=["up_blocks.*"])
    adapted = _state(diffusion.load(str(tmp_path / "freeze" / "pipeline")).unet)
    for key in source:
        if key.startswith("up_blocks."):
            continue
        assert torch.equal(source[key], adapted[key]), key
    assert any(not torch.equal(source[k], adapted[k]) for k in source if k.startswith("up_blocks."))


def test_freeze_needs_patterns_that_match(base, tmp_path):
    with pytest.raises(UserError, match="no parameter matches"):
        _run(base, tmp_path / "none", train="freeze", trainable=["no_such_block.*"])


def test_lora_base_untouched_merge_equals_unmerged_and_exports_load(base, tmp_path):
    _run(base, tmp_path / "lora", train="lora", rank=2, alpha=4.0)
    reference = _state(diffusion.load(base).unet)

    model = diffusion.load(base)
    model.pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors")
    base_keys = {k: v for k, v in _state(model.unet).items() if "lora" not in k}
    for key, value in base_keys.items():
        stripped = key.replace(".base_layer", "")
        assert torch.equal(value, reference[stripped]), key
    unmerged = _unet_output(model)
    assert not torch.allclose(unmerged, _unet_output(diffusion.load(base)), atol=1e-6), "LoRA must change the output"
    model.pipeline.fuse_lora()
    torch.testing.assert_close(_unet_output(model), unmerged, atol=1e-5, rtol=1e-4)

    kohya = tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors"
    tensors = load_file(kohya)
    assert all(k.startswith("lora_unet_") for k in tensors)
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 4.0 for a in alphas)  # alpha stored as trained, not rank
    with safe_open(str(kohya), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "4.0"
    via_kohya = diffusion.load(base)
    via_kohya.pipeline.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    torch.testing.assert_close(_unet_output(via_kohya), unmerged, atol=1e-5, rtol=1e-4)


def test_lora_composition_with_weights(base, tmp_path):
    _run(base, tmp_path / "a", train="lora", rank=2)
    _run(base, tmp_path / "b", train="lora", rank=2, seed=1)
    plain = _unet_output(diffusion.load(base))
    only_a = _unet_output(load_run_model(base, loras=[(str(tmp_path / "a"), 1.0)]))
    a_and_zero_b = _unet_output(load_run_model(base, loras=[(str(tmp_path / "a"), 1.0), (str(tmp_path / "b"), 0.0)]))
    zero_both = _unet_output(load_run_model(base, loras=[(str(tmp_path / "a"), 0.0), (str(tmp_path / "b"), 0.0)]))
    both = _unet_output(load_run_model(base, loras=[(str(tmp_path / "a"), 1.0), (str(tmp_path / "b"), 1.0)]))
    torch.testing.assert_close(a_and_zero_b, only_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(zero_both, plain, atol=1e-6, rtol=1e-5)
    assert (both - only_a).abs().max() > 1e-5 and (only_a - plain).abs().max() > 1e-5


def test_placeholder_rows_read_the_rows_and_leave_the_table_frozen():
    from genadapt.techniques.embedding import PlaceholderRows

    table = torch.nn.Embedding(10, 4)
    rows = PlaceholderRows(table, [8, 9])
    with torch.no_grad():
        rows.rows.add_(1.0)
    ids = torch.tensor([[0, 8, 3, 9]])
    expected = table.weight.detach().clone()
    expected[[8, 9]] += 1.0
    torch.testing.assert_close(rows(ids), expected[ids])
    torch.testing.assert_close(rows.weight, expected)
    rows(ids).sum().backward()
    assert table.weight.grad is None and [name for name, p in rows.named_parameters() if p.requires_grad] == ["rows"]
    assert torch.equal(rows.rows.grad, torch.ones(2, 4))


def test_embedding_changes_only_new_rows_and_loads_in_diffusers(base, tmp_path):
    source = diffusion.load(base)
    rows_before = source.text_encoder.get_input_embeddings().weight.detach().clone()
    _run(base, tmp_path / "ti", train="embedding", token="<digit>", vectors=2, learning_rate=0.5)
    # The optimiser and the checkpoint hold the 2 new rows, not the vocabulary's table.
    state = torch.load(tmp_path / "ti" / "checkpoints" / "state.pt", weights_only=True)
    assert [tuple(v.shape) for v in state["trainable"].values()] == [(2, rows_before.shape[1])]
    assert [tuple(v["exp_avg"].shape) for v in state["optimizer"]["state"].values()] == [(2, rows_before.shape[1])]
    learned = load_file(tmp_path / "ti" / "learned_embeds.safetensors")["digit"]  # the trigger word A1111 users type: the file stem
    assert learned.shape == (2, rows_before.shape[1])
    assert load_file(tmp_path / "ti" / "digit.safetensors")["emb_params"].shape == (2, rows_before.shape[1])
    model = diffusion.load(base)
    model.pipeline.load_textual_inversion(str(tmp_path / "ti" / "learned_embeds.safetensors"))
    rows_after = model.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(rows_after[: len(rows_before)], rows_before)  # every old row bitwise
    init = rows_before.mean(0)
    assert not torch.allclose(rows_after[len(rows_before):], init.expand(2, -1))  # new rows learned
    # The UNet and the rest of the text encoder never moved.
    assert all(torch.equal(a, b) for a, b in zip(_state(model.unet).values(), _state(source.unet).values()))


def test_resume_matches_uninterrupted_run(base, tmp_path):
    _run(base, tmp_path / "straight", train="lora", steps=4, checkpointing_steps=4)
    _run(base, tmp_path / "resumed", train="lora", steps=2, checkpointing_steps=2)
    _run(base, tmp_path / "resumed", train="lora", steps=4, checkpointing_steps=2)
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    first = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    second = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=1e-5)


def test_resume_refuses_a_different_run(base, tmp_path):
    _run(base, tmp_path / "run", train="lora", steps=2, checkpointing_steps=2)
    with pytest.raises(UserError, match="other settings"):
        _run(base, tmp_path / "run", train="lora", rank=8, steps=2)


def test_run_folder_records_config_seed_versions_and_data(base, tmp_path):
    _run(base, tmp_path / "run", train="lora", steps=1)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["versions"]["torch"]
    assert manifest["data"]["train"]["count"] == 4 and len(manifest["data"]["train"]["items"]) == 4
    assert (tmp_path / "run" / "config.yaml").read_text().count("train: lora") == 1
    assert list((tmp_path / "run" / "samples").glob("*.png"))


def test_resume_from_a_checkpoint_of_an_older_format_says_what_to_do(base, tmp_path):
    from genadapt.runs import load_torch, save_torch

    _run(base, tmp_path / "old", train="lora", steps=2, checkpointing_steps=2)
    state_path = tmp_path / "old" / "checkpoints" / "state.pt"
    state = load_torch(state_path)
    del state["local_generators"]  # the pre-registry format had one "generators" list instead
    save_torch(state_path, state)
    with pytest.raises(UserError, match="lacks local_generators.*new --out"):
        _run(base, tmp_path / "old", train="lora", steps=4, checkpointing_steps=2)
    state_path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read.*start the run over"):
        _run(base, tmp_path / "old", train="lora", steps=4, checkpointing_steps=2)


def test_augment_is_applied_in_pixel_space_before_encoding():
    from genadapt.recipes.train import AUGMENT_VARIANTS, augmented_pixels

    pixels = torch.rand(3, 3, 8, 8) * 2 - 1
    same, index = augmented_pixels(pixels, "none", 0)
    assert same is pixels and index.tolist() == [0, 1, 2]
    flipped, index = augmented_pixels(pixels, "flip", 0)
    assert torch.equal(flipped[:3], pixels) and torch.equal(flipped[3:], pixels.flip(-1)) and index.tolist() == [0, 1, 2] * 2
    varied, index = augmented_pixels(pixels, "diffaugment:translation", 0)
    assert len(varied) == AUGMENT_VARIANTS * 3 and index.tolist() == [0, 1, 2] * AUGMENT_VARIANTS
    assert not torch.equal(varied[3:6], pixels) and torch.equal(varied, augmented_pixels(pixels, "diffaugment:translation", 0)[0])


def test_a_flip_run_trains_on_both_orientations(base, tmp_path):
    _run(base, tmp_path / "flip", train="lora", steps=1, augment="flip")
    summary = json.loads((tmp_path / "flip" / "summary.json").read_text())
    assert summary["train_variants"] == 2 * summary["train_images"] and "augment: flip" in (tmp_path / "flip" / "config.yaml").read_text()


def test_placeholder_at_the_end_leaves_the_captions_own_encoding_unchanged(base):
    """In a causal text encoder, words before the placeholder are encoded as if it were absent; words after it are not."""
    from genadapt.techniques.embedding import EmbeddingSettings, TextualInversion

    change = {}
    for position, expected in (("end", "a digit <t> <t>_1"), ("start", "<t> <t>_1 a digit")):
        model = diffusion.load(base)
        technique = TextualInversion(EmbeddingSettings(token="<t>", vectors=2, token_position=position))
        technique.prepare(model)
        assert technique.caption("a digit") == expected
        tokenizer, encoder = model.text_encoders[0]
        ids = tokenizer(expected, return_tensors="pt").input_ids
        words = tokenizer("a digit", add_special_tokens=False).input_ids
        at = 1 if position == "end" else 3  # after the start token (and, at the start, the 2 placeholder vectors)
        assert ids[0, at: at + len(words)].tolist() == words
        states = []
        for seed in (0, 1):
            with torch.no_grad():  # random rows: a constant one is erased by the encoder's layer norm
                rows = encoder.get_input_embeddings().rows
                rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)))
                states.append(encoder(ids).last_hidden_state[0, at: at + len(words)])
        change[position] = float((states[0] - states[1]).abs().max())
    assert change["end"] == 0.0  # the caption's words never see the placeholder
    assert change["start"] > 1e-5  # read after it, they change with it


def test_max_norm_caps_the_vectors_the_encoder_reads_and_saves():
    from genadapt.techniques.embedding import PlaceholderRows

    table = torch.nn.Embedding(10, 4)
    rows = PlaceholderRows(table, [8, 9], max_norm=0.5)
    with torch.no_grad():
        rows.rows.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]]))
    read = rows(torch.tensor([[8, 9]]))[0]
    torch.testing.assert_close(read[0], torch.tensor([0.3, 0.4, 0.0, 0.0]))  # scaled back onto the radius, direction kept
    torch.testing.assert_close(read[1], torch.tensor([0.1, 0.0, 0.0, 0.0]))  # a shorter row is untouched
    torch.testing.assert_close(rows.weight[8], read[0])
    read.sum().backward()
    assert abs(float(rows.rows.grad[0] @ rows.rows[0].detach())) < 1e-6  # at the cap, no gradient pushes it outward


def test_token_position_is_refused_where_templates_place_the_token():
    from genadapt.techniques.embedding import EmbeddingSettings, TextualInversion

    with pytest.raises(UserError, match="--token-position end: --learnable-property style"):
        TextualInversion(EmbeddingSettings(learnable_property="style", token_position="end"))


def test_embedding_weight_blends_the_prompt_with_and_without_the_trigger(base, tmp_path):
    """--embedding-weight w encodes E(without) + w (E(with) - E(without)): 1 samples as the prompt is written, 0 as the
    prompt without the trigger, between them the encoding is the blend; a prompt without the word, or a model without
    a learned trigger, is refused."""
    from genadapt import models

    _run(base, tmp_path / "ti", train="embedding", token="<glyph>", vectors=2, learning_rate=0.5, token_position="end")
    model = models.load_run(tmp_path / "ti")
    trigger = model.extras["trigger"]
    prompt, plain = f"a digit {trigger}", "a digit"

    def draw(prompts, **weight):
        return models.sample(model, 2, 0, prompts, steps=2, **weight)

    as_written, without = draw([prompt]), draw([plain])
    assert (as_written - without).abs().max() > 1e-3  # the trigger does something to weigh
    torch.testing.assert_close(draw([prompt], embedding_weight=1.0), as_written, atol=1e-5, rtol=0)
    torch.testing.assert_close(draw([prompt], embedding_weight=0.0), without, atol=1e-5, rtol=0)
    text = diffusion.weighted_trigger(model, [prompt], trigger, 0.25, True, None)
    (with_word, _), (no_word, _) = (model.pipeline.encode_prompt([p], "cpu", 1, True) for p in (prompt, plain))
    torch.testing.assert_close(text["prompt_embeds"], no_word + 0.25 * (with_word - no_word))
    caption = 1 + len(model.tokenizer(plain, add_special_tokens=False).input_ids)  # the start token and the caption's words
    torch.testing.assert_close(with_word[0, :caption], no_word[0, :caption], atol=0, rtol=0)  # placeholder after them: they never move
    with pytest.raises(UserError, match=f"the prompt 'a digit' does not contain the trigger word '{trigger}'"):
        draw([prompt, plain], embedding_weight=0.5)
    torch.testing.assert_close(draw([prompt], embedding_weight=1.0, guidance=1.0, negative_prompt="blurry"),
                               draw([prompt], guidance=1.0, negative_prompt="blurry"), atol=1e-5, rtol=0)  # no CFG, a negative prompt
    assert diffusion.without_word(f"({trigger}), a {trigger} {trigger}_1 digit", trigger) == "( ), a digit"  # found as diffusers finds it
    with pytest.raises(UserError, match="--embedding-weight nan: the weight must be a finite number"):
        draw([prompt], embedding_weight=float("nan"))
    with pytest.raises(UserError, match="this model has none"):
        models.sample(diffusion.load(base), 1, 0, [prompt], steps=2, embedding_weight=0.5)


def test_a_student_distilled_from_a_textual_inversion_teacher_keeps_its_trigger(base, tmp_path):
    """The student's tokenizer holds the teacher's learned token; the trigger word is recorded beside it, so
    --embedding-weight weighs it on the student as on the teacher (0: the prompt without the word)."""
    from genadapt import models
    from genadapt.config import DistillConfig
    from genadapt.recipes.distill import distill

    _run(base, tmp_path / "ti", train="embedding", token="<glyph>", vectors=2, learning_rate=0.5, token_position="end")
    teacher = models.load_run(tmp_path / "ti")
    trigger = teacher.extras["trigger"]
    prompt = f"a digit {trigger}"
    out = distill(DistillConfig(teacher=str(tmp_path / "ti"), kind="progressive", out=str(tmp_path / "pd"), teacher_steps=2, student_steps=1,
                                steps=2, learning_rate=1e-4, prompts=[prompt], num_samples=2, teacher_sample_steps=2, batch_size=2,
                                eval_images=2, reference_steps=2, checkpointing_steps=2, kid_images=0))
    student = models.load_run(out)
    assert student.extras["trigger"] == trigger
    assert diffusion.load(str(out / "pipeline")).extras["trigger"] == trigger  # the student's folder on its own, too
    learned = teacher.tokenizer.convert_tokens_to_ids(trigger)
    assert learned != teacher.tokenizer.unk_token_id and student.tokenizer.convert_tokens_to_ids(trigger) == learned
    torch.testing.assert_close(student.text_encoder.get_input_embeddings().weight[learned], teacher.text_encoder.get_input_embeddings().weight[learned])
    torch.testing.assert_close(models.sample(student, 2, 0, [prompt], embedding_weight=0.0), models.sample(student, 2, 0, ["a digit"]), atol=1e-5, rtol=0)
    assert (models.sample(student, 2, 0, [prompt]) - models.sample(student, 2, 0, ["a digit"])).abs().max() > 1e-3
