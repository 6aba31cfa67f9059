"""The `genadapt` command: thin wrappers that parse, call the Python API and print.

`adapt`, `compare` and `distill` are generated from their config models (`genadapt.config`) and the
technique registry: every field is a flag of the same name (`rank` -> `--rank`, `--rank`'s underscore
spelling and any declared alias such as diffusers' `--train_batch_size`), read only from what the user
typed, and validated by the config, which refuses what the run would not read.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Optional

import click
import typer

from genadapt import __version__
from genadapt.errors import Interrupted, UserError

typer_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help="Adapt pretrained generators to 1-1000 images.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Look at data before training on it.")
zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="The pocket models shipped with genadapt.")
typer_app.add_typer(data_app, name="data")
typer_app.add_typer(zoo_app, name="zoo")
HELP = {"help_option_names": ["-h", "--help"]}


def user_errors(command):
    """Bad input ends with one line on stderr and exit code 2, never a traceback (GENADAPT_DEBUG=1 shows it)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            if os.environ.get("GENADAPT_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
            raise typer.Exit(130) from None

    return wrapper


@typer_app.callback()
def main() -> None:
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
    fit: str = typer.Option("crop", help="Make images square by center-cropping (crop) or padding (pad), as adapt --fit does."),
    background: str = typer.Option("white", help="Colour transparent images are composited on, as adapt --background does."),
) -> None:
    """Save a grid of a dataset's images, to see what a model will learn from."""
    from genadapt.data import load_dataset
    from genadapt.grid import save_grid

    if fit not in ("crop", "pad"):
        raise UserError(f"--fit {fit}: choose crop or pad")
    images = load_dataset(data, resolution=resolution, fit=fit, background=background)
    typer.echo(save_grid(images.pixels[:limit], out, scale=scale))


def _parse_sets(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals or not key:
            raise UserError(f"--set {value!r}: use KEY=VALUE, e.g. --set unet_steps=2000")
        pairs[key.strip()] = text.strip()
    return pairs


@typer_app.command()
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


def _parse_lora(value: str) -> tuple[str, float]:
    path, _, weight = value.rpartition(":") if ":" in value else (value, "", "1")
    try:
        return (path or value), float(weight)
    except ValueError:
        raise UserError(f"--lora {value}: use RUN or RUN:WEIGHT, e.g. --lora runs/flags:0.8") from None


@typer_app.command(context_settings=HELP)
@user_errors
def sample(
    model: str = typer.Argument("pocket-sd", help="A run folder, a base (pocket-sd, pocket-stylegan2, a pipeline or StyleGAN2 folder)."),
    prompt: list[str] = typer.Option([], help="Prompt (repeatable; cycled over the n images). Diffusion only."),
    prompt_file: Optional[Path] = typer.Option(None, help="A text file with one prompt a line (added to --prompt)."),
    negative_prompt: Optional[str] = typer.Option(None, help="What the images should not show (diffusion)."),
    n: int = typer.Option(16, "-n", "--num-images", help="How many images."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps (diffusion).  [default: 25; a distilled student: its own]"),
    guidance: Optional[float] = typer.Option(None, "--guidance", "--guidance-scale", help="Classifier-free guidance scale (diffusion).  [default: 4; a distilled student: its own]"),
    truncation: float = typer.Option(1.0, help="GAN truncation ψ (1: none)."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same images."),
    lora: list[str] = typer.Option([], help="Add a LoRA run or file with a weight, RUN:WEIGHT (repeatable, composable)."),
    embedding_weight: Optional[float] = typer.Option(None, help="A textual-inversion run: how strongly its trigger word acts, 0 (the prompt without it) to 1 (as trained; above 1 stresses it); every prompt must hold the word."),
    out: Path = typer.Option(Path("grid.png"), help="Grid PNG to write, or a folder: one PNG per image plus grid.png."),
    threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads.  [default: 1 on 2-core machines, else the free cores]"),
) -> None:
    """Generate images from a base model or an adapted run."""
    from genadapt.api import sample as run_sample
    from genadapt.runs import use_cpu

    _set_threads(threads)
    use_cpu()
    if n < 1:
        raise UserError(f"-n {n}: ask for at least one image")
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: the sampler needs at least one step")
    prompts = list(prompt)
    if prompt_file is not None:
        try:
            prompts += [line.strip() for line in prompt_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--prompt-file {prompt_file}: cannot read it as UTF-8 text ({type(exc).__name__})") from None
    folder = out if (out.is_dir() or not out.suffix) else None
    grid = folder / "grid.png" if folder else out
    images = run_sample(model, prompts, n=n, steps=steps, guidance=guidance, seed=seed, loras=[_parse_lora(v) for v in lora],
                        out=grid, negative_prompt=negative_prompt, truncation=truncation, embedding_weight=embedding_weight)
    if folder is not None:
        from genadapt.grid import save_image

        for index, image in enumerate(images):
            text = prompts[index % len(prompts)] if prompts else ""
            save_image(image, folder / f"{index:04d}{('-' + _slug(text)) if text else ''}.png")
    typer.echo(grid)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:48]


@typer_app.command()
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
    threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads.  [default: 1 on 2-core machines, else the free cores]"),
) -> None:
    """FID/KID with CIs, precision/recall, density/coverage; with --train, diversity and memorisation
    (and intra-cluster LPIPS with --lpips-backbone and --lpips-linear)."""
    from genadapt.api import evaluate as run_evaluate
    from genadapt.eval.evaluate import rows
    from genadapt.runs import use_cpu

    _set_threads(threads)
    use_cpu()
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


@typer_app.command()
@user_errors
def demo(
    quick: bool = typer.Option(False, "--quick", help="About 2 minutes on 2 cores: two techniques per model, 1 replicate, no learning-rate probe, no validation, fewer samples."),
    out: Path = typer.Option(Path("runs/demo"), help="Where the runs and the reports go; rerun to resume."),
    target: str = typer.Option("flags", help="Held-out OpenMoji target domain: flags (far) or dark-skin (near)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op CPU threads.  [default: 1 on 2-core machines, else the free cores]"),
    jobs: Optional[int] = typer.Option(None, min=1, help="Runs at a time, each in its own process with one thread (compare --jobs).  [default: --quick 1; else the free cores]"),
) -> None:
    """The main job on built-in data: compare techniques on 10 shots of a held-out OpenMoji domain,
    with pocket-sd and pocket-stylegan2, and write one report."""
    from genadapt.api import compare as run_compare
    from genadapt.config import CompareConfig
    from genadapt.eval.report import verdict_text, write_demo_index
    from genadapt.runs import free_cores

    if target not in ("flags", "dark-skin"):
        raise UserError(f"--target {target}: choose flags or dark-skin")
    _set_threads(threads)
    folder = out / ("quick" if quick else "full")
    # Fixed step counts, not a time budget: the demo gives the same numbers on every machine
    # (the full demo: 42-75 minutes on 2 cores, docs/benchmarks.md; --quick: about 2).
    plans = {
        "pocket-sd": (["lora", "embedding"], 150) if quick else (["lora", "embedding", "freeze", "full", "ewc"], 400),
        # 2,000 GAN steps: at 500 and 1,000 the pocket GAN's samples still show the source's faces (docs/benchmarks.md).
        "pocket-stylegan2": (["freeze", "cdc"], 200) if quick else (["full", "freeze", "lora", "embedding", "ewc", "cdc"], 2000),
    }
    # Independent runs of one thread each: the full demo fills the cores free when it starts (counted once, before
    # its own runs make the machine look busy).
    jobs = jobs or (1 if quick else free_cores())
    results = {}
    for base, (techniques, steps) in plans.items():
        settings = CompareConfig(
            base=base,
            data=f"builtin:openmoji/{target}",
            reference=f"builtin:openmoji/{target}/reference",
            out=folder / base,
            shots=[10],
            techniques=techniques,
            steps=steps,
            samples=24 if quick else 64,
            # Two replicates fit the full demo's time; the quick one pairs on sampling noise alone (docs/benchmarks.md).
            replicates=1 if quick else 2,
            validate_every=0 if quick else None,  # --quick: the last step (about a minute); the full demo finds each run's best step
            lr_probe=1 if quick else 3,  # --quick: the default rates; the full demo probes 3 rates per technique first
            jobs=jobs,
            min_steps=10 if quick else 50,
            **({"sample_steps": 15 if quick else 25} if base == "pocket-sd" else {}),
        )
        results[base] = run_compare(settings)
        for line in verdict_text(results[base]):
            typer.echo(f"{base}: {line}")
    typer.echo(f"report: {write_demo_index(results, folder)}")


@typer_app.command(context_settings=HELP)
@user_errors
def ui(
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but 127.0.0.1 lets other machines in (a warning is printed)."),
    port: int = typer.Option(7860, help="Port to listen on."),
    root: Path = typer.Option(Path("."), help="The folder every path typed into the UI, and every file it serves, must lie in."),
    max_upload_mb: float = typer.Option(50.0, help="The largest file an upload may be, in MB."),
) -> None:
    """A local web app: upload images, compare techniques or run one, watch it train, read the answer, sample."""
    try:
        import gradio  # noqa: F401 - the optional `ui` extra
    except ImportError:
        raise UserError("genadapt ui needs gradio, which is not installed: pip install 'genadapt[ui]'") from None
    from genadapt.ui import serve

    serve(host=host, port=port, root=root, max_upload_mb=max_upload_mb)


# ----------------------------------------------------------------------------- config-driven commands


def THREADS_OPTION() -> click.Option:
    return click.Option(["--threads", "threads"], type=int, default=None,
                        help="Intra-op CPU threads for this command and its child processes.  [default: 1 on 2-core machines, else the free cores]")


def _set_threads(threads: int | None) -> None:
    """`--threads N`: every heavy step of the command (and its torchrun/accelerate/Ray children) uses N threads."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads {threads}: use 1 or more")
        os.environ["GENADAPT_THREADS"] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _unwrap(annotation):
    """(base type, is_list) of a field annotation: Optional[X] -> X, list[X] -> X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _spellings(name: str, aliases: list[str]) -> list[str]:
    """--rank-like hyphen spellings and their diffusers/kohya underscore twins."""
    names = ["--" + name.replace("_", "-")] + list(aliases)
    out = []
    for item in names:
        for spelling in (item, "--" + item[2:].replace("-", "_")):
            if spelling not in out:
                out.append(spelling)
    return out


def _field_options(models: list, skip: set[str], taken: set[str]) -> list[click.Option]:
    from genadapt.config import field_aliases

    options = []
    for model in models:
        for name, info in model.model_fields.items():
            if name in skip or name in taken or info.exclude:
                continue
            taken.add(name)
            kind, is_list = _unwrap(info.annotation)
            decls = _spellings(name, field_aliases(model, name))
            help_text = _with_default(info.description or "", info.default)
            if kind is bool:
                options.append(click.Option(decls + [name], is_flag=True, default=None, help=help_text))
            else:
                metavar = "|".join(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else {int: "INT", float: "FLOAT"}.get(kind, "TEXT")
                options.append(click.Option(decls + [name], multiple=is_list, default=None, metavar=metavar,
                                            help=help_text + ("  (repeatable)" if is_list and "repeatable" not in help_text else "")))
    return options


def _with_default(help_text: str, default) -> str:
    """The field's default in its help, as typer's commands show theirs; descriptions that state one keep their own."""
    from pydantic_core import PydanticUndefined

    if "[default" in help_text or default is None or default is False or default is PydanticUndefined or default in ("", [], ()):
        return help_text
    return f"{help_text}  [default: {default}]"


def _given(ctx: click.Context, values: dict) -> dict:
    """Only what the user typed: a flag left out never overrides the --config file or a default."""
    from click.core import ParameterSource

    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE and v != ()}


def _config_values(ctx: click.Context, values: dict) -> dict:
    from genadapt.config import read_config_file

    config = values.pop("config", None)
    given = _given(ctx, values)
    merged = read_config_file(Path(config)) if config else {}
    merged.update({k: list(v) if isinstance(v, tuple) else v for k, v in given.items()})
    return merged


def _adapt_command() -> click.Command:
    from genadapt import techniques
    from genadapt.config import AdaptConfig

    registry = techniques.registry()
    settings_models = [impl.settings for t in registry.values() for impl in t.families.values()]
    options = _field_options([AdaptConfig, *settings_models], {"technique_values"}, set())
    parameters, losses = techniques.names("parameter"), techniques.names("loss")
    for option in options:
        if option.name == "train":
            option.help = f"What trains: {', '.join(parameters)}.  [default: diffusion lora, GAN freeze]"
        if option.name == "loss":
            option.help = f"Loss technique NAME[:WEIGHT] (repeatable): {', '.join(losses)}."
    options += [
        click.Option(["--with-prior-preservation", "--with_prior_preservation", "with_prior_preservation"], is_flag=True, default=None,
                     help="Same as --loss prior (DreamBooth)."),
        click.Option(["--prior-loss-weight", "--prior_loss_weight", "prior_loss_weight"], type=float, default=None,
                     help="With --with-prior-preservation: the prior term's weight (diffusers' flag; the same as --loss prior:W)."),
        click.Option(["--num-processes", "--num_processes", "num_processes"], type=int, default=None,
                     help="Run data-parallel on N local processes (torchrun; gloo on CPUs, NCCL on GPUs)."),
        click.Option(["--config", "config"], default=None, help="YAML or TOML file with any of these settings; flags override it."),
        THREADS_OPTION(),
    ]

    @user_errors
    def run(**values):
        from genadapt.api import adapt
        from genadapt.config import build_config

        ctx = click.get_current_context()
        _set_threads(values.pop("threads", None))
        processes = values.pop("num_processes", None)
        if processes is not None and processes > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch(processes)
        prior = values.pop("with_prior_preservation", None)
        prior_weight = values.pop("prior_loss_weight", None)
        merged = _config_values(ctx, values)
        if prior_weight is not None and not prior:
            raise UserError("--prior-loss-weight goes with --with-prior-preservation (or pass --loss prior:W)")
        if prior and not any(str(item).split(":")[0] == "prior" for item in merged.get("loss", [])):
            merged["loss"] = list(merged.get("loss", [])) + ["prior" if prior_weight is None else f"prior:{prior_weight}"]
        typer.echo(adapt(build_config(AdaptConfig, merged, {})))

    return click.Command("adapt", callback=run, params=options, context_settings=HELP,
                         help="Adapt a pretrained generator to your images with one parameter technique and any loss techniques.")


def _relaunch(processes: int) -> None:
    """`genadapt adapt ... --num-processes N`: the same command under torchrun, N processes, one run."""
    import socket
    import subprocess

    argv = list(sys.argv[1:])
    for flag in ("--num-processes", "--num_processes"):
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(flag + "=")]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "genadapt", *argv]
    code = subprocess.call(command, env=env)
    if code:
        raise typer.Exit(code)


def _simple_command(name: str, model_name: str, help_text: str, extra_help: dict | None = None) -> click.Command:
    from genadapt import config as config_module

    model = getattr(config_module, model_name)
    options = _field_options([model], set(), set())
    for option in options:
        if extra_help and option.name in extra_help:
            option.help = extra_help[option.name]()
    options.append(click.Option(["--config", "config"], default=None, help="YAML or TOML file with any of these settings; flags override it."))
    options.append(THREADS_OPTION())

    @user_errors
    def run(**values):
        from genadapt import api
        from genadapt.config import build_config

        _set_threads(values.pop("threads", None))
        settings = build_config(model, _config_values(click.get_current_context(), values), {})
        result = getattr(api, name)(settings)
        if name == "compare":
            from genadapt.eval.report import verdict_text

            for line in verdict_text(result):
                typer.echo(line)
            typer.echo(Path(settings.out) / "report.html")
        else:
            typer.echo(result)

    return click.Command(name, callback=run, params=options, context_settings=HELP, help=help_text)


def _compare_help() -> str:
    from genadapt import techniques

    return (f"Techniques, comma-separated: diffusion {', '.join(techniques.compare_presets('diffusion'))}; "
            f"GAN {', '.join(techniques.compare_presets('gan'))}.  [default: diffusion lora,embedding,freeze,full,ewc; GAN full,freeze,lora,embedding,ewc,cdc]")


GENERATED = {
    "adapt": "Adapt a pretrained generator to your images with one parameter technique and any loss techniques.",
    "compare": "Run every technique at every shot count, evaluate, and recommend one per data budget.",
    "distill": "Distil a teacher into a fewer-step or smaller student, on teacher samples for your prompts.",
}


def _generated(name: str) -> click.Command:
    if name == "adapt":
        return _adapt_command()
    if name == "compare":
        return _simple_command("compare", "CompareConfig", GENERATED[name], {"techniques": _compare_help})
    return _simple_command("distill", "DistillConfig", GENERATED[name])


class GenadaptCLI(click.Group):
    """The typer commands plus the config-driven ones, built when asked for (so registered techniques show).
    Every usage error is one line: `error: ...`, exit code 2."""

    def _typer_group(self) -> click.Group:
        return typer.main.get_group(typer_app)

    def list_commands(self, ctx):
        return sorted([*self._typer_group().commands, *GENERATED])

    def get_command(self, ctx, name):
        return _generated(name) if name in GENERATED else self._typer_group().commands.get(name)

    def format_commands(self, ctx, formatter):
        # The generated commands' one-line help without building them (that would import torch).
        group = self._typer_group()
        rows = [(name, GENERATED.get(name) or group.commands[name].get_short_help_str(300)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl([(name, text.split(". ")[0].rstrip(".")) for name, text in rows])

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(args=args, prog_name=prog_name or "genadapt", standalone_mode=False, **kwargs)
        except (*_click_kinds("Exit"), typer.Exit) as exc:
            sys.exit(exc.exit_code)
        except (*_click_kinds("Abort"), typer.Abort):
            click.echo("interrupted", err=True)
            sys.exit(130)
        except _click_kinds("NoArgsIsHelpError") as exc:  # `genadapt`, `genadapt zoo`: the help, as --help shows it
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except _click_kinds("UsageError") as exc:
            command = exc.ctx.command_path if exc.ctx else "genadapt"
            click.echo(f"error: {exc.format_message()} (see {command} --help)", err=True)
            sys.exit(exc.exit_code)
        except _click_kinds("ClickException") as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _click_kinds(name: str) -> tuple[type, ...]:
    """click's exception class `name`, and its twin in the copy of click that typer >= 0.2x runs its own commands on
    (a usage error in `genadapt sample` is typer's, not click's, and would otherwise end in a traceback)."""
    kinds = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # a typer that uses click itself
        return tuple(kinds)
    return tuple(kinds + [getattr(vendored, name)] if hasattr(vendored, name) else kinds)


def _print_version(ctx, param, value):
    if value:
        click.echo(f"genadapt {__version__}")
        ctx.exit()


app = GenadaptCLI(
    name="genadapt", no_args_is_help=True, context_settings=HELP,
    help="Adapt pretrained generators to 1-1000 images, and learn which technique fits your data budget.",
    params=[click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True, callback=_print_version, help="Print the version and exit.")],
)


if __name__ == "__main__":  # pragma: no cover
    app()
