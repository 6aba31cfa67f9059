"""Textual inversion in-domain with the placeholder at the end: the demo's pocket-sd half with `end` as the default.

    .venv/bin/python benchmarks/ti_in_domain.py   # ~10 min on 2 cores; writes runs/ti-in-domain/pocket-sd

compare has no flag for one technique's settings, so this runs `genadapt demo`'s pocket-sd plan (flags, 10 shots,
400 steps, 2 replicates, the 3-rate probe, 2 runs at a time) in a child process whose copy of genadapt has
`EmbeddingSettings.token_position` defaulting to "end"; every other technique trains as in the demo, so their rows
reproduce docs/benchmarks.md's demo table and only textual inversion's can move. Prints the verdict and the table's
rows (docs/benchmarks.md, "Textual inversion: where the placeholder joins the caption").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "ti-in-domain" / "pocket-sd"
DEFAULT = 'token_position: Literal["start", "end"] = setting("start",'

CHILD = """
from pathlib import Path
from genadapt.api import compare
from genadapt.config import CompareConfig
from genadapt.eval.report import verdict_text
from genadapt.techniques.embedding import EmbeddingSettings

if __name__ == "__main__":  # compare's workers import this module
    assert EmbeddingSettings().token_position == "end"
    result = compare(CompareConfig(base="pocket-sd", data="builtin:openmoji/flags", reference="builtin:openmoji/flags/reference", out=Path({out!r}),
                                   shots=[10], techniques=["lora", "embedding", "freeze", "full", "ewc"], steps=400, samples=64, replicates=2,
                                   lr_probe=3, jobs=2, min_steps=50, probe_steps=2, sample_steps=25))
    print(*verdict_text(result), sep="\\n")
    for technique, row in result["recommendation"][0]["techniques"].items():
        d = row["vs_base"]
        print(f"{{technique}}: KID {{row['kid']:.3f}}, vs base {{d['difference']:+.3f}} [{{d['ci_low']:+.3f}}, {{d['ci_high']:+.3f}}], "
              f"diversity {{row['diversity']:.3f}}, copies {{row['copy_rate']:.0%}}")
    print("embedding's probed rate:", result["lr_probe"]["techniques"]["embedding"]["chosen"])
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "genadapt"
        shutil.copytree(ROOT / "src" / "genadapt", copy)
        settings = copy / "techniques" / "embedding.py"
        text = settings.read_text()
        if DEFAULT not in text:
            raise SystemExit(f"{settings}: the token_position default is no longer {DEFAULT!r}; update this script")
        settings.write_text(text.replace(DEFAULT, DEFAULT.replace('"start",', '"end",')))
        script = Path(folder) / "ti_in_domain_child.py"
        script.write_text(CHILD.format(out=str(OUT)))
        env = {**os.environ, "PYTHONPATH": folder, "OMP_NUM_THREADS": "1"}
        raise SystemExit(subprocess.call([sys.executable, str(script)], env=env, cwd=ROOT))


if __name__ == "__main__":
    main()
