"""Markdown tables of a finished `genadapt demo` (or compare) folder, for docs/benchmarks.md.

    .venv/bin/python benchmarks/demo_table.py runs/demo/full

Per compare: every technique over its replicates (mean KID and the replicates' range, the paired difference to
the base with its 95% CI, diversity, copy rate, each replicate's best validated step, the learning rate it
trained at, CPU-minutes), the paired evidence behind the verdict with the smallest detectable difference, the
learning-rate sweep, and the verdict sentence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from genadapt.eval.report import verdict, worse_than_base
from genadapt.recipes.compare import run_name


def _markdown(line: str) -> str:
    return line.replace("<b>", "**").replace("</b>", "**").replace("<i>", "_").replace("</i>", "_")


def techniques_table(results: dict) -> str:
    lines = [
        "| technique | shots | mean KID [replicates' range] | Δ KID vs base [95% CI] | diversity | copy rate | best step per replicate | learning rate | trainable params | CPU-min per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for advice in results["recommendation"]:
        shots = advice["shots"]
        for technique, row in sorted(advice["techniques"].items(), key=lambda item: item[1]["kid"]):
            kids = row["kid_per_replicate"]
            runs = [results["runs"][run_name(technique, shots, r)] for r in range(row["replicates"]) if run_name(technique, shots, r) in results["runs"]]
            steps = ", ".join(str(run.get("best_step") or run.get("steps")) for run in runs)
            rate = runs[0].get("learning_rate") if runs else None
            vs = row["vs_base"]
            pick = " **(best, worse than the base)**" if worse_than_base(advice) else " **(recommended)**"
            mark = pick if technique == advice.get("technique") else (" (disqualified)" if row["disqualified"] else "")
            lines.append(
                f"| {technique}{mark} | {shots} | {row['kid']:.3f} [{min(kids):.3f}, {max(kids):.3f}] | {vs['difference']:+.3f} [{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}] "
                f"| {row['diversity']:.3f} | {row['copy_rate']:.0%} | {steps} | {'—' if rate is None else f'{rate:.2g}'} "
                f"| {row['trainable_parameters']:,} | {row['cpu_minutes']:.2f} |"
            )
        lines.append(f"| base (unadapted) | {shots} | {advice['base_kid']:.3f} | | {advice['base_diversity']:.3f} | | | | 0 | |")
        if advice.get("target_diversity") is not None:  # the diversity floor's yardstick
            lines.append(f"| held-out target images (real) | {shots} | | | {advice['target_diversity']:.3f} | | | | | |")
    return "\n".join(lines)


def evidence_table(results: dict) -> str:
    lines = ["| shots | difference | KID Δ [95% CI, paired, pooled over replicates] | smallest detectable (80% power) | outcome |", "|---|---|---|---|---|"]
    for advice in results["recommendation"]:
        for other, c in advice.get("comparisons", {}).items():
            outcome = "tied" if other in advice["tied_with"] else "beaten"
            lines.append(f"| {advice['shots']} | {advice['fidelity_winner']} − {other} | {c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['detectable']:.4f} | {outcome} |")
    return "\n".join(lines)


def probe_table(results: dict) -> str:
    probe = results.get("lr_probe")
    if not probe:
        return "(no learning-rate probe)"
    width = max(len(s["rates"]) for s in probe["techniques"].values())
    lines = [f"| technique | {' | '.join(['rate: validation KID @ best step'] * width)} | trained at |", "|---" * (width + 2) + "|"]
    for technique, sweep in probe["techniques"].items():
        cells = [f"{rate:.2g}: {'—' if kid is None else f'{kid:.4f}'} @ {step}" for rate, kid, step in zip(sweep["rates"], sweep["kid"], sweep["best_step"])]
        lines.append(f"| {technique} | {' | '.join(cells)} | {sweep['chosen']:.2g} (default {sweep['default']:.2g}) |")
    return f"Probe: {probe['steps']} steps per rate on {probe['shots']} shots.\n\n" + "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1])
    for results_path in sorted(folder.glob("*/results.json")):
        results = json.loads(results_path.read_text())
        plan = results["plan"]
        cpu = sum(run.get("cpu_minutes", 0) for name, run in results["runs"].items() if not name.startswith("base"))
        print(f"### {results['settings']['base']} ({plan['steps']} steps per run, {plan['replicates']} replicates; dropped: {', '.join(plan['dropped']) or 'none'})\n")
        print(techniques_table(results) + "\n")
        print(evidence_table(results) + "\n")
        print(probe_table(results) + "\n")
        print(f"CPU-minutes of the runs (probe excluded): {cpu:.1f}; wall minutes of this compare: {results.get('wall_minutes_this_session')}\n")
        for line in verdict(results):
            print("- " + _markdown(line))
        print()


if __name__ == "__main__":
    main()
