"""StyleGAN2 training pieces (losses, R1, EMA, mixing, sampling) and pocket-stylegan2 pretraining.

Pretraining tests use a tiny network on ``builtin:digits`` at 32 px: they check the run folder,
the model folder, exact resumption (``stop_after``) and resumption after a real SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from genadapt.families.stylegan2 import (
    LazyR1,
    accumulate,
    d_logistic_loss,
    ema_decay,
    g_nonsaturating_loss,
    lazy_adam_hyperparameters,
    load_stylegan2,
    mixing_noise,
    r1_penalty,
    sample,
)
from genadapt.families.stylegan2_nets import Discriminator, Generator
from genadapt.runs import load_torch
from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, load_pocket_stylegan2, pretrain

TINY = {4: 16, 8: 16, 16: 8, 32: 8}


def tiny_config(**overrides) -> PocketStyleGAN2Config:
    settings = dict(
        data="builtin:digits", size=32, style_dim=16, n_mlp=2, channels=TINY, batch=4, r1_every=2,
        r1_gamma=1.0, steps=6, checkpoint_every=2, sample_every=3, log_every=1, sample_count=4, threads=1,
    )
    settings.update(overrides)
    return PocketStyleGAN2Config(**settings)


def tiny_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(32, 16, 2, channels=TINY)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- losses


def test_d_loss_falls_as_reals_score_higher_and_fakes_lower():
    base = d_logistic_loss(torch.zeros(8), torch.zeros(8))
    assert math.isclose(base.item(), 2 * math.log(2), rel_tol=1e-6)  # -log σ(0) - log(1 - σ(0))
    assert d_logistic_loss(torch.full((8,), 2.0), torch.zeros(8)) < base
    assert d_logistic_loss(torch.zeros(8), torch.full((8,), -2.0)) < base
    assert d_logistic_loss(torch.zeros(8), torch.full((8,), 2.0)) > base


def test_g_loss_is_non_saturating():
    assert g_nonsaturating_loss(torch.full((8,), 2.0)) < g_nonsaturating_loss(torch.zeros(8))
    # When D confidently rejects fakes, -log σ(D) still has slope ≈ -1 (minimax log(1-σ) would be ≈ 0).
    logits = torch.full((8,), -10.0, requires_grad=True)
    g_nonsaturating_loss(logits).backward()
    assert torch.allclose(logits.grad * 8, torch.full((8,), -1.0), atol=1e-4)


class _Constant(nn.Module):
    def forward(self, x):
        return 3.0 + 0.0 * x.flatten(1).sum(1, keepdim=True)


class _Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return (x.flatten(1) * self.w.flatten()).sum(1, keepdim=True)


def test_r1_is_zero_for_a_constant_d_and_the_squared_gradient_norm_otherwise():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    assert r1_penalty(_Constant()(x), x).item() == 0.0
    w = torch.randn(3, 8, 8)
    assert torch.allclose(r1_penalty(_Linear(w)(x), x), w.pow(2).sum())  # ∇_x <w, x> = w
    d = Discriminator(32, channels=TINY)
    real = torch.randn(4, 3, 32, 32, requires_grad=True)
    assert r1_penalty(d(real), real).item() > 0


def test_lazy_r1_scales_by_interval_and_gamma_and_trains_d():
    w = torch.randn(3, 8, 8)
    r1 = LazyR1(gamma=4.0, interval=16)
    loss, value = r1(_Linear(w), torch.randn(2, 3, 8, 8))
    assert torch.allclose(value, w.pow(2).sum())
    assert torch.allclose(loss, 16 * 4.0 / 2 * w.pow(2).sum())
    assert [r1.due(i) for i in (0, 1, 15, 16, 32)] == [True, False, False, True, True]
    d = Discriminator(32, channels=TINY)
    loss, _ = r1(d, torch.randn(4, 3, 32, 32), augment=lambda x: x.flip(3))
    loss.backward()  # differentiable w.r.t. D's weights (create_graph)
    assert d.convs[0][0].weight.grad.abs().sum() > 0


def test_lazy_adam_correction():
    lr, betas = lazy_adam_hyperparameters(0.002, (0.0, 0.99), 16)
    c = 16 / 17
    assert math.isclose(lr, 0.002 * c) and betas == (0.0, 0.99**c)
    assert lazy_adam_hyperparameters(0.002, (0.0, 0.99), None) == (0.002, (0.0, 0.99))


# ----------------------------------------------------------------------------- EMA and mixing


def test_ema_decay_zero_copies_one_keeps_half_averages():
    ema, model = tiny_generator(0), tiny_generator(1)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    accumulate(ema, model, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    accumulate(ema, model, 0.5)
    for (name, p), q in zip(ema.named_parameters(), model.parameters()):
        assert torch.allclose(p, (before[name] + q) / 2)
    accumulate(ema, model, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), model.parameters()))


def test_ema_half_life_is_counted_in_images():
    decay = ema_decay(32, half_life_kimg=10)
    assert math.isclose(decay, 0.5 ** (32 / 10_000))  # rosinality's accum
    assert math.isclose(decay ** (10_000 / 32), 0.5)
    assert math.isclose(ema_decay(64, 10) ** (10_000 / 64), 0.5)
    assert ema_decay(32, 10, images_seen=320, rampup=0.05) < ema_decay(32, 10, images_seen=10**6, rampup=0.05)
    assert ema_decay(32, 10, images_seen=10**7, rampup=0.05) == decay


def test_mixing_noise():
    styles, index = mixing_noise(5, 16, 8, prob=0.0)
    assert len(styles) == 1 and index is None and styles[0].shape == (5, 16)
    indices = set()
    for _ in range(200):
        styles, index = mixing_noise(2, 16, 8, prob=1.0)
        assert len(styles) == 2
        indices.add(index)
    assert indices == set(range(1, 8))  # crossover in [1, n_latent - 1], like rosinality


# ----------------------------------------------------------------------------- sampling


def test_sample_is_a_function_of_the_seed_and_leaves_global_rng_alone():
    g = tiny_generator()
    rng = torch.get_rng_state()
    a, b, c = sample(g, 5, seed=3), sample(g, 5, seed=3), sample(g, 5, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.shape == (5, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(sample(g, 5, seed=3, batch=2), a, atol=1e-5)  # chunking keeps the draw
    # Truncation ψ = 0 maps every z to w_avg: with fixed noise all samples are the same image.
    collapsed = sample(g, 3, seed=3, truncation=0.0)
    assert torch.allclose(collapsed[0], collapsed[1], atol=1e-6)


# ----------------------------------------------------------------------------- pretraining


def test_tiny_pretrain_writes_run_and_model_folders(tmp_path):
    config = tiny_config(steps=4)
    model_dir = pretrain(tmp_path / "run", config)
    assert model_dir == tmp_path / "run" / "model"
    run = tmp_path / "run"
    for name in ("config.yaml", "manifest.json", "log.jsonl", "checkpoints/state.pt", "samples/step-000003.png",
                 "samples/step-000004.png"):
        assert (run / name).is_file(), name
    records = [r for r in read_log(run) if "event" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["d_loss"]) and math.isfinite(r["g_loss"]) for r in records)
    assert "r1" in records[0]

    reference_g = Generator(**config.generator_kwargs())
    reference_d = Discriminator(**config.discriminator_kwargs())
    for file, reference in (("generator_ema", reference_g), ("generator", reference_g), ("discriminator", reference_d)):
        tensors = load_file(model_dir / f"{file}.safetensors")
        assert sorted(tensors) == sorted(reference.state_dict())  # rosinality keys (safetensors sorts them)
        assert all(t.dtype == torch.float32 for t in tensors.values())

    g_ema, d, info = load_pocket_stylegan2(model_dir)
    assert info["generator"]["channels"] == {str(k): v for k, v in TINY.items()}
    saved = load_file(model_dir / "generator_ema.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in g_ema.state_dict().items())
    assert d(sample(g_ema, 4, seed=0)).shape == (4, 1)
    g_raw, _, _ = load_stylegan2(model_dir, which="generator")
    assert not torch.equal(g_raw.style[1].weight, g_ema.style[1].weight)  # EMA differs from the raw G
    # Finished runs are not retrained.
    mtime = (model_dir / "config.json").stat().st_mtime_ns
    assert pretrain(run, config) == model_dir and (model_dir / "config.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("augment", ["diffaugment", "ada"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path, augment):
    config = tiny_config(augment=augment, checkpoint_every=100)  # stop_after checkpoints anyway
    straight = pretrain(tmp_path / "straight", config)
    stopped = pretrain(tmp_path / "resumed", config, stop_after=3)
    assert stopped == tmp_path / "resumed" / "checkpoints" / "state.pt" and load_torch(stopped)["step"] == 3
    assert not (tmp_path / "resumed" / "model").exists()
    resumed = pretrain(tmp_path / "resumed", config)
    for file in ("generator_ema", "generator", "discriminator"):
        a, b = load_file(straight / f"{file}.safetensors"), load_file(resumed / f"{file}.safetensors")
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (file, key)
    steps = [r["step"] for r in read_log(tmp_path / "resumed") if "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_architecture(tmp_path):
    pretrain(tmp_path, tiny_config(), stop_after=1)
    with pytest.raises(ValueError, match="new output folder"):
        pretrain(tmp_path, tiny_config(style_dim=8))


def test_sigkill_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    state = out / "checkpoints" / "state.pt"
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, pretrain\n"
        f"pretrain({str(out)!r}, PocketStyleGAN2Config(**{tiny_config(steps=100_000, sample_every=10**6).__dict__!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not state.is_file():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoint_step = load_torch(state)["step"]
    assert checkpoint_step > 0

    pretrain(out, tiny_config(steps=checkpoint_step + 2, sample_every=10**6))
    log = read_log(out)
    starts = [r for r in log if r.get("event") == "start"]
    assert [s["step"] for s in starts] == [0, checkpoint_step]  # resumed, not restarted
    assert starts[1]["resumed"] is True
    steps = [r["step"] for r in log if "event" not in r]
    assert steps == list(range(1, checkpoint_step + 3))  # steps lost to the kill were dropped and rerun
    assert (out / "model" / "generator_ema.safetensors").is_file()


def test_ctrl_c_finishes_the_step_and_checkpoints_it(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(steps=100_000, sample_every=10**6, checkpoint_every=10**6)
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, pretrain\n"
        f"pretrain({str(out)!r}, PocketStyleGAN2Config(**{config.__dict__!r}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "log.jsonl").is_file() or (out / "log.jsonl").read_text().count("\n") < 3:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "KeyboardInterrupt: stopped at step" in stderr.decode()
    last_step = read_log(out)[-1]["step"]
    assert load_torch(out / "checkpoints" / "state.pt")["step"] == last_step >= 2
