"""The technique registry and the authoritative config.

* A technique registered inside this test (BitFit: biases only) is at once an `adapt --train` choice, a `compare
  --techniques` choice and a run `sample` loads back, with no other source file touched.
* Every setting a run would not read is refused in one line, exit code 2.
* Every config field is a flag, and every flag the README names exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from diffusion_fixtures import build_tiny_pipeline
from genadapt import techniques
from genadapt.cli import app
from genadapt.config import setting

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


class BitFitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bias_scope: str = setting("unet", "BitFit: which module's biases train.")


class BitFit:
    """BitFit (Ben Zaken et al. 2022): only the bias terms train."""

    name = "bitfit"
    weight_decay = 0.0

    def __init__(self, settings: BitFitSettings):
        self.scope = settings.bias_scope

    def prepare(self, model) -> None:
        techniques.set_trainable(model, lambda name: name.startswith(self.scope + ".") and name.endswith(".bias"))

    def parameters(self, model):
        return techniques.trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        biases = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(biases, str(Path(out) / "bitfit.safetensors"))
        return [Path(out) / "bitfit.safetensors"]


def load_bitfit(load_base, run: Path):
    model = load_base()
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(Path(run) / "bitfit.safetensors").items():
            parameters[name].copy_(value)
    return model


@pytest.fixture
def bitfit():
    technique = techniques.register(techniques.Technique(
        name="bitfit", kind="parameter", summary="biases only",
        families={"diffusion": techniques.Implementation(build=BitFit, settings=BitFitSettings, learning_rate=1e-3,
                                                        compare={"train": "bitfit", "learning_rate": 1e-2}, load=load_bitfit)},
    ))
    yield technique
    techniques.unregister("bitfit")


def _invoke(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_a_technique_registered_here_runs_through_adapt_compare_and_sample(base, bitfit, tmp_path):
    help_text = runner.invoke(app, ["adapt", "--help"]).output
    assert "bitfit" in help_text and "--bias-scope" in help_text
    run = tmp_path / "run"
    _invoke(["adapt", "--base", base, "--data", "builtin:digits/3?shots=4", "--train", "bitfit", "--steps", "3",
             "--learning-rate", "1e-2", "--num-validation-images", "1", "--sample-steps", "1", "--out", str(run)])
    assert json.loads((run / "run.json").read_text())["train"] == "bitfit"
    assert "bias_scope: unet" in (run / "config.yaml").read_text()
    biases = load_file(run / "bitfit.safetensors")
    assert biases and all(name.endswith(".bias") for name in biases)

    from genadapt import models

    loaded, source = models.load_run(run), models.load_base(base)
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, dict(source.named_parameters())[n])]
    assert changed and all(n.endswith(".bias") and n.startswith("unet.") for n in changed)  # only biases, and they moved

    grids = [tmp_path / "a.png", tmp_path / "b.png"]
    _invoke(["sample", str(run), "--prompt", "a handwritten digit three", "-n", "2", "--steps", "2", "--out", str(grids[0])])
    _invoke(["sample", base, "--prompt", "a handwritten digit three", "-n", "2", "--steps", "2", "--out", str(grids[1])])
    assert grids[0].read_bytes() != grids[1].read_bytes()  # sampled as the adapted model, not as the base

    assert "bitfit" in runner.invoke(app, ["compare", "--help"]).output
    _invoke(["compare", "--base", base, "--data", "builtin:digits/3", "--reference", "builtin:digits/3", "--shots", "2",
             "--techniques", "bitfit", "--steps", "2", "--samples", "4", "--sample-steps", "1", "--replicates", "1", "--out", str(tmp_path / "cmp")])
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results["runs"]) == {"base", "base-2shot-r0", "bitfit-2shot-r0"}
    assert json.loads((tmp_path / "cmp" / "runs" / "bitfit-2shot-r0" / "run.json").read_text())["train"] == "bitfit"


IGNORED = [
    (["--base", "pocket-stylegan2", "--use-dora"], "--use-dora applies to --train lora on diffusion bases"),
    (["--augment", "bogus"], "--augment bogus"),
    (["--base", "pocket-stylegan2", "--augment", "flip"], "--augment flip"),
    (["--train", "bogus"], "--train bogus: unknown; choose from full, freeze, lora"),
    (["--loss", "bogus"], "--loss bogus: unknown"),
    (["--loss", "perceptual"], "--loss perceptual: unknown"),
    (["--base", "pocket-stylegan2", "--loss", "relational"], "--loss relational applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--gradient-checkpointing"], "--gradient-checkpointing applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--vectors", "2"], "--vectors applies to --train embedding on diffusion bases"),
    (["--base", "pocket-stylegan2", "--use-rslora"], "--use-rslora applies to --train lora on diffusion bases"),
    (["--base", "pocket-stylegan2", "--caption", "a flag"], "--caption applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--sample-steps", "5"], "--sample-steps applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--train", "full", "--freeze-d", "2"], "--freeze-d applies to --train freeze, lora, embedding"),
    (["--freeze-d", "2"], "--freeze-d applies to --train freeze, lora, embedding on gan bases"),
    (["--r1-gamma", "5"], "--r1-gamma applies to gan bases"),
    (["--train", "full", "--rank", "8"], "--rank applies to --train lora"),
    (["--ewc-samples", "8"], "--ewc-samples applies to --loss ewc"),
    (["--train", "lora", "--preset", "attention"], "--preset applies to --train freeze"),
    (["--class-prompt", "a dog"], "--prior-prompt applies to --loss prior"),
    (["--loss", "ewc:-1"], "a loss weight must be a finite number >= 0"),
    (["--loss", "ewc:nan"], "a loss weight must be a finite number >= 0"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--steps", "many"], "--steps: Input should be a valid integer"),
    (["--seed", str(2**64)], "--seed"),
    (["--no-such-flag", "1"], "No such option"),
    # training settings a GAN run cannot honour (docs/training.md)
    (["--base", "pocket-stylegan2", "--instance-prompt", "a flag"], "--instance-prompt applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--resolution", "64"], "--resolution applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--enable-bucket"], "--enable-bucket applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--min-bucket-reso", "16"], "--min-bucket-reso applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--center-crop"], "--center-crop applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--random-crop"], "--random-crop applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--random-flip"], "--random-flip applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--caption-dropout", "0.1"], "--caption-dropout applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--shuffle-caption"], "--shuffle-caption applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--keep-tokens", "1"], "--keep-tokens applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--snr-gamma", "5"], "--snr-gamma applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--noise-offset", "0.1"], "--noise-offset applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--use-ema"], "--use-ema applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--ema-decay", "0.99"], "--ema-decay applies to diffusion bases"),
    (["--base", "pocket-stylegan2", "--optimizer", "prodigy"], "--optimizer prodigy: GAN runs train with Adam"),
    (["--base", "pocket-stylegan2", "--optimizer", "adafactor"], "--optimizer adafactor: GAN runs train with Adam"),
]


@pytest.mark.parametrize("args, message", IGNORED, ids=[" ".join(a) for a, _ in IGNORED])
def test_every_setting_the_run_would_not_read_is_refused_in_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["adapt", "--data", "builtin:digits/3", "--out", str(tmp_path / "never"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()


def test_compare_and_distill_refuse_what_they_would_not_read(tmp_path):
    cases = [
        (["compare", "--data", "builtin:digits/3", "--techniques", "cdc"], "--techniques cdc: not a compare technique for diffusion bases"),
        (["compare", "--base", "pocket-stylegan2", "--data", "builtin:digits/3", "--caption", "x"], "--caption applies to diffusion"),
        (["distill", "--kind", "progressive", "--rank", "4", "--out", str(tmp_path / "d")], "--rank applies to --kind consistency"),
        (["distill", "--kind", "architecture", "--student-width", "0.25", "--out", str(tmp_path / "d")], "--student-width applies to gan"),
        (["distill", "--teacher", "pocket-stylegan2", "--kind", "architecture", "--remove-blocks", "mid", "--out", str(tmp_path / "d")], "--remove-blocks applies to diffusion"),
        (["distill", "--teacher", "pocket-stylegan2", "--kind", "progressive", "--out", str(tmp_path / "d")], "only --kind architecture applies to GANs"),
        (["distill", "--kind", "progressive", "--caption-extension", ".caption", "--out", str(tmp_path / "d")], "--caption-extension reads the captions of --data"),
        (["compare", "--base", "pocket-stylegan2", "--data", "builtin:digits/3", "--caption-column", "prompt"], "--caption-column applies to diffusion"),
        (["compare", "--data", "builtin:digits/3", "--fit", "stretch"], "--fit"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_a_config_file_is_read_with_the_same_rules(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base: pocket-stylegan2\ndata: builtin:digits/3\nuse_dora: true\n")
    result = runner.invoke(app, ["adapt", "--config", str(config), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--use-dora applies to --train lora" in result.output
    config.write_bytes("caption: caf\xe9\n".encode("latin-1"))
    result = runner.invoke(app, ["adapt", "--config", str(config), "--data", "x", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not UTF-8" in result.output and "Traceback" not in result.output


def _flags(command: str) -> set[str]:
    import click

    ctx = click.Context(app)
    found = set()
    for parameter in app.get_command(ctx, command).params:
        found.update(parameter.opts + parameter.secondary_opts)
    return found


def test_every_field_is_a_flag_and_every_readme_flag_exists():
    from genadapt.config import AdaptConfig, CompareConfig, DistillConfig

    adapt_flags = _flags("adapt")
    models = [AdaptConfig, *(impl.settings for t in techniques.registry().values() for impl in t.families.values())]
    for model in models:
        for name, info in model.model_fields.items():
            if not info.exclude:
                assert "--" + name.replace("_", "-") in adapt_flags and "--" + name in adapt_flags, name
    for command, model in (("compare", CompareConfig), ("distill", DistillConfig)):
        flags = _flags(command)
        assert {"--" + n.replace("_", "-") for n in model.model_fields} <= flags, command

    every = set().union(*(_flags(c) for c in ("adapt", "compare", "distill", "sample", "evaluate", "demo", "pretrain")))
    every |= {"--help", "--version"} | _flags_of_group("data") | _flags_of_group("zoo")
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", README.read_text()))
    assert not named - every, f"README names flags no command has: {sorted(named - every)}"


def _flags_of_group(name: str) -> set[str]:
    import click

    group = app.get_command(click.Context(app), name)
    found = set()
    for command in group.commands.values():
        for parameter in command.params:
            found.update(parameter.opts + parameter.secondary_opts)
    return found


def test_every_command_help_works():
    import click

    ctx = click.Context(app)
    for name in app.list_commands(ctx):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Traceback" not in result.output, (name, result.output)
        command = app.get_command(ctx, name)
        for sub in getattr(command, "commands", {}):
            result = runner.invoke(app, [name, sub, "--help"])
            assert result.exit_code == 0 and "Usage" in result.output, (name, sub, result.output)


def test_sample_and_evaluate_edges_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["sample", "pocket-stylegan2", "-n", "0", "--out", str(tmp_path / "a.png")], "-n 0"),
        (["sample", "pocket-sd", "--steps", "0", "--out", str(tmp_path / "a.png")], "--steps 0"),
        (["sample", "pocket-stylegan2", "--prompt", "a flag", "-n", "1", "--out", str(tmp_path / "a.png")], "GANs are unconditional"),
        (["sample", "pocket-stylegan2", "-n", "1", "--threads", "0", "--out", str(tmp_path / "a.png")], "--threads 0"),
        (["evaluate", "--samples", "builtin:digits/3", "--reference", "builtin:digits/4", "--out", str(afile)], str(afile)),
    ]
    for args, needle in cases:
        result = runner.invoke(app, args)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output, (args, result.output)
    assert not (tmp_path / "a.png").exists()


def test_an_adapter_above_two_gigabytes_needs_an_explicit_flag(tmp_path):
    result = runner.invoke(app, ["adapt", "--data", "builtin:digits/3?shots=2", "--train", "lora", "--rank", "4096",
                                 "--lora-targets", "to_q", "--lora-targets", "to_k", "--steps", "1", "--out", str(tmp_path / "big")])
    # pocket-sd's attention at rank 4096 is about 0.1 GB: under the ceiling, so this trains; the ceiling is checked on the count
    from genadapt.recipes.train import ARTIFACT_CEILING, check_artifact_size

    class Huge:
        def trained_parameters(self, model):
            return ARTIFACT_CEILING // 4 + 1

    from types import SimpleNamespace

    from genadapt.errors import UserError

    with pytest.raises(UserError, match="allow-large-artifact"):
        check_artifact_size(Huge(), None, [], SimpleNamespace(train="lora", allow_large_artifact=False))
    check_artifact_size(Huge(), None, [], SimpleNamespace(train="lora", allow_large_artifact=True))
    assert result.exit_code == 0, result.output
