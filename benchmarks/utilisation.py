"""How much of the CPU's matmul peak a pocket-sd training step reaches, and where a step's time goes.

    .venv/bin/python benchmarks/utilisation.py [--threads 1] [--batch-size 16] [--steps 20]
    .venv/bin/python benchmarks/utilisation.py --smoke     # small matrices, batch 4, 2 steps; prints only

All in one process, in this order:

1. **Peak**: fp32 `torch.mm` of two NxN matrices (N = 2048), best of a few, at one thread, at --threads and at
   every core: 2N³ / seconds, in GFLOP/s. This is the ceiling the step is compared with (the same thread count).
2. **FLOPs per step**: one forward + backward of the step the loop runs (`recipes/train.py`: cached latents,
   posterior sample, `diffusion.add_noise`, the UNet through `diffusion.predict`, `train.denoise_term`; the text
   encoder too when the technique trains through it, as textual inversion does), built from genadapt's own
   functions and the technique from the registry (`prepare`, `caption`, `parameters`), counted by
   `torch.utils.flop_counter.FlopCounterMode` at --batch-size. The counter knows matmuls and convolutions (which
   is what a peak compares with) and not elementwise ops, norms or the optimiser. CPU attention is counted
   through SDPA's math kernel (the flash kernel torch picks on CPUs is not in the counter's table; the math
   kernel does the same bmm FLOPs).
3. **Time per step**, two ways: the same replicated step with the optimiser (clip, AdamW, zero_grad), timed
   over a few steps after a warm-up ("bare"); and the real loop, `genadapt.api.adapt` at --steps and at a few
   steps, from summary.json's train_seconds: (t_long − t_short) / (steps_long − steps_short), which cancels the
   first step's warm-up and the checkpoint the loop writes at its last step ("loop"). Achieved GFLOP/s =
   FLOPs per step / seconds per step, and its fraction of the peak at the same thread count.
4. **Profile**: `torch.profiler` over one step (after a warm-up step) of LoRA, embedding and full, top ops
   by self CPU time, saved as text.

Techniques: full fine-tuning, LoRA (rank 4, attention projections) and textual inversion (1 vector), each at
--batch-size (default 16) on 10 shots of builtin:openmoji/flags. Threads: --threads N sets torch's pool here
and reaches genadapt's loop as GENADAPT_THREADS (what `genadapt adapt --threads N` sets).

Saves benchmarks/results/utilisation.json and benchmarks/results/utilisation_profiles.txt (not with --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

DATA = "builtin:openmoji/flags"
TECHNIQUES = {"full": {}, "lora": {"rank": 4}, "embedding": {"vectors": 1}}


def matmul_peak(threads: int, n: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up: packing buffers, thread pool
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - started)
    flops = 2 * n ** 3
    return {"threads": threads, "n": n, "repeats": repeats, "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


class ReplicatedStep:
    """The loop's training step on pocket-sd, from genadapt's functions (see the module docstring)."""

    def __init__(self, technique_name: str, batch: int, out: Path):
        from genadapt import techniques
        from genadapt.config import AdaptConfig
        from genadapt.data import load_dataset
        from genadapt.families import diffusion
        from genadapt.recipes import optim

        self.diffusion = diffusion
        self.config = AdaptConfig(base="pocket-sd", data=DATA, shots=10, seed=0, train=technique_name, batch_size=batch, out=str(out),
                                  **TECHNIQUES[technique_name])
        self.model = model = diffusion.load("pocket-sd")
        images = load_dataset(DATA, resolution=model.resolution, shots=10, seed=0)
        torch.manual_seed(0)
        self.technique = techniques.get(technique_name, "parameter", "diffusion").build(self.config.section(technique_name))
        self.technique.prepare(model)
        captions = [self.technique.caption(c) if hasattr(self.technique, "caption") else c for c in images.captions]
        self.mean, self.std = diffusion.encode_images(model, images.tensors())
        self.token_ids = diffusion.tokenize(model, captions)
        self.trains_text = any(p.requires_grad for name, p in model.named_parameters() if name.startswith("text_encoder"))
        self.cached_text = None
        if not self.trains_text:
            with torch.no_grad():
                self.cached_text = diffusion.encode_text(model, self.token_ids)
        self.parameters = self.technique.parameters(model)
        self.optimizer = optim.make_optimizer(self.config.optimizer, self.parameters, self.config.lr, self.technique.weight_decay)
        self.batch = batch
        self.generator = torch.Generator().manual_seed(0)
        self.scale = model.vae.config.scaling_factor
        self.unet = model.unet

    def use(self, variant: str) -> None:
        """A candidate speed-up, for --variants: channels_last weights, or the UNet through torch.compile."""
        if variant == "channels_last":
            self.model.unet.to(memory_format=torch.channels_last)
        elif variant == "compile":
            self.unet = torch.compile(self.model.unet)
        elif variant == "fused_adamw":
            self.optimizer = torch.optim.AdamW(self.parameters, lr=self.config.lr, weight_decay=self.technique.weight_decay, fused=True)
        else:
            raise SystemExit(f"--variants {variant}: choose channels_last, compile or fused_adamw")

    def forward_backward(self) -> torch.Tensor:
        from genadapt.recipes.train import denoise_term

        diffusion, model, g = self.diffusion, self.model, self.generator
        index = torch.randint(len(self.mean), (self.batch,), generator=g)
        latents = (self.mean[index] + self.std[index] * torch.randn(self.mean[index].shape, generator=g)) * self.scale
        noisy, noise, timesteps = diffusion.add_noise(model, latents, g)
        text = self.cached_text[index] if self.cached_text is not None else diffusion.encode_text(model, self.token_ids[index])
        prediction = diffusion.predict(model, self.unet, noisy, timesteps, text)
        loss = denoise_term(model, prediction, diffusion.target_for(model, latents, noise, timesteps), timesteps, None)
        loss.backward()
        return loss

    def step(self) -> None:
        self.forward_backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def count_flops(self) -> dict:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            self.forward_backward()
        self.optimizer.zero_grad(set_to_none=True)
        by_op = {str(op).replace("aten.", ""): int(count) for op, count in counter.get_flop_counts()["Global"].items()}
        return {"flops": int(counter.get_total_flops()), "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}

    def time_steps(self, steps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            self.step()
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - started) / steps

    def profile(self, rows: int) -> str:
        from torch.profiler import ProfilerActivity, profile

        self.step()  # warm-up outside the trace
        with profile(activities=[ProfilerActivity.CPU]) as trace:
            self.step()
        return trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def loop_seconds_per_step(technique_name: str, batch: int, short: int, long: int, threads: int, scratch: Path) -> dict:
    """Seconds per step of the real loop, from two runs' train_seconds (see the module docstring)."""
    from genadapt.api import adapt
    from genadapt.config import AdaptConfig

    os.environ["GENADAPT_THREADS"] = str(threads)  # the loop's use_cpu() reads it, as `genadapt adapt --threads N` sets it
    seconds = {}
    for steps in (short, long):
        out = scratch / f"{technique_name}-{steps}"
        adapt(AdaptConfig(base="pocket-sd", data=DATA, shots=10, seed=0, train=technique_name, batch_size=batch, steps=steps,
                          checkpointing_steps=steps, num_validation_images=1, sample_steps=1, out=str(out), **TECHNIQUES[technique_name]))
        seconds[steps] = json.loads((out / "summary.json").read_text())["train_seconds"]
    torch.set_num_threads(threads)
    return {"short_steps": short, "long_steps": long, "train_seconds": {str(k): v for k, v in seconds.items()},
            "seconds_per_step": (seconds[long] - seconds[short]) / (long - short), "seconds_per_step_naive": seconds[long] / long}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="the long loop run (the short one is 5 steps)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="256x256 matmuls, batch 4, loop runs of 1 and 2 steps; prints only")
    parser.add_argument("--variants", default="", help="comma-separated candidate speed-ups timed on the bare step beside the plain one: channels_last, compile, fused_adamw")
    args = parser.parse_args()
    if args.smoke:
        size, repeats, batch, short, long, bare_steps, rows = 256, 2, 4, 1, 2, 2, 8
    else:
        size, repeats, batch, short, long, bare_steps, rows = args.matmul_size, 5, args.batch_size, 5, max(args.steps, 6), 10, 25
    torch.set_flush_denormal(True)  # as the loop (runs.use_cpu)
    cores = len(os.sched_getaffinity(0))

    peaks = {}
    for threads in sorted({1, args.threads, cores}):
        peaks[threads] = matmul_peak(threads, size, repeats)
        print(f"peak fp32 mm {size}x{size}, {threads} thread(s): {peaks[threads]['best_gflops']:.1f} GFLOP/s (median {peaks[threads]['median_gflops']:.1f})",
              file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    peak = peaks[args.threads]["best_gflops"]

    rows_out, profiles = [], []
    with tempfile.TemporaryDirectory(prefix="utilisation-") as scratch:
        scratch = Path(scratch)
        for name in TECHNIQUES:
            step = ReplicatedStep(name, batch, scratch / f"{name}-replica")
            flops = step.count_flops()
            bare = step.time_steps(bare_steps)
            profiles.append(f"== {name}, batch {batch}, {args.threads} thread(s): one step (forward, backward, clip, AdamW, zero_grad)\n{step.profile(rows)}")
            del step
            variants = {}
            for variant in filter(None, args.variants.split(",")):
                candidate = ReplicatedStep(name, batch, scratch / f"{name}-{variant}")
                candidate.use(variant)
                variants[variant] = candidate.time_steps(bare_steps, warmup=3 if variant == "compile" else 2)
                print(f"{name} {variant}: bare {variants[variant] * 1000:.0f} ms/step (plain {bare * 1000:.0f})", file=sys.stderr, flush=True)
                del candidate
            loop = loop_seconds_per_step(name, batch, short, long, args.threads, scratch)
            row = {
                "technique": name, "batch_size": batch, "threads": args.threads,
                "gflop_per_step": flops["flops"] / 1e9, "flops_by_op": flops["by_op"],
                "bare_seconds_per_step": bare, "bare_gflops": flops["flops"] / bare / 1e9, "bare_fraction_of_peak": flops["flops"] / bare / 1e9 / peak,
                "bare_seconds_per_step_variants": variants, "loop": loop, "loop_gflops": flops["flops"] / loop["seconds_per_step"] / 1e9 if loop["seconds_per_step"] > 0 else None,
            }
            row["loop_fraction_of_peak"] = row["loop_gflops"] / peak if row["loop_gflops"] else None
            rows_out.append(row)
            print(f"{name}: {row['gflop_per_step']:.2f} GFLOP/step, bare {bare * 1000:.0f} ms/step, loop {loop['seconds_per_step'] * 1000:.0f} ms/step",
                  file=sys.stderr, flush=True)

    print(f"\npocket-sd, batch {batch}, {args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}; peak {peak:.1f} GFLOP/s (fp32 mm {size}x{size}, best of {repeats})\n")
    print("| technique | GFLOP/step (fwd+bwd) | bare ms/step | bare GFLOP/s | of peak | loop ms/step | loop GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows_out:
        loop_ms = row["loop"]["seconds_per_step"] * 1000
        loop_rate = f"{row['loop_gflops']:.1f} | {row['loop_fraction_of_peak']:.1%}" if row["loop_gflops"] else "– | –"
        print(f"| {row['technique']} | {row['gflop_per_step']:.2f} | {row['bare_seconds_per_step'] * 1000:.0f} | {row['bare_gflops']:.1f} | "
              f"{row['bare_fraction_of_peak']:.1%} | {loop_ms:.0f} | {loop_rate} |")
    text = "\n\n".join(profiles)
    if args.smoke:
        print("\n" + text + "\n\n(smoke run: nothing saved)")
        return
    record = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {cores} cores usable",
        "command": "python benchmarks/utilisation.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 and AVX512 hosts differ 2x in oneDNN convolutions
        "peak": {str(k): v for k, v in peaks.items()}, "peak_gflops_at_threads": peak,
        "rows": rows_out,
        "notes": "FLOPs: FlopCounterMode over one forward+backward (matmul/conv/bmm only; SDPA counted through the math kernel); "
                 "bare: the replicated step with clip+AdamW; loop: genadapt.api.adapt, difference of two runs' train_seconds.",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "utilisation.json").write_text(json.dumps(record, indent=2))
    (args.out / "utilisation_profiles.txt").write_text(text + "\n")
    print(f"\nsaved {args.out / 'utilisation.json'} and {args.out / 'utilisation_profiles.txt'}")


if __name__ == "__main__":
    main()
