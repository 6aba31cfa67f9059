"""Which LoRA learning rate `genadapt compare` should use: the demo's setting, one LR per run.

pocket-sd, 10 shots of builtin:openmoji/flags (seed 0), rank 4, 400 steps, batch 4; 64 samples (10
DDIM steps) evaluated against flags/reference in the eval encoder's space, the 10 shots as training set.

    .venv/bin/python benchmarks/lora_learning_rate.py [--out runs/lora-lr] [LR ...]

Prints a markdown table and saves benchmarks/results/lora_learning_rate.json. Runs resume.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import torch

from genadapt.api import adapt
from genadapt.config import AdaptConfig
from genadapt.data import load_dataset
from genadapt.eval.evaluate import evaluate, samples_from_run

RESULTS = Path(__file__).parent / "results" / "lora_learning_rate.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rates", nargs="*", type=float, default=[1e-3, 3e-4, 1e-4, 3e-5])
    parser.add_argument("--out", type=Path, default=Path("runs/lora-lr"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = load_dataset("builtin:openmoji/flags/reference", resolution=32)
    shots = load_dataset("builtin:openmoji/flags", resolution=32, shots=10, seed=0)
    rows = []
    for rate in args.rates:
        run = args.out / f"lora-{rate:g}"
        if not (run / "eval.json").is_file():
            adapt(AdaptConfig(
                base="pocket-sd", data="builtin:openmoji/flags", shots=10, seed=0, steps=400, batch_size=4, learning_rate=rate,
                train="lora", checkpointing_steps=100, num_validation_images=4, sample_steps=10, out=run,
            ))
            result = evaluate(samples_from_run(run, 64, 0, steps=10), reference, shots, out=run / "eval")
            (run / "eval.json").write_text(json.dumps(result, default=float))
        result = json.loads((run / "eval.json").read_text())
        rows.append({
            "learning_rate": rate,
            "kid": result["kid"],
            "fid": result["fid"]["value"],
            "precision": result["precision_recall"]["precision"],
            "recall": result["precision_recall"]["recall"],
            "intra_cluster_diversity": result["intra_cluster_diversity"]["value"],
            "copy_rate": result["memorisation"]["copy_rate"],
        })
    print("| LoRA learning rate | KID [95% CI] | FID | precision | recall | intra-cluster diversity | copy rate |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        kid = row["kid"]
        print(
            f"| {row['learning_rate']:g} | {kid['value']:.3f} [{kid['ci_low']:.3f}, {kid['ci_high']:.3f}] | {row['fid']:.1f} "
            f"| {row['precision']:.2f} | {row['recall']:.2f} | {row['intra_cluster_diversity']:.3f} | {row['copy_rate']:.0%} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": str(date.today()), "threads": 1, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
