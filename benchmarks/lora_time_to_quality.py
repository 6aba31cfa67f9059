"""How soon a 10-shot LoRA on pocket-sd gets its quality: KID against CPU-seconds of training.

pocket-sd, 10 shots of builtin:openmoji/flags (seed 0), LoRA rank 4 at compare's probed rate (3e-4, the demo's
choice; --learning-rate to change), batch 4, one torch thread. One run per step count (--steps, default 25 50 100
200 400), each evaluated on 128 samples (25 DDIM steps) against flags/reference in the eval encoder's space,
beside the unadapted base on the same seeds. CPU-seconds are the run's own training loop (summary.json
train_seconds, one thread, so wall = CPU), without start-up, sampling or the final save.

    .venv/bin/python benchmarks/lora_time_to_quality.py [--out runs/lora-time]

Reports the KID gain (base − run) at each point and the first point reaching 90% of the gain of the longest run.
Prints a markdown table and saves benchmarks/results/lora_time_to_quality.json. Runs resume.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from genadapt.api import adapt
from genadapt.config import AdaptConfig
from genadapt.data import load_dataset
from genadapt.eval.evaluate import evaluate
from genadapt.models import base_samples, run_samples
from genadapt.runs import use_cpu

RESULTS = Path(__file__).parent / "results" / "lora_time_to_quality.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/lora-time"))
    args = parser.parse_args()
    use_cpu(1)
    reference = load_dataset("builtin:openmoji/flags/reference", resolution=32)
    shots = load_dataset("builtin:openmoji/flags", resolution=32, shots=10, seed=0)
    base_path = args.out / "base.json"
    if not base_path.is_file():
        args.out.mkdir(parents=True, exist_ok=True)
        base = evaluate(base_samples("pocket-sd", args.samples, shots.captions, 0, 25), reference, shots)
        base_path.write_text(json.dumps(base, default=float))
    base_kid = json.loads(base_path.read_text())["kid"]["value"]
    rows = []
    for steps in sorted(args.steps):
        run = args.out / f"lora-{steps}"
        if not (run / "eval.json").is_file():
            adapt(AdaptConfig(base="pocket-sd", data="builtin:openmoji/flags", shots=10, seed=0, steps=steps, batch_size=4,
                              learning_rate=args.learning_rate, train="lora", checkpointing_steps=steps, num_validation_images=1,
                              sample_steps=1, out=run))
            result = evaluate(run_samples(run, args.samples, 0, steps=25), reference, shots)
            (run / "eval.json").write_text(json.dumps(result, default=float))
        result = json.loads((run / "eval.json").read_text())
        seconds = json.loads((run / "summary.json").read_text())["train_seconds"]
        rows.append({"steps": steps, "cpu_seconds": round(seconds, 1), "kid": result["kid"], "copy_rate": result["memorisation"]["copy_rate"]})
    final_gain = base_kid - rows[-1]["kid"]["value"]
    for row in rows:
        row["share_of_final_gain"] = (base_kid - row["kid"]["value"]) / final_gain if final_gain > 0 else None
    reached = next((row for row in rows if row["share_of_final_gain"] is not None and row["share_of_final_gain"] >= 0.9), None)
    print(f"base KID {base_kid:.3f}; final gain {final_gain:.3f} at {rows[-1]['steps']} steps\n")
    print("| steps | CPU-seconds of training | KID [95% CI] | share of the final gain | copy rate |\n|---|---|---|---|---|")
    for row in rows:
        kid, share = row["kid"], row["share_of_final_gain"]
        print(f"| {row['steps']} | {row['cpu_seconds']} | {kid['value']:.3f} [{kid['ci_low']:.3f}, {kid['ci_high']:.3f}] | "
              f"{'—' if share is None else f'{share:.0%}'} | {row['copy_rate']:.0%} |")
    if reached:
        print(f"\n90% of the final gain at {reached['steps']} steps, {reached['cpu_seconds']} CPU-seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": str(date.today()), "threads": 1, "learning_rate": args.learning_rate, "samples": args.samples,
                                   "base_kid": base_kid, "rows": rows,
                                   "ninety_percent_at": reached and {"steps": reached["steps"], "cpu_seconds": reached["cpu_seconds"]}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
