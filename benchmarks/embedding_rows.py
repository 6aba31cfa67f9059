"""What training only the placeholder rows saves: textual inversion on an SD 1.5-shaped text encoder (random weights,
CLIP ViT-L/14's text config: 49,408 x 768 token table, 12 layers), the whole-table way (diffusers' textual_inversion.py
trains the input embedding and restores the old rows after each step; genadapt before `PlaceholderRows` masked the
table's gradient) beside genadapt's `PlaceholderRows`, in one process, interleaved.

    .venv/bin/python benchmarks/embedding_rows.py [--steps 6] [--repeats 3] [--layers 12]

One step: encode a batch of 4 prompts holding 2 placeholder vectors, a loss on the hidden states (the UNet, the
same for both, is left out), backward, AdamW. Prints per-step seconds (median over repeats), what the optimiser holds,
and the checkpoint's trainable tensor bytes; writes benchmarks/results/embedding_rows.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def encoder(layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                            num_attention_heads=12, max_position_embeddings=77)
    model = CLIPTextModel(config).requires_grad_(False)
    model.resize_token_embeddings(49410)  # two placeholder vectors, as `--vectors 2`
    return model


def setup(way: str, layers: int):
    from genadapt.techniques.embedding import PlaceholderRows

    model = encoder(layers)
    ids = [49408, 49409]
    if way == "rows":
        model.set_input_embeddings(PlaceholderRows(model.get_input_embeddings(), ids))
        parameters = [model.get_input_embeddings().rows]
    else:
        weight = model.get_input_embeddings().weight
        mask = torch.zeros(weight.shape[0], 1)
        mask[ids] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad: grad * mask)
        parameters = [weight]
    optimizer = torch.optim.AdamW(parameters, lr=5e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49408, (4, 77), generator=generator)
    tokens[:, 1:3] = torch.tensor(ids)
    return model, parameters, optimizer, tokens


def step(model, optimizer, tokens) -> None:
    hidden = model(tokens).last_hidden_state
    loss = hidden.pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ways = {way: setup(way, args.layers) for way in ("table", "rows")}
    for model, _, optimizer, tokens in ways.values():
        step(model, optimizer, tokens)  # warm-up: allocations, optimiser state
    seconds = {way: [] for way in ways}
    for _ in range(args.repeats):
        for way, (model, _, optimizer, tokens) in ways.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step(model, optimizer, tokens)
            seconds[way].append((time.perf_counter() - started) / args.steps)
    rows = {}
    for way, (model, parameters, optimizer, _) in ways.items():
        held = sum(p.numel() for p in parameters)
        rows[way] = {"seconds_per_step": statistics.median(seconds[way]), "min": min(seconds[way]), "max": max(seconds[way]),
                     "optimiser_values": held, "optimiser_state_bytes": 2 * 4 * held, "checkpoint_trainable_bytes": 4 * held}
    print(f"SD 1.5-shaped text encoder ({args.layers} layers), batch 4, 1 thread, median of {args.repeats} x {args.steps} steps\n")
    print("| way | s/step [min, max] | values the optimiser holds | Adam state | trainable bytes per checkpoint |\n|---|---|---|---|---|")
    for way, row in rows.items():
        print(f"| {way} | {row['seconds_per_step']:.3f} [{row['min']:.3f}, {row['max']:.3f}] | {row['optimiser_values']:,} | "
              f"{row['optimiser_state_bytes'] / 1e6:.1f} MB | {row['checkpoint_trainable_bytes'] / 1e6:.2f} MB |")
    print(f"\nspeed-up: {rows['table']['seconds_per_step'] / rows['rows']['seconds_per_step']:.2f}x")
    out = ROOT / "benchmarks" / "results" / "embedding_rows.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "layers": args.layers, "steps": args.steps, "repeats": args.repeats, "rows": rows}, indent=2))
    print(out)


if __name__ == "__main__":
    main()
