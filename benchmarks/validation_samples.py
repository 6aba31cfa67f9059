"""How many samples a validation check needs (issue #18): the step `--validation-samples N` keeps, and what it costs.

    .venv/bin/python benchmarks/validation_samples.py [--samples 16,64,256] [--replicates 3] [--jobs 2]   # 9 runs, ~25 min
    .venv/bin/python benchmarks/validation_samples.py --smoke                                              # 4 steps, prints only

compare validates each run on 16 samples per check (`--validation-samples`, default 16) and keeps the best check.
16 is cheap; is the step it keeps a worse one than more samples would keep? The same TGAN run (pocket-stylegan2,
`--train full`, 10 shots of flags, seeds 0-2 as replicates, 800 steps, checked every 50, never stopped early) is
trained once per N. A check samples from its own fixed seed, so the N runs of one seed train the same weights
step for step (the script checks: their last training losses are identical) and differ only in what the checks see:

- the kept step, and the KID of the kept model against the held-out reference (64 samples, as compare scores runs);
- regret: the largest N's validation KID at the step a smaller N kept, minus the best of its checks under the copy
  ceiling (the largest N's curve is the yardstick);
- how much each curve moves between consecutive checks (median absolute change: noise and trend together);
- the cost: training seconds per run (the checks are inside them).

Every run is the command a user types, in a child process on one thread. Runs in runs/validation-samples (rerun to
resume); numbers to benchmarks/results/validation_samples.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOTS, EVAL_SAMPLES, DOMAIN = 10, 64, "flags"


def command(samples: int, seed: int, steps: int, every: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "genadapt", "adapt", "--base", "pocket-stylegan2", "--data", f"builtin:openmoji/{DOMAIN}",
            "--shots", str(SHOTS), "--seed", str(seed), "--train", "full", "--steps", str(steps), "--validate-every", str(every),
            "--validation-samples", str(samples), "--patience", "0", "--threads", "1", "--out", str(out)]


def folder(runs: Path, samples: int, seed: int) -> Path:
    return runs / f"n{samples}-s{seed}"


def curve(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines() if line.strip()]


def last_loss(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return {k: v for k, v in rows[-1].items() if "loss" in k}


def evaluate(runs: Path, sizes: list[int], replicates: int) -> dict:
    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate as score
    from genadapt.models import run_samples

    reference = load_dataset(f"builtin:openmoji/{DOMAIN}/reference", resolution=32)
    truth_size = max(sizes)
    rows = {n: [] for n in sizes}
    for seed in range(replicates):
        shots = load_dataset(f"builtin:openmoji/{DOMAIN}", resolution=32, shots=SHOTS, seed=seed)
        truth_curve = curve(folder(runs, truth_size, seed))
        truth = {c["step"]: c["kid"] for c in truth_curve}
        truth_best = min(c["kid"] for c in truth_curve if c["eligible"])
        same_training = len({json.dumps(last_loss(folder(runs, n, seed)), sort_keys=True) for n in sizes}) == 1
        for n in sizes:
            run = folder(runs, n, seed)
            checks = curve(run)
            summary = json.loads((run / "summary.json").read_text())
            kept = summary["validation"]["best_step"]
            evaluation = score(run_samples(run, EVAL_SAMPLES, seed), reference, shots, out=run / "eval")
            kids = [c["kid"] for c in checks]
            rows[n].append({
                "seed": seed, "kept_step": kept, "reference_kid": evaluation["kid"]["value"],
                "copy_rate": evaluation["memorisation"]["copy_rate"],
                "regret": None if kept is None or kept not in truth else truth[kept] - truth_best,
                "median_check_change": statistics.median(abs(a - b) for a, b in zip(kids, kids[1:])) if len(kids) > 1 else None,
                "train_seconds": summary["train_seconds"], "same_training_as_other_sizes": same_training,
            })
    return {str(n): rows[n] for n in sizes}


def table(result: dict) -> str:
    lines = ["| --validation-samples | kept step per replicate | reference KID at the kept step (mean [range]) | regret vs the largest N's curve (mean) | "
             "median change between checks | training seconds per run | same weights as the other N |", "|---|---|---|---|---|---|---|"]
    for n, rows in result.items():
        kids = [r["reference_kid"] for r in rows]
        regrets = [r["regret"] for r in rows if r["regret"] is not None]
        changes = [r["median_check_change"] for r in rows if r["median_check_change"] is not None]
        lines.append(f"| {n} | {', '.join(str(r['kept_step']) for r in rows)} | {statistics.mean(kids):.3f} [{min(kids):.3f}, {max(kids):.3f}] | "
                     f"{statistics.mean(regrets):.3f} | {statistics.mean(changes):.3f} | {statistics.mean(r['train_seconds'] for r in rows):.0f} | "
                     f"{'yes' if all(r['same_training_as_other_sizes'] for r in rows) else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="16,64,256")
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="4 steps, 1 replicate, in a temporary folder; prints only")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.samples.split(","))
    runs, steps, every, replicates = ROOT / "runs" / "validation-samples", args.steps, args.every, args.replicates
    if args.smoke:
        import tempfile

        runs, steps, every, replicates = Path(tempfile.mkdtemp()), 4, 2, 1

    from genadapt.runs import use_cpu

    use_cpu()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.time()
    commands = [command(n, seed, steps, every, folder(runs, n, seed)) for seed in range(replicates) for n in sizes
                if not (folder(runs, n, seed) / "summary.json").is_file()]
    print(f"{len(commands)} runs to train", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adaptation_quality import _run_all

    _run_all(commands, args.jobs)
    print(f"trained ({(time.time() - started) / 60:.1f} min)", flush=True)
    result = evaluate(runs, sizes, replicates)
    print(table(result), flush=True)
    if args.smoke:
        return
    import torch

    out = ROOT / "benchmarks" / "results" / "validation_samples.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": torch.backends.cpu.get_cpu_capability(), "steps": steps,
                               "every": every, "replicates": replicates, "results": result, "table": table(result),
                               "minutes": round((time.time() - started) / 60, 1),
                               "command": f"benchmarks/validation_samples.py --samples {args.samples} --replicates {replicates} --jobs {args.jobs}"}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
