"""benchmarks/gpu_check.sh's CPU path: tiny SD 1.5- and SDXL-shaped pipelines, one step of each technique."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("RESULT", "FAIL", "SKIP"))]
    results = [line for line in lines if line.startswith("RESULT")]
    assert results == lines, done.stdout  # nothing skipped or failed on the CPU path
    configurations = {re.search(r"shape=(\S+) train=(\S+)", line).groups() for line in results}
    assert configurations == {(shape, train) for shape in ("sd15", "sdxl") for train in ("lora", "full", "embedding")}
    for line in results:
        rate = re.search(r"steps/s=([0-9.]+)\b", line)
        assert rate is not None and float(rate.group(1)) > 0, line
    assert re.search(r"gpu_check: 6 ran, 0 failed, 0 skipped", done.stdout), done.stdout
