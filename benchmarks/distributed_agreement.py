"""How closely N processes at batch B reproduce one process at batch N·B (the LoRA pair of tests/test_distributed.py).

    .venv/bin/python benchmarks/distributed_agreement.py [--seeds 0-7] [--epsilons 1e-8,1e-4] [--steps 4]
    .venv/bin/python benchmarks/distributed_agreement.py --smoke     # seed 0, ε 1e-4, 2 steps; prints only

For each seed and Adam ε it runs, as a user types them, on the test's tiny random pipeline (tests/diffusion_fixtures):

    genadapt adapt --train lora --rank 2 --learning-rate 1e-2 --batch-size 2 --num-processes 2   (torchrun, gloo)
    genadapt adapt --train lora --rank 2 --learning-rate 1e-2 --batch-size 4                      (one process)

on builtin:digits/3 (6 shots), and compares the two pytorch_lora_weights.safetensors: the largest absolute
difference over every tensor, and the smallest max|lora_B| (how far the adapters moved from their zero init, so a
small difference is not a run that did nothing). Both sides see the same global batch; only float summation order
differs, so the difference measures how much the optimiser amplifies that order. Per ε: the worst seed, and how many
seeds exceed the test's tolerance (atol 2e-4, rtol 1e-3). JSON to benchmarks/results/distributed_agreement.json.
One thread per process; 2 processes on a 2-core machine; about 20 s per seed and ε.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from diffusion_fixtures import build_tiny_pipeline  # noqa: E402

ATOL, RTOL = 2e-4, 1e-3  # tests/test_distributed.py's tolerance
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def adapt(base: Path, out: Path, seed: int, epsilon: str, steps: int, batch: int, processes: int) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "genadapt", "adapt", "--base", str(base), "--data", "builtin:digits/3?shots=6",
               "--train", "lora", "--rank", "2", "--learning-rate", "1e-2", "--seed", str(seed), "--adam-epsilon", epsilon,
               "--steps", str(steps), "--batch-size", str(batch), "--checkpointing-steps", str(steps),
               "--num-validation-images", "1", "--sample-steps", "1", "--out", str(out)]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}, ε {epsilon}, {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return load_file(out / "pytorch_lora_weights.safetensors")


def beyond_tolerance(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() > ATOL + RTOL * b.abs()).any())


def measure(base: Path, scratch: Path, seed: int, epsilon: str, steps: int) -> dict:
    two = adapt(base, scratch / f"two-{seed}-{epsilon}", seed, epsilon, steps, batch=2, processes=2)
    one = adapt(base, scratch / f"one-{seed}-{epsilon}", seed, epsilon, steps, batch=4, processes=1)
    if two.keys() != one.keys():
        raise SystemExit(f"seed {seed}: the two runs saved different tensors")
    return {
        "seed": seed, "epsilon": float(epsilon),
        "max_abs_difference": max(float((two[k] - one[k]).abs().max()) for k in two),
        "beyond_test_tolerance": any(beyond_tolerance(two[k], one[k]) for k in two),
        "min_lora_B_movement": min(float(one[k].abs().max()) for k in one if "lora_B" in k),
    }


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-7", help="a range 0-7 or a list 0,3,5")
    parser.add_argument("--epsilons", default="1e-8,1e-4", help="Adam ε values, comma-separated")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="seed 0, ε 1e-4, 2 steps; prints only")
    args = parser.parse_args()
    seeds, epsilons, steps = ([0], ["1e-4"], 2) if args.smoke else (parse_seeds(args.seeds), args.epsilons.split(","), args.steps)

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = build_tiny_pipeline(scratch / "tiny-sd")
        for epsilon in epsilons:
            for seed in seeds:
                row = measure(base, scratch, seed, epsilon, steps)
                rows.append(row)
                print(f"ε {epsilon:>6}  seed {seed}: max |2x2 - 1x4| {row['max_abs_difference']:.2e}"
                      f"{'  (beyond the test tolerance)' if row['beyond_test_tolerance'] else ''}, min max|lora_B| {row['min_lora_B_movement']:.2e}", flush=True)
    summary = []
    print(f"\n| Adam ε | seeds | max difference (worst seed) | seeds beyond atol {ATOL:g}, rtol {RTOL:g} | min max\\|lora_B\\| |")
    print("|---|---|---|---|---|")
    for epsilon in epsilons:
        mine = [r for r in rows if r["epsilon"] == float(epsilon)]
        entry = {"epsilon": float(epsilon), "seeds": len(mine), "max_abs_difference": max(r["max_abs_difference"] for r in mine),
                 "seeds_beyond_tolerance": sum(r["beyond_test_tolerance"] for r in mine),
                 "min_lora_B_movement": min(r["min_lora_B_movement"] for r in mine)}
        summary.append(entry)
        print(f"| {epsilon} | {entry['seeds']} | {entry['max_abs_difference']:.2e} | {entry['seeds_beyond_tolerance']} | {entry['min_lora_B_movement']:.2e} |")
    seconds = time.perf_counter() - started
    print(f"\n{seconds:.0f} s, {date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if not args.smoke:
        out = ROOT / "benchmarks" / "results" / "distributed_agreement.json"
        out.write_text(json.dumps({"date": str(date.today()), "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                   "steps": steps, "command": " ".join(sys.argv), "seconds": seconds, "summary": summary, "runs": rows}, indent=2) + "\n")
        print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
