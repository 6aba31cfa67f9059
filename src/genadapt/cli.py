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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
