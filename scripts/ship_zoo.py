"""Maintainers' step: copy a finished pretraining run into the package, measure it, write its card.

    python scripts/ship_zoo.py NAME RUN_DIR --train-minutes M
    python scripts/ship_zoo.py NAME RUN_DIR --measure-only [--reference SPEC]   # measure a run or the shipped model, copy nothing

Copies the run's shipped folder to src/genadapt/zoo/weights/NAME (pocket-sd's UNet and VAE as
fp16, which diffusers loads back as fp32), measures the generators' quality in the eval encoder's
feature space against OpenMoji source images, and writes card.json, README.md and a sample grid
under docs/zoo/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import date
from pathlib import Path

import torch
import yaml

from genadapt import zoo
from genadapt.data import load_dataset
from genadapt.eval import metrics
from genadapt.eval.features import cached_features, get_extractor
from genadapt.grid import save_grid

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "zoo"
LICENSE = "weights: CC BY-SA 4.0 (trained on OpenMoji, CC BY-SA 4.0); code: Apache-2.0"
SUMMARIES = {
    "pocket-sd": "Stable Diffusion in miniature (VAE + CLIP text encoder + cross-attention UNet), 32x32, text-to-image",
    "pocket-stylegan2": "StyleGAN2 (rosinality layout), 32x32, unconditional",
    "eval-encoder": "CNN image encoder (SimCLR + group classification): the default feature space for metrics",
}


def to_fp16(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def copy_model(name: str, run: Path) -> Path:
    _, _, shipped = zoo.MODELS[name]
    destination = zoo.WEIGHTS / name
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(run / shipped, destination)
    if name == "pocket-sd":
        for file in ("vocab.json", "merges.txt", "special_tokens_map.json"):  # CLIP's on-disk format
            shutil.copy2(run / "tokenizer" / file, destination / "tokenizer" / file)
        # transformers keeps a checkpoint's dtype, so the text encoder stays fp32 (it is small).
        for part in ("unet", "vae"):
            to_fp16(destination / part)
    if name == "pocket-stylegan2":
        (destination / "generator.safetensors").unlink(missing_ok=True)  # adaptation starts from G_ema
        to_fp16(destination)
    return destination


def parameter_count(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for path in folder.rglob("*.safetensors") for t in load_file(path).values())


def reference_for(config: dict, given: str | None = None) -> tuple[str, str]:
    """(data spec, role): `given`, else the held-out source images when pretraining left some out, else the training split."""
    if given:
        trained_on = config.get("data", "")
        seen = given == trained_on or (trained_on == "builtin:openmoji/source" and given.startswith(trained_on + "/"))
        return given, "seen in pretraining" if seen else "held out: never seen in pretraining"
    if config.get("data") == "builtin:openmoji/source/train":
        return "builtin:openmoji/source/reference", "held out: never seen in pretraining"
    return "builtin:openmoji/source", "the model's own training split"


def generate(name: str, folder: Path, n: int, prompts: list[str], seed: int = 0):
    """n samples of a generator; pocket-sd takes `prompts` cycled (GANs ignore them)."""
    if name == "pocket-sd":
        from genadapt.families import diffusion

        model = diffusion.load(str(folder))
        cycled = [prompts[i % len(prompts)] for i in range(n)]
        return diffusion.sample(model, cycled, steps=25, guidance=4.0, seed=seed, progress=True), cycled
    from genadapt.families.stylegan2 import load_stylegan2, sample

    g_ema, _, _ = load_stylegan2(folder)
    return sample(g_ema, n, seed), None


def quality(name: str, folder: Path, n: int, config: dict, given: str | None = None) -> tuple[dict, torch.Tensor, list | None]:
    """KID/FID/precision/recall in the eval encoder's space. pocket-sd is prompted with the reference
    images' own captions (in a seeded order), so that content is matched and only quality differs."""
    extractor = get_extractor("pocket")
    spec, role = reference_for(config, given)
    reference = load_dataset(spec)
    order = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
    images, prompts = generate(name, folder, n, [reference.captions[i] for i in order])
    feats_fake = cached_features(extractor, images.clamp(-1, 1))
    feats_real = cached_features(extractor, reference)
    result = {
        "samples": n,
        "reference": f"{spec} ({len(reference)} images; {role})",
        "features": extractor.extractor_id,
        "kid": metrics.kid_with_ci(feats_fake, feats_real),
        "fid": metrics.fid_with_ci(feats_fake, feats_real),
        "precision_recall": metrics.precision_recall(feats_real, feats_fake),
    }
    # Scale: what real source images of the same count score against it (from source/train when the
    # reference is held out; otherwise a subset of the reference itself, which biases this floor low).
    others = load_dataset("builtin:openmoji/source/train" if spec.endswith("/reference") else spec)
    feats_others = cached_features(extractor, others)
    subset = feats_others[torch.randperm(len(feats_others), generator=torch.Generator().manual_seed(1))[:n]]
    result["real_images_same_n"] = {
        "images": f"{min(n, len(others))} of {others.name}",
        "kid": metrics.kid_with_ci(subset, feats_real),
        "fid": metrics.fid(subset, feats_real),
    }
    return result, images, prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=list(zoo.MODELS))
    parser.add_argument("run", type=Path)
    parser.add_argument("--train-minutes", type=float, help="wall time of the pretraining run (required to ship)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--measure-only", action="store_true", help="measure RUN_DIR's model (or a shipped folder with card.json) and print; copy nothing")
    parser.add_argument("--reference", help="with --measure-only: the images to measure against (a builtin spec)  [default: as the card's]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.reference and not args.measure_only:
        parser.error("--reference is for --measure-only; a card is measured against the split its config implies")
    if args.measure_only and args.train_minutes is not None:
        parser.error("--train-minutes is for shipping; --measure-only writes no card")
    if args.measure_only:
        shipped = (args.run / "card.json").is_file()
        folder = args.run if shipped else args.run / zoo.MODELS[args.name][2]
        config = json.loads((args.run / "card.json").read_text())["config"] if shipped else yaml.safe_load((args.run / "config.yaml").read_text())
        result, _, _ = quality(args.name, folder, args.samples, config, args.reference)
        print(json.dumps(result, indent=2, default=str))
        return
    if args.train_minutes is None:
        parser.error("--train-minutes is required to ship (the card records the pretraining's wall time)")

    folder = copy_model(args.name, args.run)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    manifest = json.loads((args.run / "manifest.json").read_text())
    card = {
        "name": args.name,
        "summary": SUMMARIES[args.name],
        "parameters": parameter_count(folder),
        "resolution": 32,
        "training_data": {role: {"name": d["name"], "count": d["count"], "sha256": d["sha256"]} for role, d in manifest["data"].items()},
        "training_wall_minutes": args.train_minutes,
        "machine": "2-core x86 CPU (shared with other jobs), no GPU",
        "license": LICENSE,
        "reproduce": f"genadapt pretrain {args.name} --out DIR",
        "config": config,
        "versions": manifest["versions"],
        "shipped": str(date.today()),
    }
    DOCS.mkdir(parents=True, exist_ok=True)
    if args.name == "eval-encoder":
        card["quality"] = json.loads((args.run / "metrics.json").read_text())
    else:
        card["quality"], images, prompts = quality(args.name, folder, args.samples, config)
        grid = save_grid(images[:64], DOCS / f"{args.name}-samples.png", columns=8, scale=3)
        card["sample_grid"] = str(grid.relative_to(ROOT))
        if prompts:
            card["sample_prompts"] = prompts[:64]
    (folder / "card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    print(json.dumps({k: card[k] for k in ("name", "parameters", "quality")}, indent=2, default=str)[:3000])


if __name__ == "__main__":
    main()
