"""LoRA on pocket-stylegan2 (issue #18): which generator layers the adapter wraps, and its rank, at 10 shots.

    .venv/bin/python benchmarks/gan_lora_targets.py run [--domains flags,dark-skin] [--jobs 2]   # two compares, ~40 min
    .venv/bin/python benchmarks/gan_lora_targets.py table                                          # the table again
    .venv/bin/python benchmarks/gan_lora_targets.py run --smoke                                    # 4 steps, prints only

genadapt's GAN LoRA wraps every EqualLinear and ModulatedConv2d of the generator (`--lora-targets '*'`, rank 4). The
arms, each one `genadapt compare` technique, run side by side in one compare per domain with TGAN (`full`) as the
yardstick, so every difference is paired (same shot draws, seeds and reference halves):

    lora             every layer, rank 4 (the default)
    lora_r16         every layer, rank 16                         --variant lora_r16=lora,rank=16
    lora_synthesis   the synthesis convs and toRGBs only          --variant lora_synthesis=lora,lora_targets=*.conv
    lora_style       the mapping network and the convs' style     --variant lora_style=lora,lora_targets=style.*,*.modulation
                     affines only (how w becomes each layer's style; the conv kernels stay)

The compare is the adaptation-quality plan for pocket-stylegan2 (benchmarks/adaptation_quality.py): 800 steps,
validated every 100 and never stopped early, each technique's rate from a 3-rate probe of 150 steps, 3 replicates,
64 samples per run. Per arm: KID (mean [replicates' range]), paired Δ to the base and to the default arm [95% CI,
pooled over replicates], diversity, copy rate, kept steps, the artifact's size and the rate. Folders
runs/gan-lora-targets/<domain> (rerun to resume); numbers to benchmarks/results/gan_lora_targets.json, replicate 0's
grids of GRIDS beside the shots to docs/quality/gan-lora-targets-*.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "gan-lora-targets"
RESULTS = ROOT / "benchmarks" / "results" / "gan_lora_targets.json"
VARIANTS = ["lora_r16=lora,rank=16", "lora_synthesis=lora,lora_targets=*.conv", "lora_style=lora,lora_targets=style.*,*.modulation"]
TECHNIQUES = ["full", "lora"]
PLAN = dict(steps=800, validate_every=100, patience=0, lr_probe_steps=150, samples=64, replicates=3, lr_probe=3)
GRIDS = ("lora", "lora_style", "full")  # replicate 0's samples that docs/benchmarks.md shows, beside the shots
SMOKE = dict(steps=4, validate_every=2, patience=0, lr_probe_steps=2, samples=8, replicates=1, lr_probe=2, min_steps=2)


def settings_for(domain: str, jobs: int, smoke: bool):
    from genadapt.config import CompareConfig

    plan = SMOKE if smoke else {**PLAN, "min_steps": 50}
    out = OUT / ("smoke-" + domain if smoke else domain)
    return CompareConfig(base="pocket-stylegan2", data=f"builtin:openmoji/{domain}", reference=f"builtin:openmoji/{domain}/reference",
                         out=out, shots=[10], techniques=TECHNIQUES, variant=VARIANTS, jobs=jobs, probe_steps=2, **plan)


def summarise(settings) -> dict:
    """Per arm, compare's own evidence plus the paired difference to the default arm, from the compare's saved features."""
    from safetensors.torch import load_file

    from genadapt.eval.paired import PairedKID, pooled_difference
    from genadapt.recipes.compare import run_name

    out = Path(settings.out)
    results = json.loads((out / "results.json").read_text())
    [advice] = results["recommendation"]
    replicates = results["plan"]["replicates"]
    reference = load_file(out / "reference_features.safetensors")["features"]
    scorers = [PairedKID(reference, settings.samples, seed=settings.seed + r) for r in range(replicates)]

    def scores(technique):
        return [scorers[r].scores(load_file(out / "runs" / run_name(technique, 10, r) / "eval" / "sample_features.safetensors")["features"])
                for r in range(replicates)]

    default = scores("lora")
    rows = {}
    for technique, row in advice["techniques"].items():
        runs = [results["runs"][run_name(technique, 10, r)] for r in range(replicates)]
        summaries = [json.loads((out / "runs" / run_name(technique, 10, r) / "summary.json").read_text()) for r in range(replicates)]
        rows[technique] = {
            "kid": row["kid"], "kids": row["kid_per_replicate"], "vs_base": row["vs_base"], "diversity": row["diversity"],
            "copy_rate": row["copy_rate"], "disqualified": row["disqualified"],
            "vs_lora": None if technique == "lora" else pooled_difference(scores(technique), default),
            "best_steps": [s["validation"]["best_step"] for s in summaries], "artifact_bytes": row["artifact_bytes"],
            "trainable": summaries[0]["trainable_parameters"],  # the generator's adapter and the discriminator, which trains too
            "learning_rate": runs[0]["learning_rate"], "train_minutes": sum(s["train_seconds"] for s in summaries) / 60 / replicates,
        }
    return {"recommended": advice.get("technique"), "tied_with": advice.get("tied_with"), "base_kid": advice["base_kid"],
            "target_diversity": advice.get("target_diversity"), "base_diversity": advice.get("base_diversity"),
            "floor": settings.diversity_floor * min(d for d in (advice.get("target_diversity"), advice.get("base_diversity")) if d), "rows": rows}


def table(domain: str, summary: dict) -> str:
    def ci(d):
        return "—" if d is None else f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    lines = [f"#### pocket-stylegan2, {domain} (10 shots, 800 steps, 3 replicates; recommended: {summary['recommended']})", "",
             "| arm | KID [replicates' range] | Δ KID vs base [95% CI] | Δ KID vs lora [95% CI] | diversity | copy rate | best step per replicate | artifact | learning rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(summary["rows"].items(), key=lambda item: item[1]["kid"]):
        mark = " (disqualified)" if row["disqualified"] else (" **(recommended)**" if name == summary["recommended"] else "")
        lines.append(f"| {name}{mark} | {row['kid']:.3f} [{min(row['kids']):.3f}, {max(row['kids']):.3f}] | {ci(row['vs_base'])} | {ci(row['vs_lora'])} "
                     f"| {row['diversity']:.3f} | {row['copy_rate']:.0%} | {', '.join(map(str, row['best_steps']))} | {row['artifact_bytes'] / 1024:,.1f} KB | {row['learning_rate']:.2g} |")
    lines.append(f"| base (unadapted) | {summary['base_kid']:.3f} | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["run", "table"])
    parser.add_argument("--domains", default="flags,dark-skin")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from genadapt.api import compare

    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.smoke else {}
    for domain in args.domains.split(","):
        settings = settings_for(domain, args.jobs, args.smoke)
        if args.phase == "run":
            started = time.time()
            compare(settings)
            print(f"{domain}: {(time.time() - started) / 60:.1f} min", flush=True)
        summary = summarise(settings)
        print(table(domain, summary), flush=True)
        if not args.smoke:
            import torch

            stored[domain] = {**summary, "date": time.strftime("%Y-%m-%d"), "cpu": torch.backends.cpu.get_cpu_capability(),
                              "command": f"benchmarks/gan_lora_targets.py run --domains {domain} --jobs {args.jobs}"}
            RESULTS.write_text(json.dumps(stored, indent=1) + "\n")
            import shutil

            docs = ROOT / "docs" / "quality"
            shutil.copyfile(Path(settings.out) / "shots-10.png", docs / f"gan-lora-targets-{domain}-shots.png")
            for arm in GRIDS:
                shutil.copyfile(Path(settings.out) / "runs" / f"{arm}-10shot-r0" / "eval" / "samples.png", docs / f"gan-lora-targets-{domain}-{arm}.png")


if __name__ == "__main__":
    main()
