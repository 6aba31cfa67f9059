"""The `genadapt` command: thin wrappers that parse, call the Python API and print."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from genadapt import __version__
from genadapt.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Adapt pretrained generators to 1-1000 images.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
zoo_app = typer.Typer(no_args_is_help=True, help="The pocket models shipped with genadapt.")
app.add_typer(data_app, name="data")
app.add_typer(zoo_app, name="zoo")


def user_errors(command):
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genadapt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """genadapt adapts a pretrained diffusion model or GAN to a small image set."""


@data_app.command("inspect")
@user_errors
def data_inspect(
    data: str = typer.Argument(..., help="A folder of images, or builtin:openmoji[/DOMAIN[/SPLIT]] / builtin:digits."),
    caption: Optional[str] = typer.Option(None, help="Caption for images that have none of their own."),
    caption_extension: str = typer.Option(".txt", help="Sidecar caption extension (kohya's --caption_extension)."),
    caption_column: str = typer.Option("text", help="Caption column in metadata.jsonl/csv."),
    background: str = typer.Option("white", help="Colour transparent images are composited on."),
    strict: bool = typer.Option(False, help="Exit non-zero if any file is unusable."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Counts, sizes, modes, captions, duplicates, and every file that cannot be used (with the reason)."""
    from genadapt.data.inspect import inspect, render_report

    report = inspect(data, caption, caption_extension, caption_column, background)
    typer.echo(json.dumps(report, indent=2) if as_json else render_report(report))
    if report["usable"] < 1 or (strict and report["unusable"]):
        raise typer.Exit(1)


@data_app.command("grid")
@user_errors
def data_grid(
    data: str = typer.Argument(..., help="A folder or builtin spec (with ?shots=N&seed=S)."),
    out: Path = typer.Option(Path("grid.png"), help="PNG to write."),
    resolution: int = typer.Option(32, help="Side of each image in pixels."),
    limit: int = typer.Option(64, help="At most this many images."),
    scale: int = typer.Option(2, help="Nearest-neighbour zoom of the grid."),
) -> None:
    """Save a grid of a dataset's images, to see what a model will learn from."""
    from genadapt.data import load_dataset
    from genadapt.grid import save_grid

    images = load_dataset(data, resolution=resolution)
    typer.echo(save_grid(images.pixels[:limit], out, scale=scale))


def _parse_sets(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals or not key:
            raise UserError(f"--set {value!r}: use KEY=VALUE, e.g. --set unet_steps=2000")
        pairs[key.strip()] = text.strip()
    return pairs


@app.command()
@user_errors
def pretrain(
    model: str = typer.Argument(..., help="pocket-sd, pocket-stylegan2 or eval-encoder."),
    out: Path = typer.Option(..., help="Run folder; rerun the same command to resume after an interruption."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, KEY=VALUE (repeatable)."),
) -> None:
    """Pretrain a pocket model from scratch with its recorded config and seed (resumable)."""
    from genadapt import zoo

    typer.echo(zoo.pretrain(model, out, _parse_sets(set_)))


@zoo_app.command("list")
@user_errors
def zoo_list() -> None:
    """The zoo's models, one line each."""
    from genadapt import zoo

    for name in zoo.MODELS:
        info = zoo.card(name)
        size = f"{info['size_bytes'] / 1e6:.1f} MB" if info.get("size_bytes") else "not shipped"
        typer.echo(f"{name:18s} {info.get('summary', '')} [{size}]")


@zoo_app.command("show")
@user_errors
def zoo_show(name: str = typer.Argument(..., help="A zoo model name.")) -> None:
    """Everything recorded about a zoo model: parameters, data, training time, licence, quality."""
    from genadapt import zoo

    typer.echo(json.dumps(zoo.card(name), indent=2))


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@user_errors
def adapt(
    base: Optional[str] = typer.Option(None, help="pocket-sd, pocket-stylegan2, a diffusers SD or SDXL pipeline folder, a StyleGAN2 model folder or rosinality .pt, or a hub id.  [default: pocket-sd]"),
    data: Optional[str] = typer.Option(None, "--data", "--instance-data-dir", "--train-data-dir", help="Folder of images or builtin:... spec."),
    caption: Optional[str] = typer.Option(None, "--caption", "--instance-prompt", help="Prompt for images without a caption of their own."),
    shots: Optional[int] = typer.Option(None, help="Use a deterministic k-shot subset of the data."),
    train: Optional[str] = typer.Option(None, help="full | freeze | lora | embedding (GAN: latent miner).  [default: lora; GAN: freeze]"),
    loss: Optional[list[str]] = typer.Option(None, help="Extra loss NAME[:WEIGHT] (repeatable): diffusion prior, ewc, relational, feature; GAN ewc, cdc, l2sp, feature."),
    with_prior_preservation: bool = typer.Option(False, "--with-prior-preservation", help="Same as --loss prior (DreamBooth)."),
    steps: Optional[int] = typer.Option(None, "--steps", "--max-train-steps", help="Optimisation steps.  [default: 200]"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Default per technique: full/freeze 1e-5, lora 1e-4, embedding 5e-3."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--train-batch-size", help="Images per step.  [default: 4]"),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help="Accumulate gradients over this many batches."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | fp16 | bf16 (GPU)."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing", help="Trade compute for memory."),
    seed: Optional[int] = typer.Option(None, help="Seed for shots, noise and batches.  [default: 0]"),
    trainable: Optional[list[str]] = typer.Option(None, help="--train freeze: parameter patterns that train (repeatable), e.g. 'up_blocks.*'."),
    freeze: Optional[list[str]] = typer.Option(None, help="--train freeze: parameter patterns kept frozen (repeatable)."),
    preset: Optional[str] = typer.Option(None, help="--train freeze presets: attention, cross-attention, decoder, encoder, norms."),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder", help="--train full: also train the text encoder."),
    rank: Optional[int] = typer.Option(None, help="LoRA rank.  [default: 4]"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha.  [default: rank, i.e. scale 1 as diffusers]"),
    use_dora: Optional[bool] = typer.Option(None, "--use-dora", help="DoRA: weight-decomposed LoRA."),
    use_rslora: Optional[bool] = typer.Option(None, "--use-rslora", help="rsLoRA: scale alpha/sqrt(rank)."),
    lora_targets: Optional[list[str]] = typer.Option(None, help="Module names LoRA wraps (repeatable).  [default: to_q to_k to_v to_out.0]"),
    token: Optional[str] = typer.Option(None, "--token", "--placeholder-token", help="--train embedding: the new token.  [default: <genadapt>]"),
    init_token: Optional[str] = typer.Option(None, "--init-token", "--initializer-token", help="Word to start the embedding from (else the mean)."),
    vectors: Optional[int] = typer.Option(None, "--vectors", "--num-vectors", help="Embedding vectors per token.  [default: 1]"),
    prior_prompt: Optional[str] = typer.Option(None, "--prior-prompt", "--class-prompt", help="Prompt for prior-preservation class images."),
    num_class_images: Optional[int] = typer.Option(None, help="Class images the source generates for --loss prior.  [default: 50]"),
    checkpointing_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps (atomic; rerun to resume).  [default: 100]"),
    sample_every: Optional[int] = typer.Option(None, help="Write a sample grid every N steps (0: only at the end)."),
    validation_prompt: Optional[str] = typer.Option(None, help="Prompt for sample grids.  [default: the training captions]"),
    freeze_d: Optional[int] = typer.Option(None, "--freeze-d", help="GAN: FreezeD, the discriminator's first N blocks stay frozen."),
    r1_gamma: Optional[float] = typer.Option(None, "--r1-gamma", help="GAN: R1 weight.  [default: the base's pretraining value, else 10]"),
    augment: Optional[str] = typer.Option(None, help="none | diffaugment[:policy] | ada[:target].  [default: diffusion none, GAN diffaugment]"),
    ewc_samples: Optional[int] = typer.Option(None, help="Generated samples for the EWC Fisher.  [default: diffusion 32, GAN 1024]"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="GAN: read a rosinality .pt base (with torch.load weights_only=True)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or TOML file with any of these settings; flags override it."),
    out: Optional[Path] = typer.Option(None, "--out", "--output-dir", help="Run folder."),
) -> None:
    """Adapt a pretrained generator to your images with one parameter technique and any loss techniques."""
    from genadapt.api import adapt as run_adapt
    from genadapt.config import AdaptConfig, build_config, read_config_file

    losses = list(loss or [])
    if with_prior_preservation and not any(item.split(":")[0] == "prior" for item in losses):
        losses.append("prior")
    given = {
        "base": base, "data": data, "caption": caption, "shots": shots, "train": train, "loss": losses or None,
        "steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps, "mixed_precision": mixed_precision,
        "gradient_checkpointing": gradient_checkpointing, "seed": seed, "trainable": trainable or None,
        "freeze": freeze or None, "preset": preset, "train_text_encoder": train_text_encoder, "rank": rank,
        "alpha": alpha, "use_dora": use_dora, "use_rslora": use_rslora, "lora_targets": lora_targets or None,
        "token": token, "init_token": init_token, "vectors": vectors, "prior_prompt": prior_prompt,
        "num_class_images": num_class_images, "checkpointing_steps": checkpointing_steps,
        "sample_every": sample_every, "validation_prompt": validation_prompt, "out": out,
        "freeze_d": freeze_d, "r1_gamma": r1_gamma, "augment": augment, "ewc_samples": ewc_samples,
        "allow_pickle": allow_pickle or None,
    }
    settings = build_config(AdaptConfig, read_config_file(config) if config else {}, given)
    typer.echo(run_adapt(settings))


@app.command()
@user_errors
def distill(
    teacher: str = typer.Option("pocket-sd", help="pocket-sd, a pipeline folder, an adapt run folder, or a GAN (pocket-stylegan2, StyleGAN2 folder) for --kind architecture."),
    kind: str = typer.Option(..., help="progressive (fewer steps), consistency (LCM-LoRA, 1-4 steps), architecture (BK-SDM, smaller UNet)."),
    data: Optional[str] = typer.Option(None, help="The shots: their captions are the prompts the student learns on."),
    prompt: Optional[list[str]] = typer.Option(None, help="Prompts to distil on (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (per round for progressive).  [default: 500]"),
    student_steps: Optional[int] = typer.Option(None, help="Target sampling steps.  [default: progressive 2, consistency 4, architecture 25]"),
    num_samples: Optional[int] = typer.Option(None, help="Teacher samples to distil on.  [default: 64]"),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Default per kind."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--train-batch-size", help="[default: 8]"),
    teacher_steps: Optional[int] = typer.Option(None, help="progressive: the first round's teacher DDIM steps (divides 1000).  [default: 8]"),
    rank: Optional[int] = typer.Option(None, help="consistency: LCM-LoRA rank.  [default: 8]"),
    remove_blocks: Optional[list[str]] = typer.Option(None, help="architecture: layer, mid, innermost (repeatable).  [default: mid innermost]"),
    student_width: Optional[float] = typer.Option(None, help="architecture with a GAN teacher: the student's channel multiplier.  [default: 0.5]"),
    kid_images: Optional[int] = typer.Option(None, help="Report: samples per set for KID against the teacher's many-step samples; 0 skips it.  [default: 128]"),
    features: Optional[str] = typer.Option(None, help="Report: KID feature space: pocket, an eval-encoder folder, or inception:PATH.  [default: pocket]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or TOML with any DistillConfig field; flags override it."),
    out: Path = typer.Option(..., "--out", "--output-dir", help="Run folder; rerun to resume."),
) -> None:
    """Distil a teacher into a fewer-step or smaller student, on teacher samples for your prompts."""
    from genadapt.config import build_config, read_config_file
    from genadapt.recipes.distill import DistillConfig, distill as run_distill

    given = {
        "teacher": teacher, "kind": kind, "data": data, "prompts": prompt or None, "steps": steps,
        "student_steps": student_steps, "num_samples": num_samples, "learning_rate": learning_rate,
        "batch_size": batch_size, "teacher_steps": teacher_steps, "rank": rank, "remove_blocks": remove_blocks or None,
        "seed": seed, "out": str(out), "student_width": student_width, "kid_images": kid_images, "features": features,
    }
    settings = build_config(DistillConfig, read_config_file(config) if config else {}, given)
    typer.echo(run_distill(settings))


def _parse_lora(value: str) -> tuple[str, float]:
    path, _, weight = value.rpartition(":") if ":" in value else (value, "", "1")
    try:
        return (path or value), float(weight)
    except ValueError:
        raise UserError(f"--lora {value}: use RUN or RUN:WEIGHT, e.g. --lora runs/flags:0.8") from None


@app.command()
@user_errors
def sample(
    model: str = typer.Argument("pocket-sd", help="A run folder, pocket-sd, or a pipeline folder."),
    prompt: list[str] = typer.Option([""], help="Prompt (repeatable; cycled over the n images)."),
    n: int = typer.Option(16, "-n", "--num-images", help="How many images."),
    steps: int = typer.Option(25, help="Sampler steps."),
    guidance: float = typer.Option(4.0, "--guidance", "--guidance-scale", help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same images."),
    lora: list[str] = typer.Option([], help="Add a LoRA run with a weight, RUN:WEIGHT (repeatable, composable)."),
    out: Path = typer.Option(Path("grid.png"), help="Grid PNG to write."),
) -> None:
    """Generate a grid of images from a base model or an adapted run."""
    from genadapt.api import sample as run_sample

    run_sample(model, prompt, n=n, steps=steps, guidance=guidance, seed=seed, loras=[_parse_lora(v) for v in lora], out=out)
    typer.echo(out)


@app.command()
@user_errors
def evaluate(
    samples: str = typer.Option(..., help="Folder of generated images, or a run folder (samples are generated, seeded)."),
    reference: str = typer.Option(..., help="Folder or builtin:... spec of real target images held out from training."),
    train: Optional[str] = typer.Option(None, help="The training shots: enables intra-cluster diversity and memorisation."),
    features: str = typer.Option("pocket", help="pocket (the shipped eval encoder), an eval-encoder folder, or inception:PATH."),
    inception_weights: Optional[Path] = typer.Option(None, help="pytorch-fid's pt_inception-2015-12-05 weights: standard FID."),
    lpips_backbone: Optional[Path] = typer.Option(None, help="torchvision's vgg16-397923af.pth (or alexnet-owt-7be5be79.pth): with --lpips-linear and --train, CDC's intra-cluster LPIPS."),
    lpips_linear: Optional[Path] = typer.Option(None, help="The lpips package's weights/v0.1/vgg.pth (or alex.pth) linear heads."),
    lpips_net: str = typer.Option("vgg", help="LPIPS backbone: vgg (CDC's) or alex."),
    num_samples: Optional[int] = typer.Option(None, help="Samples to generate from a run folder.  [default: reference size]"),
    seed: int = typer.Option(0, help="Seed for generated samples and bootstrap."),
    out: Path = typer.Option(..., help="Folder for metrics.json, report.md and report.html."),
) -> None:
    """FID/KID with CIs, precision/recall, density/coverage; with --train, diversity and memorisation
    (and intra-cluster LPIPS with --lpips-backbone and --lpips-linear)."""
    from genadapt.eval.evaluate import evaluate as run_evaluate, rows

    if inception_weights is not None:
        features = f"inception:{inception_weights}"
    lpips = None
    if lpips_backbone is not None or lpips_linear is not None:
        if lpips_backbone is None or lpips_linear is None:
            raise UserError("--lpips-backbone and --lpips-linear go together: the backbone file and the linear heads file")
        if train is None:
            raise UserError("--lpips-backbone/--lpips-linear need --train: intra-cluster LPIPS clusters samples around the training shots")
        lpips = (lpips_backbone, lpips_linear, lpips_net)
    result = run_evaluate(samples, reference, train, features, out, num_samples=num_samples, seed=seed, lpips=lpips)
    for metric, value in rows(result):
        typer.echo(f"{metric:55s} {value}")
    typer.echo(out / "report.html")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"{flag} {text}: use comma-separated integers, e.g. {flag} 1,5,10") from None
    if not values or values[0] < 1:
        raise UserError(f"{flag} {text}: shot counts must be >= 1")
    return values


@app.command()
@user_errors
def compare(
    base: str = typer.Option("pocket-sd", help="The pretrained model to adapt."),
    data: str = typer.Option(..., help="Folder or builtin spec; shots are drawn from it deterministically."),
    reference: Optional[str] = typer.Option(None, help="Held-out real images of the target.  [default: hold out 30% of --data, by seed]"),
    shots: str = typer.Option("1,5,10", help="Comma-separated shot counts."),
    techniques: str = typer.Option("lora,embedding,freeze,full,ewc", help="Comma-separated: full, freeze, lora, embedding, ewc, relational, prior, feature."),
    budget_minutes: float = typer.Option(15.0, help="Wall-clock budget; steps per run are planned from a timing probe."),
    samples: int = typer.Option(64, help="Generated images per run for evaluation."),
    caption: Optional[str] = typer.Option(None, help="Prompt for images without a caption of their own."),
    seed: int = typer.Option(0, help="Seed for shots, training and sampling."),
    out: Path = typer.Option(Path("runs/compare"), help="Folder for runs, results.json and report.html; rerun to resume."),
) -> None:
    """Run every technique at every shot count, evaluate, and recommend one per data budget."""
    from genadapt.recipes.compare import CompareSettings, compare as run_compare

    settings = CompareSettings(
        base=base, data=data, reference=reference, out=out, shots=_int_list(shots, "--shots"),
        techniques=[t.strip() for t in techniques.split(",") if t.strip()], budget_minutes=budget_minutes,
        samples=samples, seed=seed, caption=caption,
    )
    results = run_compare(settings)
    from genadapt.eval.report import verdict_text

    for line in verdict_text(results):
        typer.echo(line)
    typer.echo(out / "report.html")


@app.command()
@user_errors
def demo(
    quick: bool = typer.Option(False, "--quick", help="About 3 minutes: two techniques per model, fewer samples."),
    out: Path = typer.Option(Path("runs/demo"), help="Where the runs and the reports go; rerun to resume."),
    target: str = typer.Option("flags", help="Held-out OpenMoji target domain: flags (far) or dark-skin (near)."),
) -> None:
    """The main job on built-in data: compare techniques on 10 shots of a held-out OpenMoji domain,
    with pocket-sd and pocket-stylegan2, and write one report."""
    from genadapt.eval.report import verdict_text, write_demo_index
    from genadapt.recipes.compare import CompareSettings, compare as run_compare

    if target not in ("flags", "dark-skin"):
        raise UserError(f"--target {target}: choose flags or dark-skin")
    folder = out / ("quick" if quick else "full")
    # Fixed step counts, not a time budget: the demo gives the same numbers on every machine
    # (about 6 minutes on 2 cores for the full demo, 1.5 for --quick).
    plans = {
        "pocket-sd": (["lora", "embedding"], 150) if quick else (["lora", "embedding", "freeze", "full", "ewc"], 400),
        "pocket-stylegan2": (["freeze", "cdc"], 200) if quick else (["full", "freeze", "lora", "embedding", "ewc", "cdc"], 500),
    }
    results = {}
    for base, (techniques, steps) in plans.items():
        settings = CompareSettings(
            base=base,
            data=f"builtin:openmoji/{target}",
            reference=f"builtin:openmoji/{target}/reference",
            out=folder / base,
            shots=[10],
            techniques=techniques,
            steps=steps,
            samples=24 if quick else 64,
            sample_steps=15 if quick else 25,
            min_steps=10 if quick else 50,
            probe_steps=1 if quick else 2,
        )
        results[base] = run_compare(settings)
        for line in verdict_text(results[base]):
            typer.echo(f"{base}: {line}")
    typer.echo(f"report: {write_demo_index(results, folder)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
