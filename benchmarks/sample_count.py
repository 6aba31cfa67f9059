"""What the sample count buys: the paired difference of two techniques of a finished compare, and the smallest
difference it could detect, at 64, 128 and 256 samples per run, with the sampling time each costs.

    .venv/bin/python benchmarks/sample_count.py runs/demo/full/pocket-sd [--techniques lora,embedding] [--counts 64,128,256]

For every replicate r of the two techniques (default: the compare's two best qualified techniques) the runs are
sampled again, N = max(counts) samples from seed + r with the compare's sampler steps, and the first n of them are
scored for each count, on shared reference half-samples (`genadapt.eval.paired`), exactly as compare scores
them. Prints a markdown table and writes benchmarks/results/sample_count.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from safetensors.torch import load_file

    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.eval.paired import PairedKID, pooled_difference
    from genadapt.models import run_samples
    from genadapt.recipes.compare import run_name
    from genadapt.runs import use_cpu

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--techniques", default=None)
    parser.add_argument("--counts", default="64,128,256")
    args = parser.parse_args()
    use_cpu()
    results = json.loads((args.folder / "results.json").read_text())
    settings, advice = results["settings"], results["recommendation"][-1]
    shots = advice["shots"]
    if args.techniques:
        pair = args.techniques.split(",")
    else:
        pair = sorted((t for t, row in advice["techniques"].items() if not row["disqualified"]), key=lambda t: advice["techniques"][t]["kid"])[:2]
    counts = sorted(int(c) for c in args.counts.split(","))
    reference = load_file(args.folder / "reference_features.safetensors")["features"]
    extractor = get_extractor("pocket")
    replicates = results["plan"]["replicates"]
    features, seconds = {}, []
    for technique in pair:
        for r in range(replicates):
            started = time.time()
            samples = run_samples(args.folder / "runs" / run_name(technique, shots, r), max(counts), settings["seed"] + r, steps=settings.get("sample_steps"))
            seconds.append((time.time() - started) / max(counts))
            features[technique, r] = cached_features(extractor, samples).float()
    rows = []
    for n in counts:
        scored = {t: [] for t in pair}
        for r in range(replicates):
            scorer = PairedKID(reference, n, seed=settings["seed"] + r)
            for t in pair:
                scored[t].append(scorer.scores(features[t, r][:n]))
        result = pooled_difference(scored[pair[0]], scored[pair[1]])
        rows.append({"samples": n, **{k: result[k] for k in ("difference", "ci_low", "ci_high", "detectable")},
                     "separated": result["ci_high"] < 0 or result["ci_low"] > 0,
                     "sampling_seconds_per_run": round(n * sum(seconds) / len(seconds), 1)})
    print(f"{pair[0]} − {pair[1]}, {shots} shots, {replicates} replicates, {args.folder}\n")
    print("| samples per run | KID difference [95% CI] | smallest detectable | separated | sampling seconds per run |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['samples']} | {row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | {row['detectable']:.4f} | "
              f"{'yes' if row['separated'] else 'no'} | {row['sampling_seconds_per_run']} |")
    out = ROOT / "benchmarks" / "results" / "sample_count.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "folder": str(args.folder), "pair": pair, "shots": shots,
                               "replicates": replicates, "rows": rows}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
