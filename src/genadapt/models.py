"""Bases and finished runs as models, and images from either: what sampling, evaluation and compare load.

A run folder says what it is in `run.json` (written by the loop: family, technique, base, artifacts); the
registered technique's `load` turns the base plus the run's artifact back into the adapted model. Nothing is
guessed from which files happen to be in the folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from genadapt.errors import UserError
from genadapt.families import family_module, family_of

RUN_RECORD = "run.json"


def is_run(path: str | Path) -> bool:
    path = Path(path)
    return (path / RUN_RECORD).is_file() or ((path / "config.yaml").is_file() and not (path / "model_index.json").is_file())


def run_record(run: str | Path) -> dict:
    """What a run folder recorded about itself: {"kind", "family", "train", "base", ...}."""
    import yaml

    run = Path(run)
    if (run / RUN_RECORD).is_file():
        try:
            return json.loads((run / RUN_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{run / RUN_RECORD}: cannot be read ({type(exc).__name__}); rerun the command that made {run}") from None
    # Runs written before run.json: config.yaml has the family and the technique.
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    family = config.get("family") or family_of(str(config.get("base", "pocket-sd")))
    if config.get("recipe") == "distill":
        return {"kind": "distill", "family": family, "base": config.get("teacher"), "artifact": "model" if family == "gan" else "pipeline"}
    return {"kind": "adapt", "family": family, "train": config.get("train") or family_module(family).DEFAULTS["train"],
            "base": config["base"], "allow_pickle": bool(config.get("allow_pickle"))}


def load_base(base: str, device: str | torch.device = "cpu", allow_pickle: bool = False):
    family = family_of(base)
    if family == "gan":
        return family_module("gan").load(base, allow_pickle=allow_pickle, device=device)
    return family_module("diffusion").load(base, device=device)


def load_run(run: str | Path, device: str | torch.device = "cpu"):
    """The adapted model of a finished run folder, through its technique's registered `load`."""
    from genadapt import techniques

    run = Path(run)
    record = run_record(run)
    family = family_module(record["family"])
    if record["kind"] == "distill":
        if not record.get("artifact"):
            return _lcm_lora_run(run, record, device)
        model = family.load(str(run / record["artifact"]), device=device)
        info = run / record["artifact"] / "genadapt.json"
        if info.is_file():  # a fewer-step student samples at its own step count and guidance
            sampling = json.loads(info.read_text(encoding="utf-8")).get("sampling", {})
            model.extras["sampling"] = {"steps": sampling.get("num_inference_steps", 25), "guidance": sampling.get("guidance_scale", 4.0)}
        return model
    implementation = techniques.get(record["train"], "parameter", record["family"])
    if implementation.load is None:
        raise UserError(f"{run}: technique {record['train']} registers no loader; it cannot be sampled")
    if not (run / "summary.json").is_file():
        raise UserError(f"{run}: the run has not finished (no summary.json); rerun its adapt command to finish it")

    def base_model():
        return load_base(record["base"], device=device, allow_pickle=bool(record.get("allow_pickle")))

    return implementation.load(base_model, run)


def _lcm_lora_run(run: Path, record: dict, device):
    """A consistency-distillation run: its teacher with the LCM-LoRA loaded and the LCM scheduler it was
    distilled for; `model.extras["sampling"]` holds the steps and guidance it samples with (genadapt.json)."""
    from diffusers import LCMScheduler

    from genadapt.techniques.lora import add_lora_file

    info = json.loads((run / "genadapt.json").read_text(encoding="utf-8"))["sampling"]
    model = load(record["base"], device)
    add_lora_file(model, run / "pytorch_lora_weights.safetensors", "lcm", 1.0)
    options = {k: info[k] for k in ("original_inference_steps", "timestep_scaling") if k in info}
    model.pipeline.scheduler = LCMScheduler.from_config(model.pipeline.scheduler.config, **options)
    model.extras["sampling"] = {"steps": info.get("num_inference_steps", 4), "guidance": info.get("guidance_scale", 1.0)}
    return model


def load(run_or_base: str, device: str | torch.device = "cpu", allow_pickle: bool = False):
    """A run folder's adapted model, or a base."""
    return load_run(run_or_base, device) if is_run(run_or_base) else load_base(run_or_base, device, allow_pickle)


def sample(model, n: int, seed: int = 0, prompts: list[str] | None = None, steps: int | None = None, guidance: float | None = None,
           negative_prompt: str | None = None, truncation: float = 1.0, progress: bool = False, embedding_weight: float | None = None) -> torch.Tensor:
    """`n` images NCHW in [-1, 1], deterministic by seed. Diffusion cycles `prompts`; GANs take none. Steps and
    guidance default to what a distilled student was made for, else 25 and 4. `embedding_weight` weighs a
    textual-inversion run's trigger word (families.diffusion.weighted_trigger)."""
    defaults = getattr(model, "extras", {}).get("sampling", {})
    steps = steps if steps is not None else defaults.get("steps", 25)
    guidance = guidance if guidance is not None else defaults.get("guidance", 4.0)
    trigger = getattr(model, "extras", {}).get("trigger")
    if embedding_weight is not None and not math.isfinite(embedding_weight):
        raise UserError(f"--embedding-weight {embedding_weight}: the weight must be a finite number, e.g. --embedding-weight 0.25")
    if embedding_weight is not None and trigger is None:
        raise UserError("--embedding-weight weighs a textual-inversion run's trigger word; this model has none (it weighs a --train embedding run on a diffusion base)")
    if model.family == "gan":
        return family_module("gan").sample(model, n, seed, truncation=truncation)
    prompts = prompts or [""]
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    return family_module("diffusion").sample(model, prompts, steps=steps, guidance=guidance, seed=seed, negative_prompt=negative_prompt, progress=progress,
                                             trigger_weight=None if embedding_weight is None else (trigger, embedding_weight))


def run_prompts(run: str | Path) -> list[str]:
    """The prompts a diffusion run trained on, placeholder tokens included: how to sample it."""
    run = Path(run)
    if (run / "prompts.json").is_file():
        return json.loads((run / "prompts.json").read_text(encoding="utf-8"))
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    return [item["caption"] for item in manifest["data"]["train"]["items"]]


def _sample_set(model, name: str, n: int, seed: int, prompts: list[str] | None, steps, guidance=None):
    """An ImageSet of n samples; diffusion prompts cycle over `prompts` (GANs take none)."""
    from genadapt.data.imageset import image_set

    prompts = prompts if model.family == "diffusion" else None
    images = sample(model, n, seed, prompts, steps=steps, guidance=guidance, progress=True)
    return image_set(f"{name}#samples(seed={seed})", images, [prompts[i % len(prompts)] for i in range(n)] if prompts else None)


def run_samples(run: str | Path, n: int, seed: int = 0, steps: int | None = None, guidance: float | None = None):
    """n samples of a run; diffusion prompts cycle over the captions it trained on."""
    model = load_run(run)
    return _sample_set(model, str(run), n, seed, run_prompts(run) if model.family == "diffusion" else None, steps, guidance)


def base_samples(base: str, n: int, prompts: list[str], seed: int = 0, steps: int | None = None):
    """n samples of an unadapted base (the baseline), prompts cycled (GANs take none)."""
    return _sample_set(load_base(base), base, n, seed, prompts, steps)
