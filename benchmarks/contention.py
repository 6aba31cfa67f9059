"""How much a run slows down when one other process keeps a core busy (a 2-core machine shared with a test run).

    .venv/bin/python benchmarks/contention.py [--steps 60] [--repeats 3] [--threads 1] [--conditions idle,busy,busy-pinned]
    .venv/bin/python benchmarks/contention.py --smoke      # 2 LoRA steps, idle and busy; prints only

Each workload is the `genadapt` command a user types, in its own child process, started fresh (a fixed step
count, so it does the same work every time):

    lora   genadapt adapt --base pocket-sd --train lora        10 shots of builtin:openmoji/flags, batch 4
    full   genadapt adapt --base pocket-sd --train full        the same
    gan    genadapt adapt --base pocket-stylegan2 --train freeze
    demo   genadapt demo --quick --out TMP                     (compare's probes, runs, samples and report)

under each condition:

    idle          nothing else started by this script (other users of the machine are not controlled)
    busy          beside `python -c 'while True: pass'`, which the scheduler may move between cores
    busy-pinned   the same loop pinned to one core (--pin-cpu, default the last one); the run is not pinned

The busy loop is started before the child and stopped (by its pid) when the child ends. Reported per workload
and condition: steps/s from the run's summary.json (steps / train_seconds: the training loop alone; the demo
sums every run of its compare), wall time of the whole command (start-up, data, sampling, saving included),
and loaded/idle ratios of both (steps/s ratio below 1: slower; wall ratio above 1: slower). Conditions are
interleaved within each repeat, in a rotating order, so drift in the machine's load spreads over all of them.
Medians over --repeats; JSON to benchmarks/results/contention.json (not with --smoke). The defaults are 36
child runs: roughly half an hour on 2 cores, most of it the demo (`--workloads lora,full,gan`: ~10 minutes).

Threads: --threads N reaches every child as OMP_NUM_THREADS=N and MKL_NUM_THREADS=N (torch sizes its
intra-op pool from them at import), and also as `genadapt adapt/demo --threads N` when that command's --help
lists the flag (checked at start; genadapt has it since its thread-policy commit; an older one has only the
variables). The JSON records which way each command got it. The busy loop is one thread whatever N is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DATA = ["--data", "builtin:openmoji/flags", "--shots", "10", "--seed", "0"]
WORKLOADS = {
    "lora": ["adapt", "--base", "pocket-sd", "--train", "lora", *DATA, "--batch-size", "4", "--num-validation-images", "1", "--sample-steps", "1"],
    "full": ["adapt", "--base", "pocket-sd", "--train", "full", *DATA, "--batch-size", "4", "--num-validation-images", "1", "--sample-steps", "1"],
    "gan": ["adapt", "--base", "pocket-stylegan2", "--train", "freeze", *DATA, "--batch-size", "4", "--num-validation-images", "1"],
    "demo": ["demo", "--quick"],
}
CONDITIONS = ("idle", "busy", "busy-pinned")
BUSY_LOOP = "while True: pass"


def has_flag(command: str, flag: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "genadapt", command, "--help"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return flag in done.stdout


def start_busy(condition: str, pin_cpu: int) -> subprocess.Popen | None:
    if condition == "idle":
        return None
    pin = (lambda: os.sched_setaffinity(0, {pin_cpu})) if condition == "busy-pinned" else None
    loop = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=pin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it reach the loop (interpreter start-up is not load)
    return loop


def stop_busy(loop: subprocess.Popen | None) -> None:
    if loop is None:
        return
    loop.terminate()
    try:
        loop.wait(timeout=5)
    except subprocess.TimeoutExpired:
        loop.kill()
        loop.wait()


def summaries_under(folder: Path) -> tuple[int, float]:
    """(steps, train_seconds) summed over every run's summary.json below `folder` (one for adapt, all of a demo)."""
    steps, seconds = 0, 0.0
    for path in folder.rglob("summary.json"):
        summary = json.loads(path.read_text())
        if "train_seconds" in summary and "steps" in summary:
            steps += int(summary["steps"])
            seconds += float(summary["train_seconds"])
    return steps, seconds


def run_once(workload: str, condition: str, steps: int, threads: int, thread_flag: dict, pin_cpu: int, scratch: Path) -> dict:
    out = scratch / f"{workload}-{condition}"
    shutil.rmtree(out, ignore_errors=True)  # a run folder that exists would resume, and time nothing
    command = [sys.executable, "-m", "genadapt", *WORKLOADS[workload], "--out", str(out)]
    if workload != "demo":
        command += ["--steps", str(steps), "--checkpointing-steps", str(steps)]
    # OpenMP's variables size torch's pool at import (and numpy's BLAS), and are all a genadapt without --threads reads.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if thread_flag.get(WORKLOADS[workload][0]):
        command += ["--threads", str(threads)]
    loop = start_busy(condition, pin_cpu)
    try:
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
    finally:
        stop_busy(loop)
    if done.returncode != 0:
        raise SystemExit(f"{workload} ({condition}) failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    total_steps, seconds = summaries_under(out)
    shutil.rmtree(out, ignore_errors=True)
    return {"workload": workload, "condition": condition, "wall_seconds": wall, "steps": total_steps, "train_seconds": seconds,
            "steps_per_second": total_steps / seconds if seconds > 0 else None}


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(samples: list[dict], workloads: list[str], conditions: list[str]) -> list[dict]:
    rows = []
    for workload in workloads:
        idle = [s for s in samples if s["workload"] == workload and s["condition"] == "idle"]
        idle_rate, idle_wall = median([s["steps_per_second"] for s in idle]), median([s["wall_seconds"] for s in idle])
        for condition in conditions:
            mine = [s for s in samples if s["workload"] == workload and s["condition"] == condition]
            if not mine:
                continue
            rate, wall = median([s["steps_per_second"] for s in mine]), median([s["wall_seconds"] for s in mine])
            rows.append({
                "workload": workload, "condition": condition, "repeats": len(mine),
                "steps_per_second": rate, "steps_per_second_min": min((s["steps_per_second"] for s in mine if s["steps_per_second"]), default=None),
                "steps_per_second_max": max((s["steps_per_second"] for s in mine if s["steps_per_second"]), default=None),
                "wall_seconds": wall,
                "steps_per_second_ratio": rate / idle_rate if rate and idle_rate and condition != "idle" else None,
                "wall_ratio": wall / idle_wall if wall and idle_wall and condition != "idle" else None,
            })
    return rows


def fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of each adapt run (the demo's are fixed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (see the module docstring)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--pin-cpu", type=int, default=None, help="the core busy-pinned pins its loop to (default: the last one this process may use)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="2 LoRA steps, idle and busy; prints only")
    args = parser.parse_args()

    workloads = [w for w in args.workloads.split(",") if w]
    conditions = [c for c in args.conditions.split(",") if c]
    for name in workloads:
        if name not in WORKLOADS:
            raise SystemExit(f"--workloads {name}: choose from {', '.join(WORKLOADS)}")
    for name in conditions:
        if name not in CONDITIONS:
            raise SystemExit(f"--conditions {name}: choose from {', '.join(CONDITIONS)}")
    if "idle" not in conditions:
        conditions.insert(0, "idle")  # the ratios need it
    pin_cpu = args.pin_cpu if args.pin_cpu is not None else max(os.sched_getaffinity(0))
    if args.smoke:
        steps, repeats = 2, 1
        plan = [[("lora", "idle"), ("lora", "busy")]]
        workloads, conditions = ["lora"], ["idle", "busy"]
    else:
        steps, repeats = args.steps, args.repeats
        plan = []
        for repeat in range(repeats):
            order = conditions[repeat % len(conditions):] + conditions[:repeat % len(conditions)]
            plan.append([(workload, condition) for workload in workloads for condition in order])

    thread_flag = {command: has_flag(command, "--threads") for command in {WORKLOADS[w][0] for w in workloads}}
    scratch = Path(tempfile.mkdtemp(prefix="contention-"))
    samples = []
    try:
        for repeat, batch in enumerate(plan, 1):
            for workload, condition in batch:
                sample = run_once(workload, condition, steps, args.threads, thread_flag, pin_cpu, scratch)
                sample["repeat"] = repeat
                samples.append(sample)
                print(f"[{repeat}/{repeats}] {workload:5s} {condition:12s} {fmt(sample['steps_per_second'], '.2f')} steps/s, "
                      f"{sample['wall_seconds']:.1f} s wall", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = table(samples, workloads, conditions)
    passed = {command: ("--threads + OMP_NUM_THREADS" if flag else "OMP_NUM_THREADS") for command, flag in thread_flag.items()}
    print(f"\n{steps} steps per adapt run, {args.threads} thread(s) via {', '.join(f'{c}: {p}' for c, p in sorted(passed.items()))}; "
          f"busy-pinned pins the loop to CPU {pin_cpu}; median of {repeats}\n")
    print("| workload | condition | steps/s (min–max) | wall (s) | steps/s loaded/idle | wall loaded/idle |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        spread = f" ({fmt(row['steps_per_second_min'], '.2f')}–{fmt(row['steps_per_second_max'], '.2f')})" if row["repeats"] > 1 else ""
        print(f"| {row['workload']} | {row['condition']} | {fmt(row['steps_per_second'], '.2f')}{spread} | {fmt(row['wall_seconds'], '.1f')} | "
              f"{fmt(row['steps_per_second_ratio'], '.2f')} | {fmt(row['wall_ratio'], '.2f')} |")
    if args.smoke:
        print("\n(smoke run: nothing saved)")
        return
    record = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
        "command": "python benchmarks/contention.py " + " ".join(sys.argv[1:]),
        "steps": steps, "repeats": repeats, "threads": args.threads, "threads_passed_as": passed, "pin_cpu": pin_cpu,
        "rows": rows, "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "contention.json").write_text(json.dumps(record, indent=2))
    print(f"\nsaved {args.out / 'contention.json'}")


if __name__ == "__main__":
    main()
