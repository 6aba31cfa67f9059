"""compare --executor ray: the same run folders and results as --executor local, a killed worker's run is retried,
and a killed driver resumes without redoing finished runs. A local Ray cluster with 2 worker CPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from diffusion_fixtures import build_tiny_pipeline

ray = pytest.importorskip("ray")
# Under the suite's load on 2 cores a Ray client has once given up on a starved GCS after its default 60 s
# ("Failed to connect to GCS within 60 seconds"); these runs may wait longer.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_gcs_rpc_server_reconnect_timeout_s": "300", "RAY_gcs_rpc_server_connect_timeout_s": "300",
       "RAY_health_check_failure_threshold": "30"}  # a starved raylet is not declared dead after 5 missed 3 s checks
# Several processes per test, and `ray stop --force` ends every local Ray cluster: under pytest-xdist one worker
# runs the multi-process tests in turn, beside the single-process ones.
pytestmark = pytest.mark.xdist_group("multi-process")
# How a dead local cluster (not a failed run) reads in the driver's stderr.
RAY_CLUSTER_DIED = ("Failed to connect to GCS", "RayletDiedError", "GCS may have been killed")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


def _args(base, out, executor):
    args = [sys.executable, "-m", "genadapt", "compare", "--base", base, "--data", "builtin:digits/3", "--reference", "builtin:digits/3",
            "--shots", "2", "--techniques", "lora,embedding", "--steps", "6", "--samples", "4", "--sample-steps", "1", "--batch-size", "2",
            "--replicates", "1", "--lr-probe", "2", "--lr-probe-steps", "2", "--out", str(out)]
    return args + (["--executor", "ray", "--cpus-per-run", "1"] if executor == "ray" else [])


def _comparable(results: dict) -> dict:
    """What must be identical across executors: every evaluation and the decision (not timings or paths)."""
    runs = {}
    for name, run in results["runs"].items():
        evaluation = {k: v for k, v in run["evaluation"].items() if k != "samples"}
        runs[name] = {"technique": run["technique"], "shots": run["shots"], "evaluation": evaluation, "artifact_bytes": run.get("artifact_bytes")}
    decision = [(a["shots"], a.get("technique"), a.get("tied_with"), {t: r["kid"] for t, r in a["techniques"].items()}) for a in results["recommendation"]]
    return {"runs": runs, "decision": decision, "failed": results.get("failed"), "lr_probe": results.get("lr_probe")}


MAIN_RUNS = ("lora-2shot-r0", "embedding-2shot-r0")  # the grid's runs (after the learning-rate probe)


def _ray_workers() -> list[tuple[int, str]]:
    """The worker processes busy with one of the grid's runs (Ray titles a worker `ray::TASK_NAME`)."""
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [(int(line.split()[0]), line) for line in listing.splitlines() if any(f"ray::{name}" in line for name in MAIN_RUNS)]


def _ray_logs() -> str:
    """The tails of the local cluster's GCS and raylet logs: why a cluster died, for the failure message."""
    logs = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"
    tails = []
    for name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err"):
        if (logs / name).is_file():
            tails.append(f"--- {name}\n" + "\n".join((logs / name).read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(tails)


def _compare_killing_one_worker(base, out: Path, killed: list) -> subprocess.CompletedProcess:
    """Run the Ray compare into OUT while a watcher kills the first worker seen training one of the grid's runs."""
    finished = threading.Event()

    def kill_one_worker():
        while not finished.is_set() and not killed:
            if any((out / "runs" / name / "log.jsonl").is_file() for name in MAIN_RUNS):
                for pid, line in _ray_workers():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(line)
                    break
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one_worker)
    watcher.start()
    try:
        return subprocess.run(_args(base, out, "ray"), env=ENV, capture_output=True, text=True, timeout=900)
    finally:
        finished.set()
        watcher.join()


def test_ray_executor_matches_local_and_survives_a_killed_worker(base, tmp_path):
    subprocess.run(_args(base, tmp_path / "local", "local"), env=ENV, check=True, capture_output=True, timeout=900)
    local = json.loads((tmp_path / "local" / "results.json").read_text())

    killed = []
    out = tmp_path / "ray"
    done = _compare_killing_one_worker(base, out, killed)
    if done.returncode != 0 and any(sign in done.stderr for sign in RAY_CLUSTER_DIED):
        # The local cluster itself (not a run) died under the suite's load, in 2 of ~8 CI-like runs, at times before
        # any worker was killed: the property is then tried once more from scratch, on a fresh cluster.
        first = f"first try: {done.stderr[-1500:]}\n{_ray_logs()}"
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=ENV, capture_output=True, timeout=120)
        killed.clear()
        out = tmp_path / "ray-again"
        done = _compare_killing_one_worker(base, out, killed)
        assert done.returncode == 0, f"{first}\nagain: {done.stderr[-1500:]}"
    assert done.returncode == 0, f"killed: {killed}\n{done.stderr[-3000:]}\n{_ray_logs()}"
    assert killed, f"no Ray worker was found training {MAIN_RUNS}"
    remote = json.loads((out / "results.json").read_text())
    assert _comparable(remote) == _comparable(local)
    assert json.loads((out / "runs" / "lora-2shot-r0" / "run.json").read_text())["train"] == "lora"


def test_without_ray_the_executor_is_one_line(tmp_path):
    from click.testing import CliRunner

    from genadapt.cli import app

    result = CliRunner().invoke(app, ["compare", "--data", "builtin:digits/3", "--jobs", "2", "--executor", "ray", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--jobs applies to --executor local" in result.output
    result = CliRunner().invoke(app, ["compare", "--data", "builtin:digits/3", "--address", "auto", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--address applies to --executor ray" in result.output


def test_the_slurm_template_parses_and_its_ray_start_commands_work_locally(tmp_path):
    template = Path(__file__).resolve().parents[1] / "examples" / "slurm_ray_compare.sbatch"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    text = template.read_text()
    assert "ray start --head" in text and 'ray start --address="$head_ip:$PORT"' in text and "--executor ray --address auto" in text
    import tempfile

    port = "6391"
    short = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    tmp_path = short
    env = {**ENV, "RAY_TMPDIR": str(short), "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster: no token to share
    try:
        ray_cli = str(Path(sys.executable).parent / "ray")
        head = subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                               "--include-dashboard=false", f"--temp-dir={tmp_path}"], env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--num-gpus=0"], env=env, capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr[-2000:]
        deadline = time.time() + 60
        while True:  # the worker registers with the head a moment after `ray start` returns
            status = subprocess.run([ray_cli, "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=120)
            if (status.returncode == 0 and "/2.0 CPU" in status.stdout) or time.time() > deadline:
                break
            time.sleep(1)
        assert status.returncode == 0 and "/2.0 CPU" in status.stdout, status.stdout  # two nodes, one CPU each
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_missing_ray_is_one_line_with_the_install_command(monkeypatch, tmp_path):
    import builtins

    from genadapt.errors import UserError
    from genadapt.recipes import ray_executor

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install 'genadapt\[ray\]'"):
        ray_executor._ray()
