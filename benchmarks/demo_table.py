"""Markdown tables of a finished `genadapt demo` (or compare) folder, for docs/benchmarks.md.

    .venv/bin/python benchmarks/demo_table.py runs/demo/full
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from genadapt.eval.report import verdict


def table(results: dict) -> str:
    lines = [
        "| technique | shots | KID [95% CI] | FID [95% CI] | precision | recall | intra-cluster diversity | copy rate | trainable params | artifact | CPU-min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(results["runs"].values(), key=lambda r: r["evaluation"]["kid"]["value"]):
        e = run["evaluation"]
        kid, fid = e["kid"], e["fid"]
        lines.append(
            f"| {run['technique']} | {run['shots']} | {kid['value']:.3f} [{kid['ci_low']:.3f}, {kid['ci_high']:.3f}] "
            f"| {fid['value']:.1f} [{fid['ci_low']:.1f}, {fid['ci_high']:.1f}] | {e['precision_recall']['precision']:.2f} "
            f"| {e['precision_recall']['recall']:.2f} | {e['intra_cluster_diversity']['value']:.3f} | {e['memorisation']['copy_rate']:.0%} "
            f"| {run.get('trainable_parameters', 0):,} | {run.get('artifact_bytes', 0) / 1e6:.2f} MB | {run.get('cpu_minutes', 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1])
    for results_path in sorted(folder.glob("*/results.json")):
        results = json.loads(results_path.read_text())
        plan = results["plan"]
        print(f"### {results['settings']['base']} ({plan['steps']} steps per run; dropped: {', '.join(plan['dropped']) or 'none'})\n")
        print(table(results) + "\n")
        for line in verdict(results):
            print("- " + line.replace("<b>", "**").replace("</b>", "**").replace("<i>", "_").replace("</i>", "_"))
        print()


if __name__ == "__main__":
    main()
