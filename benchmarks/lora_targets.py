"""LoRA on pocket-sd (issue #18): which modules the adapter wraps, and its rank, at 10 shots of both target domains.

    .venv/bin/python benchmarks/lora_targets.py [--domains flags,dark-skin] [--rates 1e-4,3e-4,1e-3] [--jobs 2]  # 72 runs: ~42 min
    .venv/bin/python benchmarks/lora_targets.py --smoke                                              # 2 steps, prints only

genadapt's default is diffusers' set (`to_q to_k to_v to_out.0`, rank 4). kohya's sd-scripts add every linear and 1x1
conv of the transformer blocks (`proj_in`, `proj_out`, the feed-forward), and with `--conv_dim` the 3x3 convs of the
ResNet blocks and the down/upsamplers (LoCon). The arms:

    attention r4   (the default)      --lora-targets to_q to_k to_v to_out.0
    attention r16                      the same, --rank 16
    transformer r4 (kohya's default)   + proj_in proj_out ff.net.0.proj ff.net.2
    locon r4       (kohya + conv_dim)  + conv1 conv2 conv_shortcut conv (ResNet blocks, down/upsamplers; sd-scripts'
                                       --conv_dim also wraps the ResNet blocks' time_emb_proj, left out here)

Every arm is the command a user types, in a child process on one thread:

    genadapt adapt --base pocket-sd --data builtin:openmoji/DOMAIN --shots 10 --seed R --train lora --rank K
        --lora-targets ... --learning-rate L --steps 400 --batch-size 4 --validate-every 100 --validation-samples 16
        --patience 0 --sample-steps 10 --threads 1

at each rate of --rates (compare's probe chose 3e-4 for the default arm on flags; a larger adapter may want less),
seeds 0-2 (other shot draws, initialisation and noise). Each run is kept at its best validated step; 64 samples
(25 sampler steps, the shots' captions, seed R) are scored against the domain's held-out reference as compare scores
them (KID, intra-cluster diversity, copy rate) and in the style-aware space, with paired differences [95% CI, pooled
over replicates] to the unadapted base and to the default arm at the same rate. Runs are in runs/lora-targets
(rerun to resume: only the scoring runs again); numbers to benchmarks/results/lora_targets.json (with each row's
paired scores, so any two rows can be differenced), three of replicate 0's grids (GRIDS) to docs/quality/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, SHOTS, SAMPLE_STEPS = 64, 10, 25
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER = [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
ARMS = {
    "attention-r4": (4, ATTENTION),
    "attention-r16": (16, ATTENTION),
    "transformer-r4": (4, TRANSFORMER),
    "locon-r4": (4, [*TRANSFORMER, "conv1", "conv2", "conv_shortcut", "conv"]),
}
DEFAULT = "attention-r4"
# replicate 0's grids that docs/benchmarks.md shows: compare's LoRA (the rate its probe chose) and LoCon at both ends
GRIDS = [("flags", "attention-r4", 3e-4), ("flags", "locon-r4", 1e-4), ("flags", "locon-r4", 1e-3)]


def command(arm: str, rate: float, seed: int, steps: int, out: Path, domain: str) -> list[str]:
    rank, targets = ARMS[arm]
    every = max(1, min(100, steps // 2))
    return [sys.executable, "-m", "genadapt", "adapt", "--base", "pocket-sd", "--data", f"builtin:openmoji/{domain}",
            "--shots", str(SHOTS), "--seed", str(seed), "--train", "lora", "--rank", str(rank),
            *[a for t in targets for a in ("--lora-targets", t)], "--learning-rate", str(rate), "--steps", str(steps),
            "--batch-size", "4", "--validate-every", str(every), "--validation-samples", "16", "--patience", "0",
            "--sample-steps", "10", "--num-validation-images", "4", "--threads", "1", "--out", str(out)]


def folder(runs: Path, domain: str, arm: str, rate: float, seed: int) -> Path:
    return runs / domain / f"{arm}-lr{rate:g}-s{seed}"


def evaluate_domain(runs: Path, domain: str, arms: list[str], rates: list[float], replicates: int) -> dict:
    """Per (arm, rate): each replicate's scores; the base's per seed; paired differences."""
    import numpy as np

    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate
    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.eval.paired import PairedKID, pooled_difference
    from genadapt.models import base_samples, run_samples

    data, reference_spec = f"builtin:openmoji/{domain}", f"builtin:openmoji/{domain}/reference"
    reference = load_dataset(reference_spec, resolution=32)
    spaces = {name: get_extractor(name) for name in ("pocket", "style")}
    reference_features = {name: cached_features(e, reference, progress=False).float() for name, e in spaces.items()}

    def score(samples, seed: int) -> dict:
        return {name: PairedKID(reference_features[name], SAMPLES, seed=seed).scores(cached_features(e, samples, progress=False).float())
                for name, e in spaces.items()}

    base = []
    for seed in range(replicates):
        shots = load_dataset(data, resolution=32, shots=SHOTS, seed=seed)
        samples = base_samples("pocket-sd", SAMPLES, shots.captions, seed, SAMPLE_STEPS)
        evaluation = evaluate(samples, reference, shots)
        base.append({"kid": evaluation["kid"]["value"], "diversity": evaluation["intra_cluster_diversity"]["value"], "scores": score(samples, seed)})
    rows = {}
    for arm in arms:
        for rate in rates:
            replicate_rows = []
            for seed in range(replicates):
                run = folder(runs, domain, arm, rate, seed)
                shots = load_dataset(data, resolution=32, shots=SHOTS, seed=seed)
                samples = run_samples(run, SAMPLES, seed, steps=SAMPLE_STEPS)
                evaluation = evaluate(samples, reference, shots, out=run / "eval")
                summary = json.loads((run / "summary.json").read_text())
                curve = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines() if line.strip()]
                replicate_rows.append({
                    "kid": evaluation["kid"]["value"], "diversity": evaluation["intra_cluster_diversity"]["value"],
                    "copy_rate": evaluation["memorisation"]["copy_rate"], "best_step": summary["validation"]["best_step"],
                    "best_validation_kid": summary["validation"]["best_kid"], "train_seconds": summary["train_seconds"],
                    "trainable": summary["trainable_parameters"], "artifact_bytes": summary["artifact_bytes"], "scores": score(samples, seed), "curve": curve})
            rows[f"{arm}@{rate:g}"] = replicate_rows
    out = {"base": {"kid": float(np.mean([b["kid"] for b in base])), "diversity": float(np.mean([b["diversity"] for b in base])),
                    "style_kid": float(np.mean([b["scores"]["style"][0] for b in base]))}, "rows": {}}
    def pairs(rs, space):
        return [(r["scores"][space][0], r["scores"][space][1]) for r in rs]

    base_pairs = {space: pairs(base, space) for space in spaces}
    out["base"]["paired"] = {space: [(v, h.tolist()) for v, h in base_pairs[space]] for space in spaces}
    for key, replicate_rows in rows.items():
        arm, rate = key.split("@")
        default = rows[f"{DEFAULT}@{rate}"]
        out["rows"][key] = {
            "arm": arm, "rate": float(rate), "rank": ARMS[arm][0], "targets": ARMS[arm][1],
            "kid": float(np.mean([r["kid"] for r in replicate_rows])), "kids": [r["kid"] for r in replicate_rows],
            "style_kid": float(np.mean([r["scores"]["style"][0] for r in replicate_rows])),
            "diversity": float(np.mean([r["diversity"] for r in replicate_rows])),
            "copy_rate": float(np.mean([r["copy_rate"] for r in replicate_rows])),
            "best_steps": [r["best_step"] for r in replicate_rows],
            # a run none of whose checks was under the copy ceiling has no best step (it keeps its last)
            "validation_kid": float(np.mean(scored)) if (scored := [r["best_validation_kid"] for r in replicate_rows if r["best_validation_kid"] is not None]) else None,
            "trainable": replicate_rows[0]["trainable"], "artifact_bytes": replicate_rows[0]["artifact_bytes"],
            "train_minutes": float(np.mean([r["train_seconds"] for r in replicate_rows]) / 60),
            "vs_base": pooled_difference(pairs(replicate_rows, "pocket"), base_pairs["pocket"]),
            "style_vs_base": pooled_difference(pairs(replicate_rows, "style"), base_pairs["style"]),
            "vs_default": None if arm == DEFAULT else pooled_difference(pairs(replicate_rows, "pocket"), pairs(default, "pocket")),
            "curves": [r["curve"] for r in replicate_rows],
            # per replicate, (KID, KID on each shared reference half) in both spaces: any two rows pair post hoc
            "paired": {space: [(v, h.tolist()) for v, h in pairs(replicate_rows, space)] for space in spaces},
        }
    return out


def _ci(d) -> str:
    return "–" if d is None else f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def table(result: dict) -> str:
    lines = ["| arm | rank | learning rate | trainable | KID [replicates' range] | Δ KID vs base [95% CI] | Δ KID vs attention r4, same rate [95% CI] | "
             "style KID | Δ style vs base [95% CI] | diversity | copy rate | best steps | validation KID (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(result["rows"].values(), key=lambda r: (r["rate"], list(ARMS).index(r["arm"]))):
        trainable = f"{row['trainable']:,}" if row["trainable"] else "?"
        lines.append(f"| {row['arm']} | {row['rank']} | {row['rate']:g} | {trainable} | {row['kid']:.3f} [{min(row['kids']):.3f}, {max(row['kids']):.3f}] | "
                     f"{_ci(row['vs_base'])} | {_ci(row['vs_default'])} | {row['style_kid']:.3f} | {_ci(row['style_vs_base'])} | "
                     f"{row['diversity']:.3f} | {row['copy_rate']:.0%} | {', '.join('none' if s is None else str(s) for s in row['best_steps'])} | "
                     f"{'–' if row['validation_kid'] is None else format(row['validation_kid'], '.3f')} |")
    base = result["base"]
    lines.append(f"| base (unadapted) | | | 0 | {base['kid']:.3f} | | | {base['style_kid']:.3f} | | {base['diversity']:.3f} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", default="flags,dark-skin")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--rates", default="1e-4,3e-4,1e-3")
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 replicate, in a temporary folder; prints only")
    args = parser.parse_args()
    domains, arms, rates = args.domains.split(","), args.arms.split(","), [float(r) for r in args.rates.split(",")]
    if DEFAULT not in arms:
        raise SystemExit(f"--arms: include {DEFAULT}, the default, which the others are paired against")
    runs, steps, replicates = ROOT / "runs" / "lora-targets", args.steps, args.replicates
    if args.smoke:
        import tempfile

        runs, steps, replicates = Path(tempfile.mkdtemp()), 2, 1

    from genadapt.runs import use_cpu

    use_cpu()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the runs' children, one thread each
    started = time.time()
    commands = [command(arm, rate, seed, steps, folder(runs, domain, arm, rate, seed), domain)
                for domain in domains for seed in range(replicates) for rate in rates for arm in arms
                if not (folder(runs, domain, arm, rate, seed) / "summary.json").is_file()]
    print(f"{len(commands)} runs to train", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adaptation_quality import _run_all  # jobs at a time; the first failure stops the rest

    _run_all(commands, args.jobs)
    trained_minutes = round((time.time() - started) / 60, 1)  # 0 when every run was already trained (a resumed call)
    print(f"trained ({trained_minutes} min)", flush=True)
    results = {}
    for domain in domains:
        results[domain] = evaluate_domain(runs, domain, arms, rates, replicates)
        print(f"\n{domain} ({(time.time() - started) / 60:.1f} min)\n{table(results[domain])}", flush=True)
    if args.smoke:
        return
    import shutil

    docs = ROOT / "docs" / "quality"
    for domain, arm, rate in GRIDS:
        if domain in domains and arm in arms and rate in rates:
            shutil.copyfile(folder(runs, domain, arm, rate, 0) / "eval" / "samples.png", docs / f"lora-targets-{domain}-{arm}-lr{rate:g}.png")
    out = ROOT / "benchmarks" / "results" / "lora_targets.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "steps": steps, "replicates": replicates, "results": results,
                               "tables": {d: table(r) for d, r in results.items()}, "minutes": round((time.time() - started) / 60, 1),
                               "train_minutes_this_call": trained_minutes}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
