"""Best step by validation: the best check under the copy ceiling is kept, copies never win, patience stops the run."""

import json

import torch

from genadapt.data import load_dataset
from genadapt.recipes.validation import Validation


def test_the_best_eligible_check_is_kept_and_patience_stops(tmp_path):
    shots = load_dataset("builtin:openmoji/flags?shots=10&seed=0", resolution=32)
    held_out = load_dataset("builtin:openmoji/flags/reference", resolution=32)
    validation, later = held_out.subset(range(0, 80)), held_out.subset(range(80, 112))
    noise = torch.Generator().manual_seed(0)
    outputs = {
        1: torch.rand(32, 3, 32, 32, generator=noise) * 2 - 1,  # far from the domain
        2: later.tensors(),  # the domain itself: the best
        3: shots.tensors().repeat(4, 1, 1, 1)[:32],  # literal copies of the shots: lower KID is no excuse
        4: torch.rand(32, 3, 32, 32, generator=noise) * 2 - 1,
    }
    step_of = {"step": 0}

    def sample(model, n, seed):
        return outputs[step_of["step"]][:n]

    checker = Validation(every=1, samples=32, patience=2, copy_ceiling=0.05, images=validation, shots=shots, sample=sample, seed=0, out=tmp_path)
    for step in (1, 2, 3, 4):
        step_of["step"] = step
        record = checker.check(step, model=None, snapshot=lambda: {"weights_at": step})
        if step == 3:
            assert record["copy_rate"] > 0.9 and not record["eligible"]
        if checker.stop:
            break
    assert checker.best["step"] == 2 and checker.best_state == {"weights_at": 2}
    assert step == 4 and checker.stop  # two checks without improvement after step 2
    lines = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and [r["best"] for r in lines] == [True, True, False, False]
    again = Validation(every=1, samples=32, patience=2, copy_ceiling=0.05, images=validation, shots=shots, sample=sample, seed=0, out=tmp_path)
    again.load_state_dict(checker.state_dict())
    assert again.best == checker.best and again.stop


def test_a_gan_run_with_validation_saves_its_best_step(tmp_path):
    from safetensors.torch import load_file

    from genadapt.config import AdaptConfig
    from genadapt.families.stylegan2 import save_stylegan2
    from genadapt.recipes.train_gan import adapt_gan
    from genadapt.runs import load_torch
    from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, build

    tiny = PocketStyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8})
    _, discriminator, g_ema = build(tiny)
    save_stylegan2(tmp_path / "gan", g_ema, discriminator, tiny.generator_kwargs(), tiny.discriminator_kwargs(), extra={"pretraining": {"r1_gamma": 1.0}})
    out = tmp_path / "run"
    summary = adapt_gan(AdaptConfig(base=str(tmp_path / "gan"), data="builtin:digits/3?shots=4", train="full", steps=8, batch_size=2,
                                    num_validation_images=2, validate_every=2, validation_samples=8, patience=2, out=out))
    checks = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    best = summary["validation"]["best_step"]
    assert checks and best in [c["step"] for c in checks if c["best"]]
    assert summary["trained_steps"] == checks[-1]["step"] if summary["validation"]["stopped_early"] else summary["trained_steps"] == 8
    saved = load_file(out / "model" / "generator_ema.safetensors")
    best_ema = load_torch(out / "checkpoints" / "state.pt")["validation"]["best_state"]["ema"]
    assert all(torch.equal(saved[name], value) for name, value in best_ema.items())  # the artifact is the best step's G_ema


def test_a_diffusion_run_with_validation_records_its_curve(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from diffusion_fixtures import build_tiny_pipeline
    from genadapt.api import adapt
    from genadapt.config import AdaptConfig

    base = build_tiny_pipeline(tmp_path / "tiny")
    out = tmp_path / "run"
    adapt(AdaptConfig(base=str(base), data="builtin:digits/3?shots=4", train="lora", rank=2, steps=4, batch_size=2, learning_rate=1e-2,
                      num_validation_images=1, sample_steps=1, validate_every=2, validation_samples=4, patience=0, out=out))
    summary = json.loads((out / "summary.json").read_text())
    assert [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()] == [2, 4]
    assert summary["validation"]["best_step"] in (2, 4) and summary["trained_steps"] == 4
