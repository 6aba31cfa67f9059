"""genadapt's training loop against diffusers' own example scripts: same pipeline, shots, batch, resolution, threads.

    .venv/bin/python benchmarks/peers.py --diffusers-examples DIR --peer-python PATH [--repeats 5] [--steps 10 60]
                                          [--batch-size 4] [--threads 1] [--pairs lora,embedding,full] [--cpu]
    .venv/bin/python benchmarks/peers.py --smoke      # genadapt's side only, one 2-step run of each; prints only

| pair | diffusers example (examples/...) | genadapt |
|---|---|---|
| lora | dreambooth/train_dreambooth_lora.py --rank 4 --pre_compute_text_embeddings | adapt --train lora --rank 4 --instance-prompt (the same prompt) |
| embedding | textual_inversion/textual_inversion.py --num_vectors 1 --initializer_token sign | adapt --train embedding --vectors 1 --init-token sign |
| full | text_to_image/train_text_to_image.py (the UNet; text encoder frozen) | adapt --train full |

Both sides train pocket-sd's pipeline folder (`genadapt.zoo.weights_dir("pocket-sd")`) on the same 10 shots of
builtin:openmoji/flags (written here as PNGs: `images/` for the two scripts that read a bare image folder,
`captioned/` with an imagefolder `metadata.jsonl` for train_text_to_image and genadapt), at resolution 32
(center crop), the same batch, learning rate (1e-4 / 5e-4 / 1e-5), constant schedule, fp32, seed 0, no
validation, no checkpoint inside the timed range, one process, and the same thread count (OMP_NUM_THREADS and
MKL_NUM_THREADS for both; genadapt also gets `--threads` when its --help lists it). What differs is each
side's own design, which is what is measured: genadapt caches the VAE latents of the fixed shots (the
examples encode every batch through the VAE), and caches text embeddings when the text encoder is frozen (the
DreamBooth script does too with --pre_compute_text_embeddings, passed here; train_text_to_image encodes
every step).

**Timing the loop, not start-up.** Each side runs as a fresh process at --steps A and at --steps B (10 and
60); its loop runs at (B − A) / (wall_B − wall_A) steps/s: imports, model loading, data, the final save
and sample cancel. genadapt's own summary.json train_seconds rate is recorded beside it. Pairs are
interleaved: every repeat runs each pair's two sides back to back, alternating which side (and which step
count) goes first, after one untimed warm-up run of each side (pyc files, page cache, the datasets cache).
Reported: the median over --repeats (at least 5) with min–max, and genadapt/peer of the medians (above 1:
genadapt is faster). JSON to benchmarks/results/peers.json; a markdown table is printed.

**The peer environment.** The examples are not in the diffusers wheel, and they import torchvision, which
does not import beside this project's torch 2.13. Make a separate venv (PyPI only) and a diffusers checkout:

    python3.11 -m venv /opt/peers
    /opt/peers/bin/pip install "torch==2.14.1" "torchvision==0.29.1" accelerate transformers peft datasets
    git clone --depth 1 <the diffusers source repository> /opt/diffusers
    /opt/peers/bin/pip install /opt/diffusers    # the examples call check_min_version(<the checkout's version>)
    .venv/bin/python benchmarks/peers.py --diffusers-examples /opt/diffusers/examples --peer-python /opt/peers/bin/python

(no tensorboard in that venv: the examples' default --report_to tensorboard is then skipped by accelerate, as
genadapt logs nothing by default; nothing is downloaded at run time, HF_HUB_OFFLINE=1 for both sides.)
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

SHOTS = "builtin:openmoji/flags?shots=10"
PROMPT = "a picture of a flag"
TOKEN, INIT = "<flag-style>", "sign"  # the initializer must be one token of pocket-sd's vocabulary ("flag" is two)
PAIRS = {
    "lora": {"script": "dreambooth/train_dreambooth_lora.py", "lr": 1e-4},
    "embedding": {"script": "textual_inversion/textual_inversion.py", "lr": 5e-4},
    "full": {"script": "text_to_image/train_text_to_image.py", "lr": 1e-5},
}
NEVER = "100000"  # a checkpoint/save interval no timed run reaches


def write_shots(folder: Path, resolution: int) -> dict[str, Path]:
    """images/ (PNGs only) and captioned/ (PNGs + metadata.jsonl) of the same 10 shots."""
    from PIL import Image

    from genadapt.data import load_dataset

    shots = load_dataset(SHOTS, resolution=resolution)
    folders = {"images": folder / "images", "captioned": folder / "captioned"}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (pixels, caption) in enumerate(zip(shots.pixels, shots.captions)):
        name = f"{index:02d}.png"
        for path in folders.values():
            Image.fromarray(pixels).save(path / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (folders["captioned"] / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folders


def peer_command(pair: str, examples: Path, python: str, base: Path, data: dict, out: Path, steps: int, args) -> list[str]:
    common = [
        "--pretrained_model_name_or_path", str(base), "--output_dir", str(out), "--resolution", str(args.resolution), "--center_crop",
        "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps), "--learning_rate", str(PAIRS[pair]["lr"]),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--mixed_precision", "no",
        "--checkpointing_steps", NEVER, "--dataloader_num_workers", "0",
    ]
    if pair == "lora":
        extra = ["--instance_data_dir", str(data["images"]), "--instance_prompt", PROMPT, "--rank", "4", "--pre_compute_text_embeddings"]
    elif pair == "embedding":
        extra = ["--train_data_dir", str(data["images"]), "--placeholder_token", TOKEN, "--initializer_token", INIT, "--num_vectors", "1",
                 "--save_steps", NEVER]
    else:
        extra = ["--train_data_dir", str(data["captioned"]), "--image_column", "image", "--caption_column", "text", "--max_grad_norm", "1"]
    return [python, str(examples / PAIRS[pair]["script"]), *common, *extra]


def genadapt_command(pair: str, base: Path, data: dict, out: Path, steps: int, args, threads_flag: bool) -> list[str]:
    command = [
        sys.executable, "-m", "genadapt", "adapt", "--base", str(base), "--data", str(data["captioned"]), "--train", pair,
        "--resolution", str(args.resolution), "--batch-size", str(args.batch_size), "--steps", str(steps), "--lr", str(PAIRS[pair]["lr"]),
        "--lr-scheduler", "constant", "--seed", "0", "--checkpointing-steps", str(steps), "--num-validation-images", "1", "--sample-steps", "1",
        "--out", str(out),
    ]
    if pair == "lora":
        command += ["--rank", "4", "--instance-prompt", PROMPT]
    elif pair == "embedding":
        command += ["--token", TOKEN, "--init-token", INIT, "--vectors", "1"]
    if args.cpu:
        command += ["--cpu"]
    if threads_flag:
        command += ["--threads", str(args.threads)]
    return command


def child_env(args, scratch: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(scratch / "hf-home"), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_timed(command: list[str], out: Path, env: dict, timeout: float, what: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # genadapt resumes an existing run folder; the examples would mix outputs
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {done.returncode}:\n  {' '.join(command)}\n{done.stderr[-4000:]}")
    record = {"wall_seconds": wall}
    summary = out / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        record["train_seconds"] = data.get("train_seconds")
    shutil.rmtree(out, ignore_errors=True)
    return record


def side_rate(walls: dict[int, dict]) -> float | None:
    """(B − A) / (wall_B − wall_A) from the runs at two step counts; None with one count or a non-positive difference."""
    if len(walls) < 2:
        return None
    short, long = min(walls), max(walls)
    difference = walls[long]["wall_seconds"] - walls[short]["wall_seconds"]
    return (long - short) / difference if difference > 0 else None


def spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(stats: dict) -> str:
    if stats["median"] is None:
        return "–"
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})" if stats["n"] > 1 else f"{stats['median']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-examples", type=Path, default=None, help="a diffusers checkout's examples/ folder")
    parser.add_argument("--peer-python", default=None, help="python of a venv with torch 2.14.1, torchvision 0.29.1, diffusers, accelerate, transformers, peft, datasets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 60], metavar=("A", "B"), help="the two step counts whose difference is timed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--cpu", action="store_true", help="both sides on the CPU even where a GPU is present")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one child run may take")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="genadapt's side only, one 2-step run of each pair; prints only")
    args = parser.parse_args()

    pairs = [p for p in args.pairs.split(",") if p]
    for pair in pairs:
        if pair not in PAIRS:
            raise SystemExit(f"--pairs {pair}: choose from {', '.join(PAIRS)}")
    if not args.smoke:
        needed = []
        scripts = [PAIRS[p]["script"] for p in pairs if args.diffusers_examples is None or not (args.diffusers_examples / PAIRS[p]["script"]).is_file()]
        if scripts:
            needed.append(f"--diffusers-examples DIR (a diffusers checkout's examples/ folder, with {', '.join(scripts)})")
        if not args.peer_python or not (Path(args.peer_python).is_file() and os.access(args.peer_python, os.X_OK)):
            needed.append("--peer-python PATH (a venv's python with torch 2.14.1 + torchvision 0.29.1 + diffusers, accelerate, "
                          "transformers, peft, datasets)")
        if needed:
            raise SystemExit(f"pass {' and '.join(needed)}; see benchmarks/peers.py's docstring, or --smoke for genadapt's side alone")
        if args.repeats < 5:
            print(f"note: --repeats {args.repeats}: fewer than the 5 the comparison is meant to have", file=sys.stderr)
        if args.steps[0] >= args.steps[1]:
            raise SystemExit(f"--steps {args.steps[0]} {args.steps[1]}: the second count must be larger")

    from genadapt.zoo import weights_dir

    base = weights_dir("pocket-sd")
    help_text = subprocess.run([sys.executable, "-m", "genadapt", "adapt", "--help"], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    threads_flag = "--threads" in help_text
    scratch = Path(tempfile.mkdtemp(prefix="peers-"))
    env = child_env(args, scratch)
    counts = [2] if args.smoke else list(args.steps)
    repeats = 1 if args.smoke else args.repeats
    sides = ["genadapt"] if args.smoke else ["peer", "genadapt"]
    samples = {pair: {side: [] for side in sides} for pair in pairs}
    try:
        data = write_shots(scratch / "shots", args.resolution)

        def command(side: str, pair: str, steps: int, out: Path) -> list[str]:
            if side == "peer":
                return peer_command(pair, args.diffusers_examples, args.peer_python, base, data, out, steps, args)
            return genadapt_command(pair, base, data, out, steps, args, threads_flag)

        if not args.smoke:
            for pair in pairs:  # untimed warm-up of each side
                for side in sides:
                    run_timed(command(side, pair, 1, scratch / "warmup"), scratch / "warmup", env, args.timeout, f"{pair} {side} warm-up")
        for repeat in range(repeats):
            for pair in pairs:
                order = sides if repeat % 2 == 0 else sides[::-1]
                for side in order:
                    walls = {}
                    for steps in (counts if repeat % 2 == 0 else counts[::-1]):
                        out = scratch / f"{pair}-{side}-{steps}"
                        walls[steps] = run_timed(command(side, pair, steps, out), out, env, args.timeout, f"{pair} {side} {steps} steps")
                    long = max(walls)
                    trained = walls[long].get("train_seconds")
                    sample = {"repeat": repeat + 1, "runs": {str(k): v for k, v in walls.items()}, "steps_per_second": side_rate(walls),
                              "summary_steps_per_second": long / trained if trained else None}
                    samples[pair][side].append(sample)
                    rate = sample["steps_per_second"] or sample["summary_steps_per_second"]
                    print(f"[{repeat + 1}/{repeats}] {pair:9s} {side:8s} {rate:.2f} steps/s "
                          f"({', '.join(str(k) + ' steps ' + format(v['wall_seconds'], '.1f') + ' s' for k, v in sorted(walls.items()))})", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    for pair in pairs:
        row = {"pair": pair, "peer_script": f"examples/{PAIRS[pair]['script']}"}
        for side in sides:
            row[side] = spread([s["steps_per_second"] for s in samples[pair][side]])
        row["genadapt_summary"] = spread([s["summary_steps_per_second"] for s in samples[pair]["genadapt"]])
        if "peer" in sides and row["peer"]["median"] and row["genadapt"]["median"]:
            row["ratio"] = row["genadapt"]["median"] / row["peer"]["median"]
            per_repeat = [g["steps_per_second"] / p["steps_per_second"] for g, p in zip(samples[pair]["genadapt"], samples[pair]["peer"])
                          if g["steps_per_second"] and p["steps_per_second"]]
            row["ratio_per_repeat"] = spread(per_repeat)
        rows.append(row)

    how = f"steps {counts[0]} and {counts[1]}, difference of wall times" if len(counts) == 2 else f"one {counts[0]}-step run, summary.json train_seconds"
    print(f"\npocket-sd, 10 shots, batch {args.batch_size}, {args.resolution} px, {args.threads} thread(s); {how}; median (min–max) of {repeats}\n")
    print("| pair | diffusers example | example steps/s | genadapt steps/s | genadapt/example | genadapt steps/s (train_seconds) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        peer = fmt(row["peer"]) if "peer" in row else "not run"
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "–"
        print(f"| {row['pair']} | `{row['peer_script']}` | {peer} | {fmt(row['genadapt'])} | {ratio} | {fmt(row['genadapt_summary'])} |")
    if args.smoke:
        print("\n(smoke run: genadapt's side only, nothing saved)")
        return
    peer_versions = subprocess.run(
        [args.peer_python, "-c", "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
         "('torch', 'torchvision', 'diffusers', 'accelerate', 'transformers', 'peft', 'datasets')}))"],
        capture_output=True, text=True).stdout.strip()
    from genadapt.runs import versions

    record = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores",
        "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:]),
        "settings": {"shots": SHOTS, "batch_size": args.batch_size, "resolution": args.resolution, "threads": args.threads, "steps": counts,
                     "repeats": repeats, "cpu": args.cpu, "genadapt_threads_flag": threads_flag},
        "versions": {"genadapt_side": versions(), "peer_side": json.loads(peer_versions) if peer_versions else None},
        "rows": rows, "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(record, indent=2))
    print(f"\nsaved {args.out / 'peers.json'}")


if __name__ == "__main__":
    main()
