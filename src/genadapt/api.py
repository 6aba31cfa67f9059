"""The Python surface the CLI wraps: adapt(), sample(), evaluate(), compare(), distill()."""

from __future__ import annotations

from pathlib import Path

from genadapt.config import AdaptConfig
from genadapt.errors import UserError


def adapt(config: AdaptConfig | None = None, **values) -> Path:
    """Adapt a pretrained generator to a small image set; returns the run folder.

    >>> adapt(base="pocket-sd", data="builtin:openmoji/flags?shots=10", train="lora", steps=200, out="runs/flags-lora")
    >>> adapt(base="pocket-stylegan2", data="builtin:openmoji/flags?shots=10", train="freeze", freeze_d=2, loss=["cdc"], out="runs/flags-cdc")
    """
    from genadapt import recipes

    config = config or AdaptConfig(**values)
    recipes.adapt(config)
    return Path(config.out)


def load_run_model(run_or_model: str, loras: list[tuple[str, float]] | None = None):
    """A run folder's adapted model or a base, with diffusion LoRA runs (or files) composed at their weights."""
    from genadapt import models
    from genadapt.techniques.lora import add_lora_file

    model = models.load(run_or_model)
    for index, (lora, weight) in enumerate(loras or []):
        if model.family != "diffusion":
            raise UserError("--lora composes diffusion LoRA runs; a GAN LoRA run is sampled by passing its run folder")
        path = Path(lora)
        if path.is_dir():
            record = models.run_record(path) if models.is_run(path) else {}
            if record.get("train") != "lora":
                raise UserError(f"--lora {lora}: not a LoRA run folder (it recorded --train {record.get('train', '?')}); pass a LoRA run or a .safetensors file")
            path = path / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise UserError(f"--lora {lora}: no such LoRA file; pass a LoRA run folder or a .safetensors file")
        add_lora_file(model, path, f"lora{index}", weight)
    return model


def sample(run_or_model: str, prompts: list[str] | None = None, n: int = 16, steps: int | None = None, guidance: float | None = None, seed: int = 0,
           loras=None, out: Path | None = None, negative_prompt: str | None = None, truncation: float = 1.0, embedding_weight: float | None = None):
    """n images NCHW in [-1, 1] (prompts cycled; GANs take none); with `out`, also a grid PNG. `embedding_weight`
    weighs a textual-inversion run's trigger word (0: the prompt without it, 1: as trained)."""
    from genadapt import models
    from genadapt.grid import save_grid

    model = load_run_model(run_or_model, loras)
    if model.family == "gan" and any(prompts or []):
        raise UserError("--prompt: GANs are unconditional; sample a GAN with --seed and --truncation only")
    images = models.sample(model, n, seed, prompts, steps=steps, guidance=guidance, negative_prompt=negative_prompt, truncation=truncation, progress=True,
                           embedding_weight=embedding_weight)
    if not bool(images.isfinite().all()):
        raise UserError(f"{run_or_model}: the model produced non-finite pixels (NaN or inf); its weights or a --lora are broken, so nothing was written")
    if out is not None:
        save_grid(images, out, scale=2)
    return images


def compare(settings=None, **values) -> dict:
    """Every technique at every shot count on your data, evaluated; a recommendation per data budget."""
    from genadapt.config import CompareConfig
    from genadapt.recipes.compare import compare as run_compare

    return run_compare(settings or CompareConfig(**values))


def distill(config=None, **values) -> Path:
    """A fewer-step or smaller student from a teacher (diffusion: progressive, consistency, architecture; GAN: architecture)."""
    from genadapt.config import DistillConfig
    from genadapt.families import family_of

    config = config or DistillConfig(**values)
    if family_of(config.teacher_base()) == "gan":
        from genadapt.recipes.distill_gan import distill_gan

        return distill_gan(config)
    from genadapt.recipes.distill import distill as distill_diffusion

    return distill_diffusion(config)


def evaluate(samples: str, reference: str, train: str | None = None, features: str = "pocket", out: Path | None = None,
             num_samples: int | None = None, seed: int = 0, lpips=None) -> dict:
    """FID/KID with CIs, precision/recall, density/coverage; with `train`, diversity and memorisation.

    `samples` is a folder of images, or a run folder or base, which is sampled here (seeded)."""
    from genadapt import models
    from genadapt.eval.evaluate import evaluate as run_evaluate
    from genadapt.runfolder import prepare_out

    if out is not None:
        prepare_out(out)
    images = models.run_samples(samples, num_samples or 64, seed) if models.is_run(samples) else samples
    return run_evaluate(images, reference, train, features, out, num_samples=num_samples, seed=seed, lpips=lpips)
