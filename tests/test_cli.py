"""The command line: fast start, one-line errors, data inspect on real folders."""

import os
import subprocess
import sys

import pytest
from PIL import Image
from click.testing import CliRunner

from genadapt import __version__
from genadapt.cli import app

runner = CliRunner()


def test_import_is_light():
    code = "import sys, genadapt, genadapt.cli; print(any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_help_and_version():
    assert runner.invoke(app, ["--help"]).exit_code == 0
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_inspect_mixed_folder_lists_broken_files_and_counts_good(tmp_path):
    for index in range(3):
        Image.new("RGB", (20, 20), (index * 60, 10, 10)).save(tmp_path / f"good{index}.png")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 0
    assert "3 usable image(s), 2 unusable" in result.output
    assert "zero.png: empty file" in result.output and "notes.jpg: not an image" in result.output
    strict = runner.invoke(app, ["data", "inspect", str(tmp_path), "--strict"])
    assert strict.exit_code == 1


def test_unusable_folder_exits_non_zero_without_traceback(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "inspect", str(tmp_path)])
    assert result.exit_code == 1 and "no usable image" in result.output
    missing = runner.invoke(app, ["data", "inspect", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "Traceback" not in missing.output and "no such folder" in missing.output


def test_grid_of_builtin(tmp_path):
    result = runner.invoke(app, ["data", "grid", "builtin:digits/4?shots=6", "--out", str(tmp_path / "g.png"), "--resolution", "16"])
    assert result.exit_code == 0
    assert Image.open(tmp_path / "g.png").size[0] > 16


def test_grid_pads_and_composites_as_adapt_does(tmp_path):
    """data grid --fit pad --background black: the grid shows what a run with those flags trains on."""
    import numpy as np

    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255  # opaque red, twice as wide as tall
    (tmp_path / "data").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "data" / "wide.png")
    tile = {}
    for fit, background in (("crop", "white"), ("pad", "black")):
        out = tmp_path / f"{fit}.png"
        result = runner.invoke(app, ["data", "grid", str(tmp_path / "data"), "--out", str(out), "--resolution", "8", "--scale", "1", "--fit", fit, "--background", background])
        assert result.exit_code == 0, result.output
        tile[fit] = np.asarray(Image.open(out).convert("RGB"))[2:10, 2:10]  # the one image, inside the grid's 2 px border
    assert (tile["crop"] == [255, 0, 0]).all()
    assert (tile["pad"][0] == 0).all() and (tile["pad"][4] == [255, 0, 0]).all()
    refused = runner.invoke(app, ["data", "grid", str(tmp_path / "data"), "--fit", "stretch"])
    assert refused.exit_code == 2 and "--fit stretch: choose crop or pad" in refused.output


def test_bad_pretrain_settings_are_one_line_errors():
    result = runner.invoke(app, ["pretrain", "pocket-sd", "--out", "x", "--set", "unet_steps=many"])
    assert result.exit_code == 2 and "expected a value like" in result.output


def test_sample_both_pocket_models_deterministically(tmp_path):
    for model, extra in (("pocket-stylegan2", []), ("pocket-sd", ["--prompt", "grinning face", "--steps", "5"])):
        grids = []
        for name in ("a.png", "b.png"):
            result = runner.invoke(app, ["sample", model, "-n", "4", "--seed", "3", "--out", str(tmp_path / f"{model}-{name}")] + extra)
            assert result.exit_code == 0, result.output
            grids.append((tmp_path / f"{model}-{name}").read_bytes())
        assert grids[0] == grids[1]


def test_embedding_weight_on_a_model_without_a_trigger_is_refused(tmp_path):
    result = runner.invoke(app, ["sample", "pocket-sd", "--prompt", "grinning face", "--embedding-weight", "0.5", "-n", "1", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--embedding-weight weighs a textual-inversion run's trigger word" in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [
    [command, "--no-such-flag"] for command in ("adapt", "compare", "data", "demo", "distill", "evaluate", "pretrain", "sample", "ui", "zoo")
] + [["data", "inspect", "--no-such-flag"], ["sample", "-n", "abc"], ["no-such-command"]], ids=" ".join)
def test_a_usage_error_in_the_real_command_is_one_line_with_exit_code_2(args):
    """Through the installed entry point, not CliRunner (which swallows what would reach the terminal): typer's own
    commands raise the exceptions of the click copy it ships, which a catch of click's alone let through as a traceback."""
    done = subprocess.run([sys.executable, "-m", "genadapt", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], done.stderr


def test_no_torchvision_notice_before_the_output():
    """transformers announces the missing torchvision on importing a pipeline; genadapt never needs it, so it stays quiet."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from diffusers import StableDiffusionPipeline"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    if "requires torchvision" not in plain.stderr:
        pytest.skip("this transformers says nothing about torchvision")
    quiet = subprocess.run([sys.executable, "-c", "import genadapt; " + code], capture_output=True, text=True, check=True, env=env)
    assert "torchvision" not in quiet.stderr, quiet.stderr


def test_help_shows_zero_and_other_defaults():
    """A default of 0 is shown like any other (0 == False once hid it)."""
    import click

    adapt = app.get_command(click.Context(app), "adapt")
    helps = {option.name: option.help for option in adapt.params}
    for name, default in (("seed", "0"), ("batch_size", "4"), ("noise_offset", "0.0"), ("optimizer", "adamw")):
        assert helps[name].endswith(f"[default: {default}]"), (name, helps[name])
    assert "[default" not in helps["cpu"]  # a flag is off unless given


@pytest.mark.parametrize("args", [[], ["zoo"], ["data"]], ids=lambda args: " ".join(["genadapt", *args]))
def test_a_command_alone_shows_its_help_not_an_error(args):
    done = subprocess.run([sys.executable, "-m", "genadapt", *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("Usage: genadapt") and "Commands" in done.stdout and not done.stderr, (done.stdout, done.stderr)
