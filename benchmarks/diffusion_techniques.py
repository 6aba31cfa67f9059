"""Speed, memory and size of each diffusion technique on pocket-sd, 10 shots of a held-out domain.

    .venv/bin/python benchmarks/diffusion_techniques.py [--steps 40] [--out benchmarks/results]

Each technique trains in its own child process (so peak RSS is its own), with the same data,
seed and steps; plus a same-process comparison of cached latents against encoding through the
VAE at every step (what diffusers' and kohya's scripts do without --cache_latents).
Prints a markdown table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

TECHNIQUES = {
    "full": {"train": "full"},
    "freeze (attention)": {"train": "freeze", "preset": "attention"},
    "lora r4": {"train": "lora", "rank": 4},
    "embedding (2 vectors)": {"train": "embedding", "vectors": 2},
    "full + ewc": {"train": "full", "loss": ["ewc"], "ewc_samples": 16},
    "full + relational": {"train": "full", "loss": ["relational"]},
    "lora + prior": {"train": "lora", "loss": ["prior"], "num_class_images": 16},
}

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from genadapt.api import adapt
from genadapt.config import AdaptConfig
values = json.loads(sys.argv[1])
adapt(AdaptConfig(**values))
summary = json.load(open(values["out"] + "/summary.json"))
summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT" + json.dumps(summary))
"""


def run_technique(name: str, extra: dict, steps: int, out: Path) -> dict:
    values = {
        "base": "pocket-sd", "data": "builtin:openmoji/flags", "shots": 10, "seed": 0, "steps": steps,
        "batch_size": 4, "checkpointing_steps": steps, "num_validation_images": 1, "sample_steps": 1,
        "out": str(out / name.replace(" ", "_").replace("(", "").replace(")", "")), **extra,
    }
    shutil.rmtree(values["out"], ignore_errors=True)  # a resumed run would time nothing
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(values)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.split("RESULT", 1)[1])
    return {
        "technique": name,
        "steps_per_second": steps / summary["train_seconds"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "trainable_parameters": summary["trainable_parameters"],
        "artifact_bytes": summary["artifact_bytes"],
    }


def cached_vs_on_the_fly(steps: int) -> dict:
    """Seconds per LoRA step with latents cached once vs encoded by the VAE every step."""
    import torch

    from genadapt.data import load_dataset
    from genadapt.families import diffusion
    from genadapt.techniques.lora import LoRA

    torch.set_num_threads(1)
    model = diffusion.load("pocket-sd")
    LoRA(rank=4).prepare(model)
    images = load_dataset("builtin:openmoji/flags", shots=10, seed=0).tensors()
    text = diffusion.encode_text(model, diffusion.tokenize(model, ["flag"] * 4)).detach()
    optimizer = torch.optim.AdamW([p for p in model.unet.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    mean, std = diffusion.encode_images(model, images)
    timings = {}
    for mode in ("cached", "on_the_fly"):
        started = time.perf_counter()
        for _ in range(steps):
            index = torch.randint(len(images), (4,), generator=generator)
            if mode == "cached":
                latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * model.vae.config.scaling_factor
            else:
                with torch.no_grad():
                    latents = model.vae.encode(images[index]).latent_dist.sample(generator) * model.vae.config.scaling_factor
            noisy, noise, timesteps = diffusion.add_noise(model, latents.contiguous(), generator)
            loss = diffusion.denoise_loss(diffusion.predict(model, model.unet, noisy, timesteps, text), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        timings[mode] = (time.perf_counter() - started) / steps
    timings["speedup"] = timings["on_the_fly"] / timings["cached"]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    scratch = args.out / "diffusion_runs"
    rows = [run_technique(name, extra, args.steps, scratch) for name, extra in TECHNIQUES.items()]
    caching = cached_vs_on_the_fly(args.steps)
    record = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} {platform.processor() or ''}, 2 cores, 1 torch thread".strip(),
        "command": f"python benchmarks/diffusion_techniques.py --steps {args.steps}",
        "rows": rows,
        "latent_cache": caching,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diffusion_techniques.json").write_text(json.dumps(record, indent=2))
    print("| technique | steps/s | peak RSS (MB) | trainable params | artifact |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['technique']} | {row['steps_per_second']:.2f} | {row['peak_rss_mb']:.0f} | {row['trainable_parameters']:,} | {row['artifact_bytes'] / 1e3:,.1f} KB |")
    print(f"\nlatents cached once: {caching['cached'] * 1000:.0f} ms/step; encoded every step: {caching['on_the_fly'] * 1000:.0f} ms/step ({caching['speedup']:.2f}x)")


if __name__ == "__main__":
    main()
