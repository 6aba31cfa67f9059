"""The zoo: pretraining resumes after a kill, sampling is deterministic, cards are readable."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from click.testing import CliRunner

from diffusion_fixtures import TINY
from genadapt.cli import app
from genadapt.zoo import pocket_sd

TINY_SETS = [
    "vae_channels=[16,16,16]", "text_hidden=32", "text_layers=1", "text_heads=2", "unet_channels=[32,32,32]",
    "unet_heads=2", "vocab_size=300", "data=builtin:digits", "vae_batch=4", "unet_batch=4", "warmup_steps=2",
    "sample_every=100000", "log_every=1", "checkpoint_every=2",
]


def test_pocket_sd_tiny_pretrain_gives_a_diffusers_pipeline_with_deterministic_sampling(tmp_path):
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    config = replace(TINY, data="builtin:digits", vae_steps=2, unet_steps=2, vae_batch=4, unet_batch=4, warmup_steps=1, sample_every=100, checkpoint_every=1, sample_prompts=("a handwritten digit one",))
    folder = pocket_sd.pretrain(tmp_path / "run", config)
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.scheduler.config.clip_sample is False  # latents must not be clipped (cpu_pretraining.md)

    def run(seed):
        return pipeline(["a handwritten digit one"], num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["train"]["count"] > 1000 and manifest["seed"] == 0


def test_the_tokenizer_trained_twice_on_the_same_captions_is_the_same_file(tmp_path):
    """Same captions, same vocab.json and merges.txt byte for byte (the BPE trainer's ids for single symbols follow
    a hash set's order; ours are CLIP's order), and CLIPTokenizer reads it with every byte in and at the end of a word."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    from genadapt.data import load_dataset
    from genadapt.zoo.tokenizer import train_clip_bpe

    captions = load_dataset("builtin:digits", resolution=32).captions + ["a picture of a flag", "emoji"]
    first, second = (train_clip_bpe(captions, tmp_path / name, vocab_size=300) for name in ("first", "second"))
    for file in ("vocab.json", "merges.txt"):
        assert (first / file).read_bytes() == (second / file).read_bytes(), file
    vocab = json.loads((first / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(len(vocab))) and vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert all(symbol in vocab and symbol + "</w>" in vocab for symbol in ByteLevel.alphabet())
    tokenizer = CLIPTokenizer.from_pretrained(first)
    ids = tokenizer("A handwritten digit three").input_ids
    assert ids[0] == 0 and ids[-1] == 1 and tokenizer.decode(ids[1:-1]) == "a handwritten digit three"


def test_pretrain_resumes_after_sigkill(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "genadapt.cli", "pretrain", "pocket-sd", "--out", str(out)]
    for item in TINY_SETS + ["vae_steps=2", "unet_steps=400"]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "unet-state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and _logged_steps(out) >= 4):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.is_file(), "no checkpoint was written before the kill"
    saved_step = torch.load(state, weights_only=True)["step"]
    assert saved_step >= 2

    # Same run, told to stop two steps after the checkpoint so the test stays short.
    rerun = [c if c != "unet_steps=400" else f"unet_steps={saved_step + 2}" for c in command]
    result = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {saved_step}" in result.stderr
    assert (out / "pipeline" / "model_index.json").is_file()


def _logged_steps(out):
    path = out / "log.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"unet"' in line)


def test_zoo_list_and_show():
    runner = CliRunner()
    listing = runner.invoke(app, ["zoo", "list"])
    assert listing.exit_code == 0 and "pocket-sd" in listing.output and "pocket-stylegan2" in listing.output
    shown = runner.invoke(app, ["zoo", "show", "pocket-sd"])
    assert shown.exit_code == 0 and json.loads(shown.output)["name"] == "pocket-sd"
    assert runner.invoke(app, ["zoo", "show", "nope"]).exit_code == 2
