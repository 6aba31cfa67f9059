"""diffusers' own example command lines (README of examples/dreambooth and examples/textual_inversion), with only the
program name replaced by `genadapt adapt --train lora|embedding` and the sizes shrunk for pocket-sd (32 px, a few
steps): every flag is honoured, with `--report_to tensorboard` among them; the flags genadapt cannot honour are
refused with a message saying what to do instead."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner
from PIL import Image

from genadapt.cli import app
from genadapt.zoo import weights_dir

pytest.importorskip("tensorboard")
runner = CliRunner()

DREAMBOOTH_LORA = """
  --pretrained_model_name_or_path={model}
  --instance_data_dir={data}
  --output_dir={out}
  --instance_prompt="a photo of sks flag"
  --resolution=32
  --train_batch_size=1
  --gradient_accumulation_steps=1
  --checkpointing_steps=2
  --learning_rate=1e-4
  --report_to="tensorboard"
  --lr_scheduler="constant"
  --lr_warmup_steps=0
  --max_train_steps=8
  --validation_prompt="A photo of sks flag in a bucket"
  --validation_epochs=1
  --seed="0"
"""

TEXTUAL_INVERSION = """
  --pretrained_model_name_or_path={model}
  --train_data_dir={data}
  --learnable_property="object"
  --placeholder_token="<cat-toy>"
  --initializer_token="sign"
  --resolution=32
  --train_batch_size=1
  --gradient_accumulation_steps=4
  --max_train_steps=2
  --learning_rate=5.0e-04
  --scale_lr
  --lr_scheduler="constant"
  --lr_warmup_steps=0
  --report_to="tensorboard"
  --output_dir={out}
"""


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (48, 48), (40 + 50 * i, 90, 160)).save(folder / f"{i}.png")
    return folder


def _run(train: str, line: str, shots, out):
    args = ["adapt", "--train", train] + shlex.split(line.format(model=weights_dir("pocket-sd"), data=shots, out=out))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def _tags(out) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "logs"))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_the_dreambooth_lora_example_trains(shots, tmp_path):
    out = tmp_path / "lora"
    summary = _run("lora", DREAMBOOTH_LORA, shots, out)
    assert summary["steps"] == 8 and (out / "pytorch_lora_weights.safetensors").is_file()
    assert {"loss/denoise", "lr"} <= _tags(out)
    assert json.loads((out / "prompts.json").read_text())[0] == "a photo of sks flag"  # the instance prompt, for every image
    assert (out / "samples" / "step-000004.png").is_file()  # --validation_epochs 1: a pass over 4 shots at batch 1 is 4 steps


def test_the_textual_inversion_example_trains(shots, tmp_path):
    out = tmp_path / "ti"
    summary = _run("embedding", TEXTUAL_INVERSION, shots, out)
    assert summary["steps"] == 2 and "loss/denoise" in _tags(out)
    config = (out / "config.yaml").read_text()
    assert "learnable_property: object" in config and "scale_lr: true" in config
    assert json.loads((out / "prompts.json").read_text())[0].startswith("a photo of a")  # textual inversion's templates


@pytest.mark.parametrize("flag, message", [
    ("--push_to_hub", "genadapt never uploads"),
    ("--resume_from_checkpoint=checkpoint-500", "pass latest or leave it out"),
    ("--report_to=wandb", "--report-to"),
    ("--prior_loss_weight=1.0", "goes with --with-prior-preservation"),
])
def test_what_genadapt_cannot_honour_is_refused_with_what_to_do(flag, message, shots, tmp_path):
    args = ["adapt", "--train", "lora"] + shlex.split(DREAMBOOTH_LORA.format(model=weights_dir("pocket-sd"), data=shots, out=tmp_path / "x")) + [flag]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
