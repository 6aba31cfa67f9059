"""compare over Ray on 1 and 2 worker CPUs: the speed-up of spreading a compare grid (the 2-core machine bounds it at 2x).

Runs the demo's pocket-sd compare (10 flag shots, fixed steps, 2 replicates, the learning-rate probe's 15 short runs
first) through `--executor ray --cpus-per-run 1` against a
local Ray cluster started with `ray start --head --num-cpus N`, for N = 1 and 2, each into a fresh folder, and
reports wall minutes and the speed-up. The decision must be the same on both (it is checked).

    .venv/bin/python benchmarks/compare_scaling.py            # 20 + 11 min on 2 cores (docs/distributed.md)
    .venv/bin/python benchmarks/compare_scaling.py --smoke    # tiny settings, a minute or two

Writes benchmarks/results/compare_scaling.json (not with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def compare(workers: int, out: Path, smoke: bool) -> float:
    port = str(6400 + workers)
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={workers}", "--num-gpus=0",
                    "--include-dashboard=false", f"--temp-dir={temp}"], env=env, check=True, capture_output=True)
    steps, samples, techniques = ("4", "8", "lora,embedding") if smoke else ("400", "64", "lora,embedding,freeze,full,ewc")
    command = [sys.executable, "-m", "genadapt", "compare", "--base", "pocket-sd", "--data", "builtin:openmoji/flags",
               "--reference", "builtin:openmoji/flags/reference", "--shots", "10", "--techniques", techniques, "--steps", steps,
               "--samples", samples, "--replicates", "2", "--executor", "ray", "--address", f"127.0.0.1:{port}", "--cpus-per-run", "1",
               "--out", str(out)]
    started = time.time()
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    return (time.time() - started) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny settings; print only")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="genadapt-scaling-"))
    rows = {}
    for workers in (1, 2):
        rows[workers] = {"wall_minutes": round(compare(workers, scratch / f"w{workers}", args.smoke), 2)}
        results = json.loads((scratch / f"w{workers}" / "results.json").read_text())
        rows[workers]["decision"] = [(a["shots"], a.get("technique")) for a in results["recommendation"]]
        print(f"{workers} worker(s): {rows[workers]['wall_minutes']} min, decision {rows[workers]['decision']}")
    speedup = rows[1]["wall_minutes"] / rows[2]["wall_minutes"]
    same = rows[1]["decision"] == rows[2]["decision"]
    print(f"speed-up 1 -> 2 workers: {speedup:.2f}x; same decision: {same}")
    if not args.smoke:
        out = ROOT / "benchmarks" / "results" / "compare_scaling.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine, "cores": os.cpu_count(),
                                   "rows": rows, "speedup": speedup, "same_decision": same}, indent=2))
        print(out)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
