#!/usr/bin/env bash
# genadapt's training steps at Stable Diffusion scale on one GPU, in under 8 minutes, with nothing downloaded.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine: SD 1.5- and SDXL-shaped UNets at 512 px
#   bash benchmarks/gpu_check.sh --cpu-smoke     # anywhere: tiny shapes, one step of each technique on the CPU
#   bash benchmarks/gpu_check.sh --steps 20 --batch-size 2 --shapes sd15 --keep --work /tmp/gpu_check
#
# benchmarks/gpu_shapes.py builds random-weight pipeline folders with the published SD 1.5 / SDXL UNet configs
# (860 M / 2.6 G parameters), text encoders of the real widths and a small VAE. Each configuration is one
# `genadapt.api.adapt` run (the real loop: accelerate, autocast, gradient checkpointing, the optimiser the flag
# names) at --resolution 512; all run in one Python process, so the CUDA context and imports are paid once.
# It prints one line per configuration:
#
#   RESULT shape=sd15 train=lora precision=bf16 gc=on optimizer=adamw steps/s=11.873 peak_gib=4.21 ...
#
# steps/s counts the steps after --warmup (default 2; the first steps pay cuDNN/allocator warm-up), timed
# between the loop's optimizer.zero_grad calls after a CUDA synchronize; with no step after the warm-up
# (the CPU smoke's single step) it is steps / summary.json's train_seconds. peak_gib is
# torch.cuda.max_memory_allocated() over the run (reset before each; weights, gradients, optimiser state
# and activations; resident_gib is what was still allocated when the run started, 0 unless a run leaked).
#
# What is left out on purpose: the loop's checkpoint and the artifact (an SDXL full run would write 30 GB of
# optimiser state and a 10 GB pipeline, filling the disk and timing the disk); both are replaced by no-ops in
# this process. The final 1-image, 1-step sample grid still runs.
#
# Covers fp16 and bf16 autocast, gradient checkpointing, and 8-bit AdamW (bitsandbytes) where it imports;
# a configuration that cannot run here prints SKIP with the reason, one that fails prints FAIL (exit 1).
# --budget-s (default 450) skips what would start after that many seconds, so the whole check stays under 8 min.
#
# Python: $PYTHON, else .venv/bin/python, else python3. On a GPU machine that is an environment with a CUDA
# build of torch and genadapt installed (`pip install -e .`, plus `pip install bitsandbytes` for 8-bit AdamW).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
cd "$ROOT"
exec "$PY" - "$@" <<'PYTHON'
import argparse
import dataclasses
import gc
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, "benchmarks")
parser = argparse.ArgumentParser(prog="gpu_check.sh", description="genadapt steps/s and peak memory on SD 1.5- and SDXL-shaped UNets")
parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, one step of each technique, on the CPU")
parser.add_argument("--shapes", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default 12; CPU smoke 1)")
parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2; CPU smoke 0)")
parser.add_argument("--batch-size", type=int, default=None, help="default 1 (CPU smoke 2)")
parser.add_argument("--budget-s", type=float, default=450.0, help="start no configuration after this many seconds")
parser.add_argument("--work", type=Path, default=None, help="folder for the pipelines and runs (default: a temporary one, removed)")
parser.add_argument("--keep", action="store_true", help="keep --work")
args = parser.parse_args()
started = time.perf_counter()

import torch

import gpu_shapes
from genadapt import techniques
from genadapt.api import adapt
from genadapt.config import AdaptConfig
from genadapt.recipes import optim
from genadapt.recipes import train as train_loop

cuda = torch.cuda.is_available() and not args.cpu_smoke
if not cuda and not args.cpu_smoke:
    raise SystemExit("gpu_check.sh: no CUDA device here; run it on a GPU machine, or pass --cpu-smoke for the tiny CPU path")
steps = args.steps or (1 if args.cpu_smoke else 12)
warmup = args.warmup if args.warmup is not None else (0 if args.cpu_smoke else 2)
batch = args.batch_size or (2 if args.cpu_smoke else 1)
shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]

# (shape, --train, --mixed-precision, --gradient-checkpointing, --optimizer)
if args.cpu_smoke:
    CONFIGS = [(shape, *rest, "adamw") for shape in shapes for rest in (("lora", "bf16", True), ("full", "no", False), ("embedding", "bf16", False))]
else:
    CONFIGS = [
        ("sd15", "lora", "no", False, "adamw"),
        ("sd15", "lora", "fp16", False, "adamw"),
        ("sd15", "lora", "bf16", False, "adamw"),
        ("sd15", "lora", "bf16", True, "adamw"),
        ("sd15", "full", "bf16", False, "adamw"),
        ("sd15", "full", "fp16", True, "adamw"),
        ("sd15", "full", "bf16", True, "adamw8bit"),
        ("sd15", "embedding", "bf16", False, "adamw"),
        ("sd15", "embedding", "fp16", True, "adamw"),
        ("sdxl", "lora", "bf16", False, "adamw"),
        ("sdxl", "lora", "fp16", True, "adamw"),
        ("sdxl", "full", "bf16", True, "adamw"),
        ("sdxl", "full", "bf16", True, "adamw8bit"),
        ("sdxl", "embedding", "bf16", True, "adamw"),
    ]
    CONFIGS = [c for c in CONFIGS if c[0] in shapes]

# Step times: the loop calls optimizer.zero_grad once per step, at its end (after the optimiser step, also when
# fp16's scaler skips one); stamp each call after a synchronize.
STAMPS = []
_make_optimizer = optim.make_optimizer


def make_optimizer(*a, **k):
    optimizer = _make_optimizer(*a, **k)
    zero_grad = optimizer.zero_grad

    def stamped(set_to_none: bool = True):  # accelerate reads this signature
        result = zero_grad(set_to_none=set_to_none)
        if cuda:
            torch.cuda.synchronize()
        STAMPS.append(time.perf_counter())
        return result

    optimizer.zero_grad = stamped
    return optimizer


optim.make_optimizer = make_optimizer
train_loop.save_torch = lambda *a, **k: None  # the checkpoint: seconds to minutes of disk, not a step
_get = techniques.get


def get(name, kind, family):
    implementation = _get(name, kind, family)
    if kind != "parameter":
        return implementation

    def build(settings):
        technique = implementation.build(settings)
        technique.save = lambda model, out: []  # the artifact: a whole pipeline for full runs
        return technique

    return dataclasses.replace(implementation, build=build)


techniques.get = get

work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
work.mkdir(parents=True, exist_ok=True)
built = {}
has_bnb = importlib.util.find_spec("bitsandbytes") is not None
device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
print(f"gpu_check: {device_name}, torch {torch.__version__}, steps {steps} (warm-up {warmup}), batch {batch}, "
      f"bitsandbytes {'yes' if has_bnb else 'no'}, work {work}", flush=True)
results, failed = [], 0
try:
    for shape, train, precision, checkpointing, optimizer in CONFIGS:
        label = f"shape={shape} train={train} precision={precision} gc={'on' if checkpointing else 'off'} optimizer={optimizer}"
        if optimizer == "adamw8bit" and not (cuda and has_bnb):
            print(f"SKIP {label} reason=bitsandbytes {'not installed' if not has_bnb else 'needs CUDA'}", flush=True)
            continue
        if precision == "fp16" and not cuda:
            print(f"SKIP {label} reason=fp16 autocast needs a GPU", flush=True)
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"SKIP {label} reason=past --budget-s {args.budget_s:.0f}", flush=True)
            continue
        if shape not in built:
            t0 = time.perf_counter()
            base = gpu_shapes.build(shape, work / shape, tiny=args.cpu_smoke, device="cuda" if cuda else "cpu")
            built[shape] = (base, json.loads((work / shape / "shape.json").read_text()))
            print(f"built {shape}: unet {built[shape][1]['parameters']['unet'] / 1e6:,.1f} M parameters in {time.perf_counter() - t0:.1f} s", flush=True)
        base, info = built[shape]
        out = work / "runs" / label.replace(" ", "_").replace("=", "-")
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        STAMPS.clear()
        t0 = time.perf_counter()
        try:
            adapt(AdaptConfig(
                base=str(base), data=str(work / shape / "data"), train=train, steps=steps, batch_size=batch, mixed_precision=precision,
                gradient_checkpointing=checkpointing, optimizer=optimizer, resolution=info["resolution"], checkpointing_steps=steps,
                num_validation_images=1, sample_steps=1, seed=0, cpu=not cuda, out=str(out),
            ))
        except Exception as exc:  # one configuration's failure (OOM, a missing kernel) is reported, the rest still run
            failed += 1
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"FAIL {label} error={type(exc).__name__}: {first}", flush=True)
            traceback.print_exc(limit=3, file=sys.stderr)
            continue
        wall = time.perf_counter() - t0
        summary = json.loads((out / "summary.json").read_text())
        if warmup >= 1 and len(STAMPS) > warmup:
            rate, timed = (len(STAMPS) - warmup) / (STAMPS[-1] - STAMPS[warmup - 1]), "zero_grad stamps"
        else:
            rate, timed = summary["steps"] / summary["train_seconds"], "train_seconds"
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "n/a"
        extra = f" resident_gib={resident / 2**30:.2f}" if cuda else ""
        print(f"RESULT {label} steps/s={rate:.3f} peak_gib={peak}{extra} run_s={wall:.1f} timed_by={timed.replace(' ', '_')}", flush=True)
        results.append(label)
finally:
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
print(f"gpu_check: {len(results)} ran, {failed} failed, {len(CONFIGS) - len(results) - failed} skipped, {time.perf_counter() - started:.0f} s", flush=True)
sys.exit(1 if failed else 0)
PYTHON
