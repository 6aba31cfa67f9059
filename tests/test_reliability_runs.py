"""Run folders under faults: one writer, bad --out answered in one line, nothing lost to a kill, Ctrl-C or a full disk.

Every CLI case asserts exit code 2 (130 for an interrupt), one `error:` line naming the file or flag, no traceback.
The kill tests run the real CLI in a subprocess and SIGKILL it at three points (after a step, inside a
checkpoint write, between compare runs); the rerun must resume and end bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from diffusion_fixtures import build_tiny_pipeline
from genadapt.cli import app

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DATA = "builtin:digits/3?shots=4"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def gan_base(tmp_path_factory):
    from genadapt.families.stylegan2 import save_stylegan2
    from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, build

    tiny = PocketStyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8})
    _, discriminator, g_ema = build(tiny)
    folder = tmp_path_factory.mktemp("tiny-gan") / "model"
    save_stylegan2(folder, g_ema, discriminator, tiny.generator_kwargs(), tiny.discriminator_kwargs(), extra={"pretraining": {"r1_gamma": 1.0}})
    return str(folder)


def _lora_args(base, out, steps=4):
    return ["adapt", "--base", base, "--data", DATA, "--train", "lora", "--rank", "2", "--learning-rate", "1e-2", "--steps", str(steps),
            "--checkpointing-steps", "1", "--num-validation-images", "1", "--sample-steps", "1", "--out", str(out)]


def _one_line_error(result, *needles):
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith(("Loading", "adapt "))]
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), result.output
    assert "Traceback" not in result.output


def test_bad_out_folders_are_refused_before_any_work(base, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    data = tmp_path / "shots"
    data.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 90, 20, 20)).save(data / f"{i}.png")
    cases = [
        (afile, "is a file, not a folder"),
        (afile / "run", "is a file, so no folder can be made under it"),
        (Path("/dev/null"), "is a device or special file"),
        (data / "runs" / "r1", "is inside --data"),
    ]
    for out, needle in cases:
        args = _lora_args(base, out)
        if "inside" in needle:
            args[args.index("--data") + 1] = str(data)
        _one_line_error(runner.invoke(app, args), needle)
    assert not (data / "runs").exists()


def test_resume_refuses_fewer_steps_and_changed_data(base, tmp_path):
    from PIL import Image

    data = tmp_path / "shots"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 80, 40, 40)).save(data / f"{i}.png")
    args = _lora_args(base, tmp_path / "run", steps=3)
    args[args.index("--data") + 1] = str(data)
    assert runner.invoke(app, args).exit_code == 0
    shorter = list(args)
    shorter[shorter.index("--steps") + 1] = "2"
    _one_line_error(runner.invoke(app, shorter), "already trained 3 steps", "--steps 2")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(data / "0.png")  # same file name, other pixels
    longer = list(args)
    longer[longer.index("--steps") + 1] = "5"
    _one_line_error(runner.invoke(app, longer), "trained on other data")


def _gan_args(gan_base, out, steps):
    return [sys.executable, "-m", "genadapt", "adapt", "--base", gan_base, "--data", DATA, "--train", "full", "--steps", str(steps),
            "--batch-size", "2", "--num-validation-images", "2", "--out", str(out)]


def test_a_second_writer_is_refused_at_once_and_a_stale_lock_is_taken_over(gan_base, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_gan_args(gan_base, out, 400), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.2)
        started = time.time()
        second = subprocess.run(_gan_args(gan_base, out, 400), env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"process {first.pid}" in second.stderr and "another --out" in second.stderr
        assert "Traceback" not in second.stderr and time.time() - started < 30
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".genadapt.lock").is_file()  # the killed run could not release it
    resumed = subprocess.run(_gan_args(gan_base, out, 3), env=ENV, capture_output=True, text=True, timeout=300)
    assert "taking it over" in resumed.stderr, resumed.stderr[-2000:]
    assert not (out / ".genadapt.lock").exists()


KILL_IN_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    import genadapt.runs as runs
    import genadapt.recipes.train as train, genadapt.recipes.train_gan as train_gan
    original, count = runs.save_torch, [0]
    def dying(path, state):
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT_CHECKPOINT"]):
            def half(tmp):  # a kill in the middle of writing the checkpoint's temp file
                tmp.write_bytes(b"PK" + b"0" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            runs.atomic_write(path, half)
        return original(path, state)
    train.save_torch = train_gan.save_torch = dying
    from genadapt.cli import app
    sys.argv = ["genadapt"] + sys.argv[1:]
    app()
    """
)


def _kill_after_steps(args, out: Path, steps: int):
    process = subprocess.Popen([sys.executable, "-m", "genadapt", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    log = out / "log.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        assert time.time() < deadline and process.poll() is None, "the run ended before the kill point"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _kill_inside_checkpoint(args, tmp_path: Path, at: int):
    script = tmp_path / "kill_in_checkpoint.py"
    script.write_text(KILL_IN_CHECKPOINT)
    done = subprocess.run([sys.executable, str(script), *args], env={**ENV, "KILL_AT_CHECKPOINT": str(at)}, capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL


def _finish(args):
    done = subprocess.run([sys.executable, "-m", "genadapt", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _artifact_tensors(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*.safetensors") if "checkpoints" not in p.parts)
    return {str(f.relative_to(out)): load_file(f) for f in files}


@pytest.mark.parametrize("family", ["diffusion", "gan"])
def test_sigkill_at_three_points_resumes_bit_exact(family, base, gan_base, tmp_path):
    if family == "diffusion":
        def args_for(out):
            return _lora_args(base, out, steps=8)
    else:
        def args_for(out):
            return ["adapt", "--base", gan_base, "--data", DATA, "--train", "full", "--steps", "8", "--batch-size", "2",
                    "--checkpointing-steps", "1", "--num-validation-images", "2", "--out", str(out)]
    _finish(args_for(tmp_path / "straight"))
    expected = _artifact_tensors(tmp_path / "straight")
    straight_log = (tmp_path / "straight" / "log.jsonl").read_text()

    out = tmp_path / "killed"
    _kill_after_steps(args_for(out), out, 2)  # 1: right after a step
    _kill_inside_checkpoint(args_for(out), tmp_path, at=2)  # 2: inside a checkpoint write (a half-written temp file)
    assert list((out / "checkpoints").glob(".*.tmp")), "the kill should have left a partial temp file"
    _kill_after_steps(args_for(out), out, 5)  # 3: after resuming
    _finish(args_for(out))
    assert not list((out / "checkpoints").glob(".*.tmp")) and not (out / ".genadapt.lock").exists()
    got = _artifact_tensors(out)
    assert got.keys() == expected.keys()
    for name, tensors in expected.items():
        assert all((got[name][k] == v).all() for k, v in tensors.items()), name
    assert (out / "log.jsonl").read_text() == straight_log


def test_ctrl_c_checkpoints_the_finished_step_and_resumes(gan_base, tmp_path):
    args = ["adapt", "--base", gan_base, "--data", DATA, "--train", "full", "--steps", "60", "--batch-size", "2",
            "--checkpointing-steps", "50", "--num-validation-images", "2", "--out", str(tmp_path / "run")]
    process = subprocess.Popen([sys.executable, "-m", "genadapt", *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted after step" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    import torch

    step = torch.load(tmp_path / "run" / "checkpoints" / "state.pt", weights_only=True)["step"]
    assert 3 <= step < 50  # the step it finished, not the periodic checkpoint
    assert len(log.read_text().splitlines()) == step


def test_disk_full_keeps_the_earlier_checkpoint(base, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not allow mounting a small tmpfs")
    try:
        out = mount / "run"
        first = runner.invoke(app, _lora_args(base, out, steps=1))
        assert first.exit_code == 0, first.output
        before = (out / "checkpoints" / "state.pt").read_bytes()
        import shutil

        # Leave room for the small files (lock, log, config) but not for the next checkpoint.
        keep = len(before) // 2
        with (mount / "filler").open("wb") as handle:
            while shutil.disk_usage(mount).free > keep:
                handle.write(b"\0" * 4096)
                handle.flush()
        result = runner.invoke(app, _lora_args(base, out, steps=3))
        assert result.exit_code == 2 and "no space left" in result.output and "Traceback" not in result.output, result.output
        assert "state.pt" in result.output and "needed about" in result.output
        assert (out / "checkpoints" / "state.pt").read_bytes() == before
        assert not list(out.rglob("*.tmp")) and not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default_and_refuses_otherwise(tmp_path):
    """A run checkpointed before a setting existed (its config.yaml lacks the key) did what the default does:
    it resumes with the default, and refuses any other value."""
    from genadapt.config import DistillConfig
    from genadapt.errors import UserError
    from genadapt.runs import check_resumable, field_defaults

    (tmp_path / "state.pt").write_bytes(b"x")
    (tmp_path / "config.yaml").write_text("kind: progressive\nsteps: 10\n")  # written before caption_extension existed
    defaults = field_defaults(DistillConfig)
    check_resumable(tmp_path, "state.pt", {"kind": "progressive", "steps": 10, "caption_extension": ".txt"}, defaults=defaults)
    with pytest.raises(UserError, match="caption_extension"):
        check_resumable(tmp_path, "state.pt", {"kind": "progressive", "steps": 10, "caption_extension": ".caption"}, defaults=defaults)
    with pytest.raises(UserError, match="steps"):
        check_resumable(tmp_path, "state.pt", {"kind": "progressive", "steps": 20, "caption_extension": ".txt"}, defaults=defaults)
