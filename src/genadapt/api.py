"""The Python surface the CLI wraps: adapt(), sample() (and evaluate(), compare() as they land)."""

from __future__ import annotations

from pathlib import Path

from genadapt.config import AdaptConfig


def adapt(config: AdaptConfig | None = None, **values) -> Path:
    """Adapt a pretrained generator to a small image set; returns the run folder.

    >>> adapt(base="pocket-sd", data="builtin:openmoji/flags?shots=10", train="lora", steps=200, out="runs/flags-lora")
    >>> adapt(base="pocket-stylegan2", data="builtin:openmoji/flags?shots=10", train="freeze", freeze_d=2, loss=["cdc"], out="runs/flags-cdc")
    """
    config = config or AdaptConfig(**values)
    if config.family == "gan":  # pocket-stylegan2, a StyleGAN2 model folder, or a rosinality .pt
        from genadapt.recipes.train_gan import adapt_gan

        adapt_gan(config)
    else:
        from genadapt.recipes.train import adapt_diffusion

        adapt_diffusion(config)
    return Path(config.out)


def load_run_model(run_or_model: str, loras: list[tuple[str, float]] | None = None):
    """A diffusion model from a run folder (full/freeze pipeline, LoRA or embedding run) or a base."""
    import yaml

    from genadapt.errors import UserError
    from genadapt.families import diffusion

    path = Path(run_or_model)
    if (path / "config.yaml").is_file() and not (path / "model_index.json").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text())
        if (path / "pipeline" / "model_index.json").is_file():
            model = diffusion.load(str(path / "pipeline"))
        else:
            model = diffusion.load(config["base"])
            if (path / "learned_embeds.safetensors").is_file():
                from genadapt.export.embeddings import load_into

                load_into(model.pipeline, path)
            if (path / "pytorch_lora_weights.safetensors").is_file():
                loras = [(str(path), 1.0)] + list(loras or [])
    else:
        model = diffusion.load(run_or_model)
    names, weights = [], []
    for index, (lora, weight) in enumerate(loras or []):
        lora_path = Path(lora)
        file = lora_path / "pytorch_lora_weights.safetensors" if lora_path.is_dir() else lora_path
        if not file.is_file():
            raise UserError(f"--lora {lora}: no pytorch_lora_weights.safetensors there; pass a LoRA run folder or file")
        name = f"lora{index}"
        model.pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        names.append(name)
        weights.append(weight)
    if names:
        model.pipeline.set_adapters(names, adapter_weights=weights)
    return model


def sample(run_or_model: str, prompts: list[str], n: int = 16, steps: int = 25, guidance: float = 4.0, seed: int = 0, loras=None, out: Path | None = None):
    """n images (prompts cycled; GANs ignore them), NCHW in [-1, 1]; with `out`, also a grid PNG."""
    import yaml

    from genadapt.families import diffusion, gan
    from genadapt.grid import save_grid

    path = Path(run_or_model)
    is_gan_run = (path / "config.yaml").is_file() and yaml.safe_load((path / "config.yaml").read_text()).get("family") == "gan"
    if is_gan_run or gan.is_gan_base(run_or_model):
        if loras:
            from genadapt.errors import UserError

            raise UserError("--lora composes diffusion LoRA runs; a GAN LoRA run is sampled by passing its run folder")
        model = gan.load_run(path) if is_gan_run else gan.load(run_or_model)
        images = gan.sample(model, n, seed)
    else:
        model = load_run_model(run_or_model, loras)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        images = diffusion.sample(model, prompts, steps=steps, guidance=guidance, seed=seed, progress=True)
    if out is not None:
        save_grid(images, out, scale=2)
    return images
