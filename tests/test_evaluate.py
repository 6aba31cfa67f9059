"""genadapt evaluate: copies are caught, a split of one set looks like itself."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from genadapt.cli import app
from genadapt.data import load_dataset
from genadapt.eval.evaluate import evaluate


def _fixed_extractor():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten())


def test_copies_of_the_shots_are_flagged_with_low_diversity(tmp_path):
    shots = load_dataset("builtin:digits/3?shots=5&seed=0", resolution=32)
    copies = shots.subset([i % 5 for i in range(50)], name="copies")
    reference = load_dataset("builtin:digits/3", resolution=32)
    result = evaluate(copies, reference, shots, features=_fixed_extractor(), out=tmp_path)
    assert result["memorisation"]["copy_rate"] == 1.0
    assert all(c["shot"] == shots.records[c["sample_index"] % 5].id for c in result["memorisation"]["copies"])
    assert result["intra_cluster_diversity"]["value"] < 1e-6
    assert "LPIPS" not in result["intra_cluster_diversity"]["distance_name"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["kid"]["ci_low"] <= saved["kid"]["value"] <= saved["kid"]["ci_high"]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "copies.png").is_file()


def test_fresh_samples_are_not_copies_and_a_split_matches_itself(tmp_path):
    pool = load_dataset("builtin:digits/3", resolution=32)
    order = np.random.default_rng(0).permutation(len(pool))
    first, second = pool.subset(order[: len(pool) // 2]), pool.subset(order[len(pool) // 2 :])
    shots = load_dataset("builtin:digits/3?shots=5&seed=0", resolution=32)
    fresh = first.subset([i for i, r in enumerate(first.records) if r.id not in {s.id for s in shots.records}])
    result = evaluate(fresh, second, shots, features=_fixed_extractor())
    assert result["memorisation"]["copy_rate"] < 0.1
    assert result["kid"]["ci_low"] <= 0.0 <= result["kid"]["ci_high"]
    other = load_dataset("builtin:digits/7", resolution=32)
    shifted = evaluate(other, second, features=_fixed_extractor())
    assert shifted["kid"]["ci_low"] > 0 and shifted["fid"]["value"] > result["fid"]["value"]


def test_cli_evaluate_on_folders(tmp_path):
    from PIL import Image

    shots = load_dataset("builtin:digits/5?shots=4", resolution=32)
    for folder, count in (("train", 4), ("samples", 20)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.fromarray(shots.pixels[i % 4]).save(tmp_path / folder / f"{i:03d}.png")
    encoder = tmp_path / "encoder"
    from genadapt.zoo.eval_encoder import EvalEncoderConfig, pretrain

    pretrain(encoder, EvalEncoderConfig(steps=2, batch=8, data=("builtin:digits",)))
    result = CliRunner().invoke(
        app,
        ["evaluate", "--samples", str(tmp_path / "samples"), "--reference", "builtin:digits/5", "--train", str(tmp_path / "train"),
         "--features", str(encoder), "--out", str(tmp_path / "eval")],
    )
    assert result.exit_code == 0, result.output
    assert "copy rate" in result.output and json.loads((tmp_path / "eval" / "metrics.json").read_text())["memorisation"]["copy_rate"] == 1.0
    missing = CliRunner().invoke(app, ["evaluate", "--samples", str(tmp_path / "samples"), "--reference", "builtin:digits/5", "--inception-weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "e2")])
    assert missing.exit_code == 2 and "pt_inception" in missing.output


def test_the_reference_diversity_is_the_sample_diversity_of_the_real_images():
    # The target's own diversity around the shots: scoring the reference as if it were the samples gives the same number.
    reference = load_dataset("builtin:digits/3", resolution=32)
    shots = load_dataset("builtin:digits/3?shots=5&seed=0", resolution=32)
    copies = shots.subset([i % 5 for i in range(40)], name="copies")
    as_samples = evaluate(reference, reference, shots, features=_fixed_extractor())
    collapsed = evaluate(copies, reference, shots, features=_fixed_extractor())
    assert as_samples["reference_diversity"]["value"] == as_samples["intra_cluster_diversity"]["value"] > 0.01
    assert collapsed["reference_diversity"] == as_samples["reference_diversity"]  # a property of the data, not the samples
