"""`genadapt ui`: a local web app over the same API and commands as the CLI (Gradio, the `ui` extra).

What it does, tab by tab: upload images or name a folder and read the `data inspect` report (broken files with
their reasons, duplicates, captions; captions are edited in place as kohya `NAME.txt` sidecars); choose a base;
run `genadapt compare` or `genadapt adapt` as a subprocess of the very command line the CLI takes (so cancel is a
SIGINT that checkpoints, and the CLI resumes what the UI started, or the reverse), with live progress read from
the run folders (`log.jsonl`, `samples/*.png`); read the compare report inline and download each run's artifact;
sample any run or base with `genadapt.api.sample`, LoRA runs composed at slider weights.

Safe by default: it binds 127.0.0.1; every path typed into it and every file it serves must resolve (symlinks
followed) inside `--root`; uploads are limited in size and type and read by the same data layer as the CLI; no
pickle is read unless "allow pickle" is ticked, as `--allow-pickle` is given on the CLI.

The pure helpers (paths, uploads, reports, command lines, progress) need no Gradio; `build_blocks` and `serve`
import it.
"""

from __future__ import annotations

import html
import inspect as _inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections import deque
from pathlib import Path

from genadapt.errors import UserError

POCKET_BASES = ("pocket-sd", "pocket-stylegan2")
LOCAL_BASE = "a local model folder or checkpoint"
MODES = ("let compare choose within a time budget", "compare the techniques and shots I pick", "one run (adapt)")
CAPTION_FILES = (".txt",)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SERVED_TYPES = {".html": "text/html", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".svg": "image/svg+xml", ".json": "application/json", ".jsonl": "text/plain",
                ".txt": "text/plain", ".md": "text/plain", ".yaml": "text/plain", ".csv": "text/plain"}
# Served files are static pages and pictures: no script of theirs runs, whatever a file under --root holds.
FILE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CANCEL_GRACE_SECONDS = 60  # a step finishes and checkpoints; then a second SIGINT stops at once


class PathRefused(UserError):
    """A path that resolves outside --root."""


# ----------------------------------------------------------------------------- paths


class Root:
    """The folder every typed path and every served file must lie in (symlinks resolved)."""

    def __init__(self, path: str | Path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise UserError(f"--root {path}: no such folder; pass the folder the UI may read and write")
        self.path = folder.resolve()

    def contains(self, path: Path) -> bool:
        return path == self.path or self.path in path.parents

    def resolve(self, text: str | Path, what: str = "path", must_exist: bool = False) -> Path:
        """An absolute path inside the root, or a one-line UserError that says why not."""
        raw = str(text if text is not None else "").strip()
        if not raw:
            raise UserError(f"{what}: empty; type a path under {self.path}")
        if "\x00" in raw:
            raise PathRefused(f"{what} {raw!r}: contains a NUL byte; type a plain path under {self.path}")
        candidate = Path(raw).expanduser()
        if not candidate.is_absolute():
            candidate = self.path / candidate
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise PathRefused(f"{what} {raw}: cannot be resolved ({type(exc).__name__}); type a plain path under {self.path}") from None
        if not self.contains(resolved):
            if ".." in Path(raw).parts:
                how = "its '..' leads out of"
            elif self.contains(Path(os.path.normpath(candidate))):
                how = "a symbolic link in it points out of"
            else:
                how = "it is outside"
            raise PathRefused(f"{what} {raw}: refused, {how} the UI's root {self.path}; only paths under --root can be used")
        if must_exist and not resolved.exists():
            raise UserError(f"{what} {raw}: no such file or folder under {self.path}")
        return resolved

    def rel(self, path: Path) -> str:
        """The root-relative spelling a shell in the root would type (what runs record)."""
        relative = Path(path).relative_to(self.path).as_posix()
        return relative or "."


def _data_spec(root: Root, text: str, what: str) -> tuple[str, str]:
    """(spec for this process, spec as typed in the root) of --data/--reference: a builtin spec, or a folder."""
    text = (text or "").strip()
    if text.startswith("builtin:"):
        return text, text
    folder = root.resolve(text, what, must_exist=True)
    if not folder.is_dir():
        raise UserError(f"{what} {text}: is a file; pass the folder that holds the images")
    return str(folder), root.rel(folder)


# ----------------------------------------------------------------------------- uploads, inspect, captions


def safe_name(name: str, fallback: str = "file") -> str:
    """A file or folder name of letters, digits, '.', '_' and '-', never hidden, never '..'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name).strip("._") or fallback
    return stem[:120]


def save_uploads(root: Root, files: list, folder_name: str, max_bytes: int, sources: Path | None = None) -> tuple[Path, list[tuple[str, str]], list[str]]:
    """Copy uploaded files into ROOT/uploads/NAME: (folder, refused [(name, reason)], saved names).

    Only image types the data layer reads, kohya caption sidecars and metadata.jsonl/csv are kept, each at most
    `max_bytes`; whether an image is usable is the data layer's call (`data inspect` reports it). With `sources`,
    an upload must lie in that folder (Gradio's upload folder): a client cannot name a file of the machine."""
    import shutil

    from genadapt.data.images import IMAGE_EXTENSIONS

    folder = root.resolve(Path("uploads") / safe_name(folder_name, "set"), "upload folder")
    folder.mkdir(parents=True, exist_ok=True)
    refused, saved = [], []
    for item in files or []:
        source = Path(getattr(item, "name", None) or str(item))
        original = source.name
        if sources is not None and not Path(os.path.realpath(source)).is_relative_to(Path(os.path.realpath(sources))):
            refused.append((original, "not an uploaded file; not saved"))
            continue
        name = safe_name(original)
        suffix = Path(name).suffix.lower()
        if name.lower() not in METADATA_FILES and suffix not in (*IMAGE_EXTENSIONS, *CAPTION_FILES):
            refused.append((original, f"not an image type genadapt reads ({', '.join(IMAGE_EXTENSIONS)}), a .txt caption or metadata.jsonl/csv; not saved"))
            continue
        try:
            size = source.stat().st_size
        except OSError as exc:
            refused.append((original, f"the upload cannot be read ({exc.strerror or type(exc).__name__}); not saved"))
            continue
        if size > max_bytes:
            refused.append((original, f"{size / 1e6:.1f} MB, more than the {max_bytes / 1e6:g} MB an upload may be (genadapt ui --max-upload-mb); not saved"))
            continue
        stem, number = Path(name).stem, 1
        while name in saved:  # two uploads of one name (from two folders): keep both
            name, number = f"{stem}-{number}{Path(name).suffix}", number + 1
        shutil.copyfile(source, folder / name)
        saved.append(name)
    return folder, refused, saved


def _strip_path(reason: str, path: Path) -> str:
    prefix = f"{path}: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason


def report_html(root: Root, folder: Path, report: dict, refused: list[tuple[str, str]] = ()) -> str:
    """The `data inspect` report as HTML: counts, captions, duplicates, and every file that cannot be used, with why."""
    e = html.escape
    where = e(root.rel(folder))
    parts = [f"<div id='ga-inspect'><p><b>{e(str(report['usable']))} usable image(s)</b>, {len(report['unusable']) + len(refused)} unusable, in <code>{where}</code></p>"]
    facts = []
    if report.get("formats"):
        facts.append("formats: " + ", ".join(f"{e(k)} {v}" for k, v in sorted(report["formats"].items())))
        facts.append("modes: " + ", ".join(f"{e(k)} {v}" for k, v in sorted(report["modes"].items())))
    sizes = report.get("sizes") or {}
    if sizes.get("min"):
        facts.append(f"sizes: {sizes['min'][0]}x{sizes['min'][1]} to {sizes['max'][0]}x{sizes['max'][1]} ({sizes['distinct']} distinct)")
    captions = {k: v for k, v in (report.get("captions") or {}).items() if k != "metadata_file"}
    source = f" from {e(report['captions']['metadata_file'])}" if (report.get("captions") or {}).get("metadata_file") else ""
    facts.append("captions found: " + (", ".join(f"{e(k)} {v}" for k, v in captions.items()) or "none") + source)
    parts.append("<ul>" + "".join(f"<li>{fact}</li>" for fact in facts) + "</ul>")
    broken = [(item["file"], _strip_path(item["reason"], folder / item["file"])) for item in report["unusable"]] + list(refused)
    if broken:
        rows = "".join(f"<tr><td><code>{e(name)}</code></td><td>{e(reason)}</td></tr>" for name, reason in broken)
        parts.append(f"<h4>Unusable files (skipped by training)</h4><table id='ga-unusable'><tr><th align='left'>file</th><th align='left'>reason</th></tr>{rows}</table>")
    for group in report.get("exact_duplicates") or []:
        parts.append("<p>exact duplicates: " + ", ".join(f"<code>{e(name)}</code>" for name in group) + "</p>")
    for pair in report.get("near_duplicates") or []:
        parts.append(f"<p>near duplicates: <code>{e(pair['a'])}</code> ~ <code>{e(pair['b'])}</code> (dHash distance {pair['dhash_bits']})</p>")
    for name in report.get("metadata_unmatched") or []:
        parts.append(f"<p>metadata row naming no image file (caption unused): <code>{e(name)}</code></p>")
    if report["usable"] < 1:
        parts.append("<p><b>No usable image: training would refuse this data.</b></p>")
    return "".join(parts) + "</div>"


def caption_rows(folder: Path, caption_extension: str = ".txt") -> list[list[str]]:
    """[file, caption, where it comes from] for every usable image, as training reads them."""
    from genadapt.data import load_dataset
    from genadapt.data.captions import caption_path
    from genadapt.errors import DataError

    try:
        images = load_dataset(str(folder), resolution=8, caption_extension=caption_extension)
    except DataError:
        return []
    rows = []
    for record in images.records:
        origin = caption_path(folder / record.id, caption_extension).name if caption_path(folder / record.id, caption_extension).exists() else ("metadata" if record.caption else "none")
        rows.append([record.id, record.caption or "", origin])
    return rows


def write_captions(root: Root, folder: Path, rows: list, caption_extension: str = ".txt") -> int:
    """Write edited captions as kohya sidecars (NAME.txt beside NAME.png); a cleared caption removes its sidecar.
    Returns how many files changed."""
    from genadapt.data.captions import caption_path
    from genadapt.runs import write_text

    current = {file: caption for file, caption, _ in caption_rows(folder, caption_extension)}
    changed = 0
    for row in rows or []:
        if not row or not str(row[0]).strip():
            continue
        file, text = str(row[0]).strip(), ("" if len(row) < 2 or row[1] is None else str(row[1])).strip()
        if file not in current:
            raise UserError(f"{file}: not a usable image of {root.rel(folder)}; captions belong to the images listed")
        if text == current[file]:
            continue
        sidecar = root.resolve(caption_path(folder / file, caption_extension), "caption file")
        if not (sidecar.parent == folder or folder in sidecar.parents):
            raise PathRefused(f"{file}: its caption file would lie outside {root.rel(folder)}")
        if text:
            write_text(sidecar, text + "\n")
        elif sidecar.exists():
            sidecar.unlink()
        changed += 1
    return changed


# ----------------------------------------------------------------------------- base and command lines


def base_value(root: Root, choice: str, path: str) -> tuple[str, str]:
    """(base for this process, base as typed in the root)."""
    if choice in POCKET_BASES:
        return choice, choice
    resolved = root.resolve(path, "base", must_exist=True)
    return str(resolved), root.rel(resolved)


def check_base(root: Root, choice: str, path: str, allow_pickle: bool) -> str:
    """Load the base as a run would (`models.load_base`): its one-line error, or what it is."""
    import gc

    from genadapt.models import load_base

    base, typed = base_value(root, choice, path)
    model = load_base(base, allow_pickle=allow_pickle)
    count = sum(parameter.numel() for _, parameter in model.named_parameters())
    family = model.family
    del model
    gc.collect()
    return f"{typed}: a {family} model, {count / 1e6:.1f} M parameters"


def family_of_choice(root: Root, choice: str, path: str) -> str:
    from genadapt.families import family_of

    try:
        base, _ = base_value(root, choice, path)
    except UserError:
        return "diffusion"
    return family_of(base)


def _argv(values: dict) -> list[str]:
    from genadapt.config import flag

    argv = []
    for key, value in values.items():
        if value is None or value is False or value == []:
            continue
        if value is True:
            argv.append(flag(key))
        elif key == "variant":  # repeatable: one flag per spec, as a spec holds commas of its own
            for spec in value:
                argv += [flag(key), spec]
        else:
            argv += [flag(key), ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)]
    return argv


def _number(value, what: str, integer: bool = True):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r}: type a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserError(f"{what} {value}: type a finite number")
    if integer:
        if number != int(number):
            raise UserError(f"{what} {value}: type a whole number")
        return int(number)
    return number


def plan_job(root: Root, form: dict) -> dict:
    """Validate the form with the CLI's own config models; the command line (root-relative, as typed in a shell in
    the root) and what progress needs. Raises the CLI's one-line UserError."""
    from genadapt.config import AdaptConfig, CompareConfig, build_config

    from genadapt.families import family_module, family_of

    mode = form.get("mode") or MODES[1]
    base, base_typed = base_value(root, form.get("base_choice") or "pocket-sd", form.get("base_path") or "")
    if base not in POCKET_BASES:
        family_module(family_of(base)).resolve_base(base)  # the CLI's check of a model folder, before any work
    data, data_typed = _data_spec(root, form.get("data") or "", "--data")
    out = root.resolve(form.get("out") or "", "--out")
    caption = (form.get("caption") or "").strip() or None
    seed = _number(form.get("seed"), "--seed")
    if mode == MODES[2]:
        values = {"base": base, "data": data, "out": out, "train": form.get("train") or None, "steps": _number(form.get("steps"), "--steps"),
                  "caption": caption, "seed": seed, "validate_every": _number(form.get("validate_every"), "--validate-every"),
                  "allow_pickle": bool(form.get("allow_pickle"))}
        config = build_config(AdaptConfig, {}, values)
        typed = {**values, "base": base_typed, "data": data_typed, "out": root.rel(out)}
        if not typed["allow_pickle"]:
            typed.pop("allow_pickle")
        argv = ["adapt", *_argv(typed)]
        return {"kind": "adapt", "argv": argv, "out": out, "steps": config.steps, "family": config.family}
    reference = (form.get("reference") or "").strip()
    reference, reference_typed = _data_spec(root, reference, "--reference") if reference else (None, None)
    choose = mode == MODES[0]
    shots = form.get("shots")
    values = {
        "base": base, "data": data, "reference": reference, "out": out,
        "shots": shots if (shots or "").strip() else None,
        "techniques": None if choose else (list(form.get("techniques") or []) or None),
        "steps": None if choose else _number(form.get("steps"), "--steps"),
        "samples": _number(form.get("samples"), "--samples"), "replicates": _number(form.get("replicates"), "--replicates"),
        "seed": seed, "caption": caption, "validate_every": _number(form.get("validate_every"), "--validate-every"),
        "lr_probe": _number(form.get("lr_probe"), "--lr-probe"),
        "variant": [line.strip() for line in (form.get("variant") or "").splitlines() if line.strip()] or None,
    }
    if values["steps"] is None:  # planned from a timing probe within the budget
        values["budget_minutes"] = _number(form.get("budget_minutes"), "--budget-minutes", integer=False)
    if not choose and not values["techniques"]:
        raise UserError("--techniques: pick at least one technique, or let compare choose")
    config = build_config(CompareConfig, {}, values)
    if config.family == "diffusion":
        values["sample_steps"] = _number(form.get("sample_steps"), "--sample-steps")
        config = build_config(CompareConfig, {}, values)
    elif form.get("allow_pickle"):
        raise UserError("allow pickle: compare takes no --allow-pickle; convert the .pt to a model folder, or run one adapt run")
    typed = {**values, "base": base_typed, "data": data_typed, "reference": reference_typed, "out": root.rel(out)}
    typed["shots"] = ",".join(str(s) for s in config.shots) if values["shots"] is not None else None
    argv = ["compare", *_argv(typed)]
    return {"kind": "compare", "argv": argv, "out": out, "steps": config.steps, "family": config.family}


def command_line(root: Root, argv: list[str]) -> str:
    return f"cd {shlex.quote(str(root.path))} && genadapt {shlex.join(argv)}"


# ----------------------------------------------------------------------------- the job: a subprocess


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TQDM = re.compile(r"^\s*(?P<desc>[^:|]{1,80}):\s+\d+%\|")


class Job:
    """`python -m genadapt compare|adapt ...` in the root: its output, its progress, its cancel (SIGINT)."""

    def __init__(self, root: Root, plan: dict):
        self.root, self.kind, self.argv, self.out, self.steps = root, plan["kind"], plan["argv"], Path(plan["out"]), plan.get("steps")
        self.command = command_line(root, self.argv)
        self.lines: deque[str] = deque(maxlen=600)
        self.started = time.time()
        self.ended: float | None = None
        self.cancelled = False
        self.seen: dict[str, tuple[float, int]] = {}  # run -> (time, step) when its progress was first seen
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("GENADAPT_DEBUG", None)  # one-line errors, as the CLI prints them
        self.process = subprocess.Popen(
            [sys.executable, "-m", "genadapt", *self.argv], cwd=root.path, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=hasattr(os, "killpg"),
        )
        self.reader = threading.Thread(target=self._read, name="genadapt-ui-job", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buffer = b""
        stream = self.process.stdout
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            buffer += chunk
            *parts, buffer = re.split(rb"[\r\n]", buffer)
            for part in parts:
                text = ANSI.sub("", part.decode("utf-8", "replace")).rstrip()
                if text.strip():
                    self.lines.append(text)
        if buffer.strip():
            self.lines.append(ANSI.sub("", buffer.decode("utf-8", "replace")).rstrip())
        self.process.wait()
        self.ended = time.time()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def _signal(self, number: int) -> None:
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.process.pid, number)  # the whole group, as Ctrl-C in a terminal: --jobs children too
            else:  # pragma: no cover - Windows
                self.process.send_signal(number)
        except (ProcessLookupError, PermissionError):
            pass

    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """SIGINT: the loop finishes its step, checkpoints and exits 130; finished runs are kept. A second SIGINT
        after `grace` seconds stops it at once (the last checkpoint is still there), SIGKILL after that."""
        if not self.running or self.cancelled:
            return
        self.cancelled = True
        self._signal(signal.SIGINT)

        def escalate():
            for number, wait in ((signal.SIGINT, grace), (getattr(signal, "SIGKILL", signal.SIGTERM), 15)):
                try:
                    self.process.wait(timeout=wait)
                    return
                except subprocess.TimeoutExpired:
                    self._signal(number)

        threading.Thread(target=escalate, name="genadapt-ui-cancel", daemon=True).start()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join(timeout=5)
        return self.returncode

    def log_lines(self, most: int = 14) -> list[str]:
        """The output without tracebacks, each progress bar at its latest state."""
        kept, bars, skipping = [], {}, False
        for line in list(self.lines):
            if line.startswith(("Traceback (most recent call last)", "During handling of the above exception", "The above exception was")):
                skipping = True
                continue
            if skipping and (line.startswith((" ", "\t")) or line.strip() in ("^", "")):
                continue
            skipping = False
            match = TQDM.match(line)
            if match:
                key = match.group("desc").strip()
                if key in bars:
                    kept[bars[key]] = line
                    continue
                bars[key] = len(kept)
            kept.append(line)
        return kept[-most:]

    def outcome(self) -> tuple[str, str]:
        """(state, one-line message): running, done, cancelled, error or failed."""
        code = self.returncode
        elapsed = _duration((self.ended or time.time()) - self.started)
        if code is None:
            return ("cancelling" if self.cancelled else "running"), f"running for {elapsed}"
        if code == 0:
            return "done", f"finished in {elapsed}"
        if code == 130 or self.cancelled:
            return "cancelled", (f"cancelled after {elapsed}: finished runs and checkpoints are kept in {self.root.rel(self.out)}; "
                                 "start again with the same settings, or run the command below, to resume")
        errors = [line for line in self.lines if line.startswith("error: ")]
        if errors:
            return "error", errors[-1]
        last = self.log_lines(1)
        return "failed", f"stopped with exit code {code}" + (f": {last[-1]}" if last else "")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _last_step(log: Path) -> int:
    """The last step log.jsonl records (a line being written is skipped)."""
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue
    return 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def file_url(root: Root, path: Path) -> str:
    from urllib.parse import quote

    version = ""
    try:
        version = f"?v={int(path.stat().st_mtime_ns)}"
    except OSError:
        pass
    return f"/genadapt/file/{quote(root.rel(path))}{version}"


def download_url(root: Root, run: Path) -> str:
    from urllib.parse import quote

    return f"/genadapt/download/{quote(root.rel(run))}"


def _curves(run: Path) -> str:
    """The report's own charts of log.jsonl (loss terms) and validation.jsonl (validation KID, copy rate)."""
    from genadapt.eval import report

    charts = []
    for name, draw in (("log.jsonl", getattr(report, "_loss_curve", None)), ("validation.jsonl", getattr(report, "_validation_curve", None))):
        if draw is None or not (run / name).is_file():
            continue
        try:
            charts.append(draw(run))
        except (ValueError, KeyError, TypeError, IndexError, OSError):  # a line half written this instant
            continue
    return "".join(charts)


def _latest_picture(run: Path) -> Path | None:
    pictures = sorted((run / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime) if (run / "samples").is_dir() else []
    evaluated = run / "eval" / "samples.png"
    if evaluated.is_file():
        pictures.append(evaluated)
    return pictures[-1] if pictures else None


def _run_card(root: Root, job: "Job | None", name: str, run: Path, total: int | None, finished: bool) -> str:
    e = html.escape
    step = _last_step(run / "log.jsonl")
    trained = (run / "summary.json").is_file()
    if finished:
        stage, step = "done", (total or step)
    elif trained:
        stage = "sampling and evaluating" if job and job.kind == "compare" else "saving"
        step = total or step
    elif step:
        stage = "training"
    else:
        stage = "waiting" if not run.exists() else "starting"
    eta = ""
    if job is not None and stage == "training" and total:
        now = time.time()
        first = job.seen.setdefault(name, (now, step))
        if step > first[1] and now > first[0]:
            rate = (step - first[1]) / (now - first[0])
            eta = f" · ETA {_duration((total - step) / rate)}"
    bar = f"<progress max='{total or 1}' value='{min(step, total or step) if total else (1 if finished else 0)}' style='width:16em'></progress>"
    steps = f"{step}/{total} steps" if total else f"{step} steps"
    picture = _latest_picture(run)
    image = f"<img class='ga-sample' src='{file_url(root, picture)}' alt='samples of {e(name)}' style='image-rendering:pixelated;max-width:260px'>" if picture else ""
    curve = _curves(run)
    return (f"<div class='ga-run' data-run='{e(name)}' style='border:1px solid #ddd;padding:.4em;margin:.3em 0'>"
            f"<b>{e(name)}</b> {bar} {steps} · {e(stage)}{eta}"
            f"<div style='display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap'>{curve}{image}</div></div>")


def progress_html(job: "Job | None", root: Root, kind: str, out: Path) -> str:
    """A bar per run (steps, stage, ETA), the loss curve as it grows and the newest sample grid of each run."""
    if kind == "adapt":
        finished = (out / "summary.json").is_file() and (job is None or not job.running)
        return _run_card(root, job, out.name, out, job.steps if job else None, finished)
    plan = _read_json(out / "plan.json")
    if plan is None:
        probes = sorted((out / "probe").glob("*/")) if (out / "probe").is_dir() else []
        running = job is not None and job.running
        note = "timing probe: " + ", ".join(html.escape(p.name) for p in probes) if probes else ("preparing the data and the plan" if running else "no plan yet")
        return f"<p class='ga-phase'>{note}</p>"
    parts = []
    bases = sorted(out.glob("base*/eval-*shot.json"))
    base_total = len(plan.get("shots", [])) * int(plan.get("replicates", 1))
    parts.append(f"<p class='ga-phase'>{len(plan['runs'])} run(s) of {plan['steps']} steps; unadapted base evaluated: {len(bases)}/{base_total}"
                 + (f"; dropped: {html.escape('; '.join(plan['dropped']))}" if plan.get("dropped") else "") + "</p>")
    probes = sorted((out / "lr_probe").glob("*/")) if (out / "lr_probe").is_dir() else []
    if probes:
        done = sum(1 for p in probes if (p / "probe.json").is_file())
        chosen = _read_json(out / "lr_probe.json")
        rates = "; ".join(f"{html.escape(t)} {v['chosen']:.2g}" for t, v in (chosen or {}).get("techniques", {}).items() if v.get("chosen"))
        parts.append(f"<p class='ga-phase'>learning-rate probe: {done}/{len(probes)} run(s) finished" + (f"; chosen: {rates}" if rates else "") + "</p>")
    for name in plan["runs"]:
        run = out / "runs" / name
        parts.append(_run_card(root, job, name, run, plan["steps"], (run / "eval.json").is_file()))
    if (out / "results.json").is_file() and (out / "report.html").is_file() and (job is None or not job.running):
        parts.append("<p class='ga-phase'>report written</p>")
    return "".join(parts)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def finished_runs(out: Path) -> list[Path]:
    """Run folders with a summary (trained and saved) in a compare OUT/runs or an adapt OUT."""
    if (out / "summary.json").is_file() and (out / "run.json").is_file():
        return [out]
    runs = out / "runs"
    return sorted(p for p in runs.iterdir() if (p / "summary.json").is_file()) if runs.is_dir() else []


def downloads_html(root: Root, out: Path) -> str:
    e = html.escape
    links = []
    for run in finished_runs(out):
        summary = _read_json(run / "summary.json") or {}
        artifacts = summary.get("artifacts") or []
        size = _size(summary["artifact_bytes"]) if isinstance(summary.get("artifact_bytes"), (int, float)) else ""
        links.append(f"<a class='ga-download' href='{download_url(root, run)}' download='{e(run.name)}.zip' "
                     f"style='display:inline-block;margin:.2em;padding:.3em .7em;border:1px solid #1f77b4;border-radius:4px;text-decoration:none'>"
                     f"⬇ {e(run.name)}.zip</a> <small>{e(', '.join(artifacts))} {e(size)}</small>")
    return ("<h4>Downloads</h4><div id='ga-downloads'>" + "<br>".join(links) + "</div>") if links else ""


def answer_html(root: Root, out: Path, kind: str) -> str:
    """The compare report inline, verdict first, and a download per run; for one run its samples and download."""
    e = html.escape
    parts = []
    results = _read_json(out / "results.json") if kind == "compare" else None
    if results is not None:
        from genadapt.eval.report import verdict

        lines = verdict(results) or ["no recommendation (no run finished)"]
        parts.append("<div id='ga-verdict' style='background:#f3f7ff;border-left:4px solid #1f77b4;padding:.6em 1em'>" + "<br>".join(lines) + "</div>")
        if (out / "report.html").is_file():
            url = file_url(root, out / "report.html")
            parts.append(f"<p><a id='ga-report-link' href='{url}' target='_blank'>open the full report ({e(root.rel(out / 'report.html'))})</a></p>"
                         f"<iframe id='ga-report' src='{url}' title='compare report' style='width:100%;height:1100px;border:1px solid #ddd'></iframe>")
    elif kind == "adapt" and (out / "summary.json").is_file():
        picture = _latest_picture(out)
        if picture is not None:
            parts.append(f"<figure><img class='ga-sample' src='{file_url(root, picture)}' style='image-rendering:pixelated;max-width:512px'>"
                         f"<figcaption>{e(root.rel(picture))}</figcaption></figure>")
    downloads = downloads_html(root, out)
    if downloads:
        parts.append(downloads)
    return "".join(parts)


def artifact_zip(root: Root, run: Path) -> Path:
    """A zip of a finished run's artifacts (LoRA files, embeddings, a pipeline folder) with its config.yaml, run.json
    and summary.json; every member must resolve inside the run folder."""
    summary = _read_json(run / "summary.json")
    if not isinstance(summary, dict):
        raise UserError(f"{root.rel(run)}: not a finished run (no summary.json)")
    members = [*(summary.get("artifacts") or []), "config.yaml", "run.json", "summary.json"]
    handle, name = tempfile.mkstemp(prefix="genadapt-ui-", suffix=".zip")
    os.close(handle)
    try:
        with zipfile.ZipFile(name, "w") as archive:
            for member in dict.fromkeys(members):
                path = root.resolve(run / str(member), "artifact")
                if not (path == run or run in path.parents):
                    raise PathRefused(f"{member}: an artifact outside its run folder {root.rel(run)}")
                files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
                for file in files:
                    real = file.resolve()
                    if not (real == run or run in real.parents):
                        continue  # a link out of the run folder is not the run's
                    compression = zipfile.ZIP_STORED if file.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                    archive.write(real, f"{run.name}/{file.relative_to(run).as_posix()}", compress_type=compression)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def host_warning(host: str, port: int, root: Root) -> str | None:
    if host in LOCAL_HOSTS:
        return None
    return (f"warning: genadapt ui is bound to {host}:{port}, so anyone who can reach this machine can upload, train and read files under "
            f"{root.path}; use --host 127.0.0.1 to keep it on this machine")


# ----------------------------------------------------------------------------- the app


def _accepts(callable_, **kwargs) -> dict:
    """The keyword arguments this Gradio version's `callable_` takes (Gradio 4 to 6 moved a few)."""
    parameters = _inspect.signature(callable_).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def _message(text: str, kind: str = "ok") -> str:
    colors = {"ok": "#1a7f37", "error": "#b42318", "info": "#555"}
    role = " role='alert'" if kind == "error" else ""
    return f"<p class='ga-{kind}'{role} style='color:{colors.get(kind, '#555')}'>{html.escape(text)}</p>"


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"internal error ({type(exc).__name__}{': ' + first if first else ''}); the server's log has the details"


class App:
    """One UI server's state: the root, the upload limit, and the job (one at a time)."""

    def __init__(self, root: str | Path, max_upload_mb: float = 50.0):
        self.root = Root(root)
        self.max_bytes = int(max_upload_mb * 1e6)
        self.job: Job | None = None
        self.last: dict | None = None  # kind and out of the last job, for its progress and answer
        self.lock = threading.Lock()

    # --- guarded handlers: a UserError is its message, anything else one line (the traceback goes to the server log)

    def guarded(self, outputs: int, status: int):
        def wrap(function):
            def run(*args):
                try:
                    return function(*args)
                except Exception as exc:  # noqa: BLE001 - shown as one line, never as a stack trace
                    if not isinstance(exc, UserError):
                        traceback.print_exc()
                    import gradio as gr

                    values = [gr.update() for _ in range(outputs)]
                    values[status] = _message(_error_text(exc), "error")
                    return tuple(values) if outputs > 1 else values[0]

            run.__name__ = function.__name__
            run.__doc__ = function.__doc__
            return run

        return wrap

    # --- data

    def inspect_folder(self, folder_text: str, caption: str = ""):
        """Inspect a folder under the root: the report, the caption table, the folder for --data."""
        folder = self.root.resolve(folder_text, "folder", must_exist=True)
        if not folder.is_dir():
            raise UserError(f"folder {folder_text}: is a file; type the folder that holds the images")
        return self._inspected(folder, [], f"inspected {self.root.rel(folder)}", caption)

    def _inspected(self, folder: Path, refused: list, note: str, caption: str = ""):
        from genadapt.data.inspect import inspect

        report = inspect(str(folder), (caption or "").strip() or None)
        rows = caption_rows(folder)
        return (_message(note, "ok"), report_html(self.root, folder, report, refused),
                {"headers": ["file", "caption", "from"], "data": rows or [["", "", ""]]}, self.root.rel(folder))

    def upload(self, files, folder_name: str, caption: str = ""):
        if not files:
            raise UserError("no files were uploaded; drop images on the upload area")
        from gradio.utils import get_upload_folder

        folder, refused, saved = save_uploads(self.root, files, folder_name or f"set-{time.strftime('%Y%m%d-%H%M%S')}", self.max_bytes,
                                              Path(get_upload_folder()))
        note = f"saved {len(saved)} file(s) to {self.root.rel(folder)}" + (f"; refused {len(refused)}" if refused else "")
        return self._inspected(folder, refused, note, caption)

    def save_captions(self, folder_text: str, table):
        folder = self.root.resolve(folder_text, "folder", must_exist=True)
        rows = table.get("data") if isinstance(table, dict) else (table.values.tolist() if hasattr(table, "values") else table)
        changed = write_captions(self.root, folder, rows)
        return self._inspected(folder, [], f"wrote {changed} caption file(s) (kohya NAME.txt) in {self.root.rel(folder)}")

    # --- base

    def check_base(self, choice: str, path: str, allow_pickle: bool):
        return _message(check_base(self.root, choice, path, bool(allow_pickle)), "ok")

    def base_changed(self, choice: str, path: str):
        import gradio as gr

        from genadapt import techniques

        family = family_of_choice(self.root, choice, path)
        presets = list(techniques.compare_presets(family))
        parameters = techniques.names("parameter", family)
        from genadapt.families import family_module

        defaults = family_module(family).DEFAULTS
        return (gr.update(choices=presets, value=[t for t in presets if t in ("embedding",)] or presets[:1]),
                gr.update(choices=parameters, value=defaults["train"]))

    # --- jobs

    def start(self, mode, base_choice, base_path, allow_pickle, data, reference, caption, techniques, shots, budget, steps,
              samples, replicates, sample_steps, seed, train, out, validate_every="", lr_probe=None, variant=""):
        form = {"mode": mode, "base_choice": base_choice, "base_path": base_path, "allow_pickle": allow_pickle, "data": data,
                "reference": reference, "caption": caption, "techniques": techniques, "shots": shots, "budget_minutes": budget,
                "steps": steps, "samples": samples, "replicates": replicates, "sample_steps": sample_steps, "seed": seed,
                "train": train, "out": out, "validate_every": validate_every, "lr_probe": lr_probe, "variant": variant}
        with self.lock:
            if self.job is not None and self.job.running:
                raise UserError("a job is running; cancel it or wait for it to finish (one job at a time)")
            plan = plan_job(self.root, form)
            self.job = Job(self.root, plan)
            self.last = {"kind": plan["kind"], "out": plan["out"]}
        return _message(f"started: {self.job.command}", "info"), "", ""

    def cancel(self):
        job = self.job
        if job is None or not job.running:
            return _message("nothing is running", "info")
        job.cancel()
        return _message("cancelling: the current step finishes and checkpoints; finished runs are kept", "info")

    def show_results(self, mode: str, out: str):
        kind = "adapt" if mode == MODES[2] else "compare"
        folder = self.root.resolve(out, "--out", must_exist=True)
        with self.lock:
            if self.job is not None and self.job.running:
                raise UserError("a job is running; its results show here when it finishes")
            self.job, self.last = None, {"kind": kind, "out": folder}
        answer = answer_html(self.root, folder, kind)
        return _message(f"results of {self.root.rel(folder)}" if answer else f"{self.root.rel(folder)} holds no finished {kind} yet", "info"), \
            progress_html(None, self.root, kind, folder), answer

    def poll(self, sent: dict | None):
        """What the page shows of the job now; an output that did not change since this page's last poll is skipped."""
        import gradio as gr

        sent = dict(sent or {})
        job, last = self.job, self.last
        if last is None:
            values = {"status": "", "command": "", "progress": "", "log": "", "answer": ""}
        else:
            kind, out = last["kind"], last["out"]
            if job is not None:
                state, text = job.outcome()
                status = _message(text, {"running": "info", "cancelling": "info", "done": "ok"}.get(state, "error"))
                command = f"<p><small>the same on the command line (rerun it to resume):</small><br><code id='ga-command'>{html.escape(job.command)}</code></p>"
                log = "\n".join(job.log_lines())
            else:
                state, status, command, log = "done", "", "", ""
            values = {"status": status, "command": command, "progress": progress_html(job, self.root, kind, out), "log": log,
                      "answer": "" if state in ("running", "cancelling") else answer_html(self.root, out, kind)}
        updates = []
        for key in ("status", "command", "progress", "log", "answer"):
            digest = hash(values[key])
            updates.append(gr.update() if sent.get(key) == digest else values[key])
            sent[key] = digest
        return (*updates, sent)

    # --- sample

    def sample_choices(self) -> tuple[list[str], list[str]]:
        """(every finished run found under ROOT/runs and the last job's out, the LoRA runs among them)."""
        from genadapt.models import is_run

        places = [self.root.path / "runs"]
        if self.last is not None:
            places.append(Path(self.last["out"]))
        found = []
        for place in places:
            if not place.is_dir():
                continue
            for summary in [*place.glob("summary.json"), *place.glob("*/summary.json"), *place.glob("*/runs/*/summary.json"), *place.glob("runs/*/summary.json")]:
                run = summary.parent
                if self.root.contains(run.resolve()) and is_run(run):
                    found.append(run.resolve())
        runs = sorted(dict.fromkeys(found))
        loras = [self.root.rel(r) for r in runs if (_read_json(r / "run.json") or {}).get("train") == "lora"]
        return [*POCKET_BASES, *(self.root.rel(r) for r in runs)], loras

    def refresh_runs(self):
        import gradio as gr

        runs, loras = self.sample_choices()
        return (gr.update(choices=runs), *(gr.update(choices=["", *loras]) for _ in range(LORA_SLOTS)))

    def sample(self, model, prompt, n, steps, guidance, seed, truncation, embedding_weight, *lora_values):
        import numpy as np
        from PIL import Image

        from genadapt.api import sample as run_sample
        from genadapt.grid import to_uint8

        model = (model or "").strip()
        target = model if model in POCKET_BASES else str(self.root.resolve(model, "model", must_exist=True))
        loras = []
        for path, weight in zip(lora_values[0::2], lora_values[1::2]):
            if path and str(path).strip() and weight:
                loras.append((str(self.root.resolve(path, "--lora", must_exist=True)), float(weight)))
        n = _number(n, "-n") or 4
        if not 1 <= n <= 64:
            raise UserError(f"-n {n}: ask for 1 to 64 images")
        steps = _number(steps, "--steps")
        if steps is not None and steps < 1:
            raise UserError(f"--steps {steps}: the sampler needs at least one step")
        prompts = [line.strip() for line in (prompt or "").splitlines() if line.strip()]
        weight = _number(embedding_weight, "--embedding-weight", integer=False)
        images = run_sample(target, prompts, n=n, steps=steps, guidance=_number(guidance, "--guidance", integer=False),
                            seed=_number(seed, "--seed") or 0, loras=loras, truncation=float(truncation or 1.0), embedding_weight=weight)
        pixels = to_uint8(images)
        scale = max(1, 128 // pixels.shape[1])
        pictures = [Image.fromarray(np.ascontiguousarray(p.repeat(scale, 0).repeat(scale, 1))) for p in pixels]
        what = model + ("" if weight is None else f" (trigger at {weight:g})") + "".join(f" + {self.root.rel(Path(p))}@{w:g}" for p, w in loras)
        return _message(f"{n} image(s) of {what}, seed {_number(seed, '--seed') or 0}", "ok"), pictures


LORA_SLOTS = 3


def mode_changed(mode: str):
    """The fields each mode reads: compare choose (budget), compare pick (techniques, shots, steps), one run (train, steps)."""
    import gradio as gr

    compare, pick = mode != MODES[2], mode == MODES[1]
    return (gr.update(visible=pick), gr.update(visible=compare), gr.update(visible=compare), gr.update(visible=mode != MODES[0]),
            gr.update(visible=not compare), gr.update(visible=compare), gr.update(visible=compare), gr.update(visible=compare),
            gr.update(visible=compare), gr.update(visible=compare))


def build_blocks(app: App, theme=None):
    """The Gradio page: Data, Base, Compare or one run (with the answer), Sample."""
    import gradio as gr

    from genadapt import techniques

    presets = list(techniques.compare_presets("diffusion"))
    parameters = techniques.names("parameter", "diffusion")
    g = app.guarded
    with gr.Blocks(**_accepts(gr.Blocks.__init__, title="genadapt", analytics_enabled=False, theme=theme)) as blocks:
        gr.Markdown(f"# genadapt\nAdapt a pretrained generator to your images, and learn which technique fits your data budget. "
                    f"Every path is relative to the root `{app.root.path}` and must stay inside it.")
        with gr.Tab("1 · Data"):
            with gr.Row():
                with gr.Column(scale=2):
                    files = gr.File(file_count="multiple", label="Drop images here (and optional NAME.txt captions or metadata.jsonl)", elem_id="ga-upload")
                with gr.Column(scale=1):
                    upload_name = gr.Textbox(label="Upload folder (under uploads/; empty: set-DATE-TIME)", elem_id="ga-upload-name")
                    folder_text = gr.Textbox(label="…or a folder on this machine (under the root)", placeholder="e.g. my-images", elem_id="ga-folder")
                    inspect_button = gr.Button("Inspect folder", elem_id="ga-inspect-button")
            data_status = gr.HTML(elem_id="ga-data-status")
            report = gr.HTML(elem_id="ga-report-data")
            captions = gr.Dataframe(**_accepts(gr.Dataframe.__init__, headers=["file", "caption", "from"], datatype=["str", "str", "str"],
                                               type="array", interactive=True, wrap=True, label="Captions: edit, then save (written as kohya NAME.txt beside each image)",
                                               static_columns=[0, 2], elem_id="ga-captions"))
            save_button = gr.Button("Save captions", elem_id="ga-save-captions")
        with gr.Tab("2 · Base"):
            base_choice = gr.Radio([*POCKET_BASES, LOCAL_BASE], value="pocket-sd", label="Pretrained model", elem_id="ga-base")
            base_path = gr.Textbox(label="Local model: a diffusers pipeline folder, a StyleGAN2 model folder or a rosinality .pt (under the root)", elem_id="ga-base-path")
            allow_pickle = gr.Checkbox(value=False, label="allow pickle: read a rosinality .pt with torch.load(weights_only=True), as --allow-pickle", elem_id="ga-allow-pickle")
            check_button = gr.Button("Check base", elem_id="ga-check-base")
            base_status = gr.HTML(elem_id="ga-base-status")
        with gr.Tab("3 · Compare or one run"):
            with gr.Row():
                data_text = gr.Textbox(label="--data: the folder (or builtin:...)", elem_id="ga-data")
                reference_text = gr.Textbox(label="--reference: held-out images (empty: hold out 30% of --data)", elem_id="ga-reference")
                out_text = gr.Textbox(label="--out (rerun the same to resume)", value="runs/ui", elem_id="ga-out")
            mode = gr.Radio(list(MODES), value=MODES[0], label="What to run", elem_id="ga-mode")
            with gr.Row():
                technique_choice = gr.CheckboxGroup(presets, value=["embedding"], label="--techniques", visible=False, elem_id="ga-techniques")
                shots = gr.Textbox(value="1,5,10", label="--shots", elem_id="ga-shots")
                budget = gr.Number(value=15, label="--budget-minutes", elem_id="ga-budget")
                steps = gr.Textbox(label="--steps (empty: plan them from the budget)", visible=False, elem_id="ga-steps")
                train = gr.Dropdown(parameters, value="lora", label="--train (one run)", visible=False, elem_id="ga-train")
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    caption = gr.Textbox(label="--caption: for images without a caption of their own (diffusion)", elem_id="ga-caption")
                    samples = gr.Number(value=64, precision=0, label="--samples", elem_id="ga-samples")
                    replicates = gr.Number(value=3, precision=0, label="--replicates", elem_id="ga-replicates")
                    sample_steps = gr.Number(value=25, precision=0, label="--sample-steps (diffusion)", elem_id="ga-sample-steps")
                    seed = gr.Number(value=0, precision=0, label="--seed", elem_id="ga-seed")
                    validate_every = gr.Textbox(label="--validate-every (empty: compare's steps / 4, adapt off; 0: off)", elem_id="ga-validate-every")
                    lr_probe = gr.Number(value=3, precision=0, label="--lr-probe: learning rates each technique tries first (1: none)", elem_id="ga-lr-probe")
                variant = gr.Textbox(label="--variant: a technique at other settings, compared under its own name; one a line, "
                                           "NAME=TECHNIQUE,KEY=VALUE,... (e.g. lora_r16=lora,rank=16)", lines=2, elem_id="ga-variant")
            with gr.Row():
                start_button = gr.Button("Start", variant="primary", elem_id="ga-start")
                cancel_button = gr.Button("Cancel (keeps what finished)", variant="stop", elem_id="ga-cancel")
                results_button = gr.Button("Show results in --out", elem_id="ga-show-results")
            job_status = gr.HTML(elem_id="ga-job-status")
            command = gr.HTML(elem_id="ga-command-box")
            progress = gr.HTML(elem_id="ga-progress")
            log = gr.Textbox(label="Output", lines=6, max_lines=14, interactive=False, elem_id="ga-log")
            gr.Markdown("### The answer")
            answer = gr.HTML(elem_id="ga-answer")
        with gr.Tab("4 · Sample"):
            with gr.Row():
                sample_model = gr.Dropdown([*POCKET_BASES], value="pocket-sd", allow_custom_value=True, label="A run folder or a base", elem_id="ga-sample-model")
                refresh_button = gr.Button("Find runs", elem_id="ga-find-runs")
            prompt = gr.Textbox(label="Prompt (one a line, cycled; empty for GANs)", elem_id="ga-prompt")
            with gr.Row():
                count = gr.Number(value=4, precision=0, label="-n", elem_id="ga-n")
                sample_steps_for_sampling = gr.Textbox(label="--steps (diffusion; empty: 25, or a student's own)", elem_id="ga-sampling-steps")
                guidance = gr.Textbox(label="--guidance (diffusion; empty: 4, or a student's own)", elem_id="ga-guidance")
                sample_seed = gr.Number(value=0, precision=0, label="--seed", elem_id="ga-sample-seed")
                truncation = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="--truncation (GAN)", elem_id="ga-truncation")
                embedding_weight = gr.Textbox(label="--embedding-weight (a textual-inversion run: 0 to 1; empty: as trained)", elem_id="ga-embedding-weight")
            lora_inputs = []
            with gr.Row():
                for slot in range(LORA_SLOTS):
                    with gr.Column():
                        lora_inputs.append(gr.Dropdown([""], value="", allow_custom_value=True, label=f"--lora {slot + 1}: a LoRA run", elem_id=f"ga-lora-{slot}"))
                        lora_inputs.append(gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="weight", elem_id=f"ga-lora-weight-{slot}"))
            sample_button = gr.Button("Generate", variant="primary", elem_id="ga-generate")
            sample_status = gr.HTML(elem_id="ga-sample-status")
            gallery = gr.Gallery(**_accepts(gr.Gallery.__init__, label="Samples", columns=4, elem_id="ga-gallery"))

        data_outputs = [data_status, report, captions, data_text]
        files.upload(g(4, 0)(app.upload), [files, upload_name, caption], data_outputs, api_name="upload")
        inspect_button.click(g(4, 0)(app.inspect_folder), [folder_text, caption], data_outputs, api_name="inspect_folder")
        folder_text.submit(g(4, 0)(app.inspect_folder), [folder_text, caption], data_outputs)
        save_button.click(g(4, 0)(app.save_captions), [data_text, captions], data_outputs, api_name="save_captions")
        check_button.click(g(1, 0)(app.check_base), [base_choice, base_path, allow_pickle], base_status, api_name="check_base")
        for trigger in (base_choice.change, base_path.blur):
            trigger(g(2, 0)(app.base_changed), [base_choice, base_path], [technique_choice, train], api_name=False)
        mode.change(mode_changed, mode, [technique_choice, shots, budget, steps, train, reference_text, samples, replicates, lr_probe, variant], api_name=False)
        start_inputs = [mode, base_choice, base_path, allow_pickle, data_text, reference_text, caption, technique_choice, shots, budget, steps,
                        samples, replicates, sample_steps, seed, train, out_text, validate_every, lr_probe, variant]
        start_button.click(g(3, 0)(app.start), start_inputs, [job_status, progress, answer], api_name="start")
        cancel_button.click(g(1, 0)(app.cancel), None, job_status, api_name="cancel")
        results_button.click(g(3, 0)(app.show_results), [mode, out_text], [job_status, progress, answer], api_name="show_results")
        sent = gr.State({})
        timer = gr.Timer(1.0)
        timer.tick(app.poll, sent, [job_status, command, progress, log, answer, sent], show_progress="hidden", api_name=False)
        refresh_outputs = [sample_model, *lora_inputs[0::2]]
        refresh_button.click(g(1 + LORA_SLOTS, 0)(app.refresh_runs), None, refresh_outputs, api_name=False)
        blocks.load(g(1 + LORA_SLOTS, 0)(app.refresh_runs), None, refresh_outputs, api_name=False)
        sample_button.click(g(2, 0)(app.sample), [sample_model, prompt, count, sample_steps_for_sampling, guidance, sample_seed, truncation, embedding_weight, *lora_inputs],
                            [sample_status, gallery], api_name="sample")
    return blocks


def make_server(app: App, theme=None):
    """FastAPI: /genadapt/file/PATH (a file under the root, for the report and its pictures), /genadapt/download/RUN
    (a run's artifacts as a zip) and the Gradio page at /."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, PlainTextResponse
    from starlette.background import BackgroundTask

    server = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def refused(exc: UserError) -> PlainTextResponse:
        return PlainTextResponse(str(exc), status_code=403 if isinstance(exc, PathRefused) else 404, headers=FILE_HEADERS)

    @server.get("/genadapt/file/{path:path}")
    def serve_file(path: str):
        try:
            target = app.root.resolve(path, "file", must_exist=True)
        except UserError as exc:
            return refused(exc)
        media = SERVED_TYPES.get(target.suffix.lower())
        hidden = any(part.startswith(".") for part in target.relative_to(app.root.path).parts)
        if not target.is_file() or media is None or hidden:
            return PlainTextResponse(f"{path}: not a page or picture the UI serves", status_code=404, headers=FILE_HEADERS)
        return FileResponse(target, media_type=media, headers=FILE_HEADERS)

    @server.get("/genadapt/download/{path:path}")
    def download(path: str):
        try:
            run = app.root.resolve(path, "run", must_exist=True)
            archive = artifact_zip(app.root, run)
        except UserError as exc:
            return refused(exc)
        return FileResponse(archive, media_type="application/zip", filename=f"{run.name}.zip",
                            background=BackgroundTask(os.unlink, archive), headers={"X-Content-Type-Options": "nosniff"})

    theme = theme or gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    blocks = build_blocks(app, theme)  # Gradio 4 and 5 take the theme here, Gradio 6 on mount_gradio_app
    options = _accepts(gr.mount_gradio_app, theme=theme, ssr_mode=False, max_file_size=app.max_bytes, allowed_paths=[], show_error=False)
    return gr.mount_gradio_app(server, blocks, path="/", **options)


class Running:
    """A server started in a background thread (`start`): its url, and `stop()`."""

    def __init__(self, server, thread: threading.Thread, url: str, app: App):
        self.server, self.thread, self.url, self.app = server, thread, url, app

    def stop(self) -> None:
        if self.app.job is not None and self.app.job.running:
            self.app.job.cancel(grace=10)
            self.app.job.wait(30)
        import logging

        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # streams still open are cut: not an error
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(root: str | Path, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 50.0) -> Running:
    """Serve in a background thread; returns once it accepts connections."""
    import uvicorn

    app = App(root, max_upload_mb)
    config = uvicorn.Config(make_server(app), host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="genadapt-ui", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise UserError(f"--host {host} --port {port}: the server did not start (is the port taken?)")
        time.sleep(0.05)
    return Running(server, thread, f"http://{'[' + host + ']' if ':' in host else host}:{port}", app)


def serve(host: str = "127.0.0.1", port: int = 7860, root: str | Path = ".", max_upload_mb: float = 50.0) -> None:
    """`genadapt ui`: serve until Ctrl-C; a running job is cancelled (it checkpoints) on the way out."""
    import socket

    import uvicorn

    app = App(root, max_upload_mb)
    os.chdir(app.root.path)  # relative paths mean the same here, in the jobs and in a shell in the root
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    warning = host_warning(host, port, app.root)
    if warning:
        print(warning, file=sys.stderr)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick another --port") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"genadapt ui: http://{shown}:{port}/  (root {app.root.path}; Ctrl-C stops it)", file=sys.stderr)
    try:
        uvicorn.run(make_server(app), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if app.job is not None and app.job.running:
            print("stopping the running job (it checkpoints; rerun the same command to resume)", file=sys.stderr)
            app.job.cancel(grace=30)
            app.job.wait(60)
