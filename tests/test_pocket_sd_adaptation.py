"""On the shipped pocket-sd: exported LoRA (both files) and embedding load in diffusers and move
samples towards the held-out target domain."""

import pytest

from genadapt.api import adapt
from genadapt.data import load_dataset
from genadapt.models import base_samples as samples_from_base
from genadapt.eval.features import extract, get_extractor
from genadapt.families import diffusion

TARGET = "builtin:openmoji/flags"


@pytest.fixture(scope="module")
def reference_center():
    encoder = get_extractor("pocket")
    return encoder, extract(encoder, load_dataset(TARGET + "/reference"), progress=False).mean(0)


def _distance(encoder, center, images):
    return float((extract(encoder, images, progress=False).mean(0) - center).norm())


def _prompts(run):
    import json

    return json.loads((run / "prompts.json").read_text())


@pytest.mark.parametrize("weight_name", ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"])
def test_lora_files_load_on_pocket_sd_and_move_towards_the_target(tmp_path_factory, reference_center, weight_name):
    encoder, center = reference_center
    run = tmp_path_factory.getbasetemp() / "pocket-lora"
    if not (run / "pytorch_lora_weights.safetensors").is_file():
        adapt(base="pocket-sd", data=TARGET, shots=10, train="lora", steps=120, learning_rate=5e-4, out=run, num_validation_images=1, sample_steps=2)
    prompts = _prompts(run)[:4] * 4
    before = samples_from_base("pocket-sd", 16, prompts, seed=0, steps=15).pixels
    model = diffusion.load("pocket-sd")
    model.pipeline.load_lora_weights(str(run), weight_name=weight_name)
    after = diffusion.sample(model, prompts, steps=15, seed=0)
    assert _distance(encoder, center, after) < _distance(encoder, center, before)


def test_embedding_loads_on_pocket_sd_and_moves_towards_the_target(tmp_path, reference_center):
    encoder, center = reference_center
    run = tmp_path / "ti"
    adapt(base="pocket-sd", data=TARGET, shots=10, train="embedding", token="<flag>", vectors=2, steps=150, out=run, num_validation_images=1, sample_steps=2)
    prompts = _prompts(run)[:4] * 4
    model = diffusion.load("pocket-sd")
    model.pipeline.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    after = diffusion.sample(model, prompts, steps=15, seed=0)
    base_prompts = [p.replace("<flag>_1", "").replace("<flag>", "").strip() for p in prompts]
    before = samples_from_base("pocket-sd", 16, base_prompts, seed=0, steps=15).pixels
    assert _distance(encoder, center, after) < _distance(encoder, center, before)
