"""CDC's patch critic at 32 px (issue #18): which discriminator block the patch-level realism judges.

    .venv/bin/python benchmarks/cdc_patch.py [--domain flags|dark-skin] [--blocks 1,2,3] [--replicates 3] [--steps 800]   # ~4 min a run
    .venv/bin/python benchmarks/cdc_patch.py --smoke                                           # 2 steps, prints only

Ojha et al. 2021 fix the patch size, not the layer: the official `--highp 1` critic at 256 px reads D's
`convs.3.conv2` and sees 66 px, a quarter of the image. genadapt's default at 32 px is block 1 (12 px, the nearest
share); block 3, the official index, sees the whole 32 px image through a 4x4 logit map (almost a second full-image
critic). Every arm is the command a user types, in a child process on one thread, interleaved by replicate:

    genadapt adapt --base pocket-stylegan2 --data builtin:openmoji/flags --shots 10 --seed R --train full
        --loss cdc --cdc-patch-block B --learning-rate 2e-3 --steps 800 --validate-every 100 --patience 0
        --validation-samples 16 --threads 1

(2e-3 is the registered rate; the quality benchmark's CDC control ran at it with block 1.) Each run is kept at its
best validated step, then 64 samples from seed R are scored against the domain's reference images in the eval
encoder's space: KID, intra-cluster diversity and copy rate as `compare` reports them, and the paired KID
difference to block 1 on the same seeds, pooled over replicates [95% CI]. Runs are in runs/cdc-patch[-DOMAIN] (rerun
to resume); numbers to benchmarks/results/cdc_patch[_DOMAIN].json, curves and replicate 0's grids to docs/quality/
(flags keeps its first names; other domains add theirs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 64


def command(block: int, seed: int, steps: int, out: Path, data: str) -> list[str]:
    every = max(1, min(100, steps // 2))
    return [sys.executable, "-m", "genadapt", "adapt", "--base", "pocket-stylegan2", "--data", data, "--shots", "10",
            "--seed", str(seed), "--train", "full", "--loss", "cdc", "--cdc-patch-block", str(block), "--learning-rate", "2e-3",
            "--steps", str(steps), "--validate-every", str(every), "--patience", "0", "--validation-samples", "16",
            "--threads", "1", "--out", str(out)]


def evaluate_run(run: Path, seed: int, reference_features, data: str, reference: str) -> dict:
    """64 samples of the kept step: compare's evaluation and the paired-KID scores (full set, shared halves)."""
    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate
    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.eval.paired import PairedKID
    from genadapt.models import run_samples

    samples = run_samples(run, SAMPLES, seed)
    shots = load_dataset(data, resolution=32, shots=10, seed=seed)
    evaluation = evaluate(samples, load_dataset(reference, resolution=32), shots, out=run / "eval")
    value, halves = PairedKID(reference_features, SAMPLES, seed=seed).scores(cached_features(get_extractor("pocket"), samples, progress=False).float())
    summary = json.loads((run / "summary.json").read_text())
    curve = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines() if line.strip()]
    return {"kid": evaluation["kid"]["value"], "diversity": evaluation["intra_cluster_diversity"]["value"],
            "copy_rate": evaluation["memorisation"]["copy_rate"], "best_step": summary["validation"]["best_step"],
            "train_seconds": summary["train_seconds"], "paired": [value, halves.tolist()], "curve": curve}


def table(results: dict, blocks: list[int]) -> str:
    import numpy as np

    from genadapt.eval.paired import pooled_difference
    from genadapt.techniques.cdc import patch_receptive_field

    lines = ["| patch block | patch (share of 32 px) | logit map | KID mean [min, max] | Δ KID vs block 1 [95% CI] | diversity | copy rate | best steps |",
             "|---|---|---|---|---|---|---|---|"]
    baseline = [(r["paired"][0], np.array(r["paired"][1])) for r in results["1"]]
    for block in blocks:
        rows = results[str(block)]
        kids = [r["kid"] for r in rows]
        side = [(r["paired"][0], np.array(r["paired"][1])) for r in rows]
        if block == 1 or len(side) != len(baseline):
            delta = "–"
        else:
            d = pooled_difference(side, baseline)
            delta = f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        field = min(patch_receptive_field(block), 32)
        lines.append(f"| {block}{' (default)' if block == 1 else ''} | {field} px ({field / 32:.2f}) | {32 >> block}x{32 >> block} | "
                     f"{np.mean(kids):.3f} [{min(kids):.3f}, {max(kids):.3f}] | {delta} | {np.mean([r['diversity'] for r in rows]):.3f} | "
                     f"{np.mean([r['copy_rate'] for r in rows]):.0%} | {', '.join(str(r['best_step']) for r in rows)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="flags", choices=["flags", "dark-skin"], help="the OpenMoji target domain")
    parser.add_argument("--blocks", default="1,2,3", help="patch blocks to compare; 1 (the default) is the baseline")
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 replicate, blocks 1 and 3, in a temporary folder; prints only")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    if 1 not in blocks:
        raise SystemExit("--blocks: include 1, the default, which the others are paired against")
    data, reference_spec = f"builtin:openmoji/{args.domain}", f"builtin:openmoji/{args.domain}/reference"
    suffix = "" if args.domain == "flags" else f"-{args.domain}"
    runs, steps, replicates = ROOT / "runs" / f"cdc-patch{suffix}", args.steps, args.replicates
    if args.smoke:
        import tempfile

        runs, steps, replicates, blocks = Path(tempfile.mkdtemp()), 2, 1, [1, 3]

    from genadapt.data import load_dataset
    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.runs import use_cpu

    use_cpu()
    reference = cached_features(get_extractor("pocket"), load_dataset(reference_spec, resolution=32), progress=False).float()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = {str(b): [] for b in blocks}
    started = time.time()
    for seed in range(replicates):
        for block in blocks:
            out = runs / f"b{block}-s{seed}"
            if not (out / "summary.json").is_file():
                subprocess.run(command(block, seed, steps, out, data), check=True, env=env, stdout=subprocess.DEVNULL)
            results[str(block)].append(evaluate_run(out, seed, reference, data, reference_spec))
            row = results[str(block)][-1]
            print(f"block {block} seed {seed}: KID {row['kid']:.3f}, diversity {row['diversity']:.3f}, copies {row['copy_rate']:.0%}, "
                  f"best step {row['best_step']} ({(time.time() - started) / 60:.1f} min)", flush=True)
    markdown = table(results, blocks)
    print(markdown)
    if args.smoke:
        return
    import shutil

    from genadapt.eval.report import _svg_lines

    docs = ROOT / "docs" / "quality"
    series = {}
    for block in blocks:
        curves = [r["curve"] for r in results[str(block)]]
        series[f"block {block}"] = [(c["step"], sum(curve[i]["kid"] for curve in curves) / len(curves)) for i, c in enumerate(curves[0])]
        shutil.copyfile(runs / f"b{block}-s0" / "eval" / "samples.png", docs / f"cdc-patch{suffix}-b{block}.png")
    (docs / f"cdc-patch{suffix}-curves.svg").write_text(_svg_lines(series, width=520, height=240, x_label="step", y_label="validation KID (mean of replicates)"))
    out = ROOT / "benchmarks" / "results" / f"cdc_patch{suffix.replace('-', '_')}.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "domain": args.domain, "steps": steps, "replicates": replicates, "results": results,
                               "table": markdown, "minutes": round((time.time() - started) / 60, 1)}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
