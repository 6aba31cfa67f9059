"""Run folders: atomic writes, recorded config, seed, versions and data manifest."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_mode() -> int:
    """0644 under the usual umask: a ComfyUI/A1111 server running as another user can read what we write
    (mkstemp's 0600 would lock it out)."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write) -> Path:
    """Write via a temp file in the same folder, then rename: a finished file is never half-written, and a
    failed write (disk full) leaves the previous version and no temp file behind."""
    from genadapt.runfolder import disk_full_error

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, readable_mode())
        os.replace(temporary, path)
    except OSError as exc:
        full = disk_full_error(exc, path, path.stat().st_size if path.is_file() else None)
        if full is not None:
            raise full from None
        raise
    except RuntimeError:  # torch.save reports a short write as RuntimeError ("unexpected pos ..."): was the disk full?
        import errno
        import shutil

        if shutil.disk_usage(path.parent).free < max(os.path.getsize(temporary) if os.path.exists(temporary) else 0, 1 << 20):
            raise disk_full_error(OSError(errno.ENOSPC, "No space left on device"), path, path.stat().st_size if path.is_file() else None) from None
        raise
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: Path, data) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: Path, what: str = "weights") -> dict:
    """The tensors of a user's .safetensors file, or a one-line UserError naming it, what is wrong and the fix.

    `what` says what the file is for, e.g. "StyleGAN2 generator weights"."""
    from safetensors.torch import load_file

    from genadapt.errors import UserError

    path = Path(path)
    if not os.path.lexists(path):
        raise UserError(f"{path}: no such file ({what}); check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a .safetensors file ({what}); pass the file, or remove the folder")
    try:
        return load_file(str(path))
    except PermissionError:
        raise UserError(f"{path}: cannot read {what} (permission denied); fix the file's permissions") from None
    except FileNotFoundError:
        raise UserError(f"{path}: {what} is a broken link; fix or remove the link") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError (Rust), OSError, MemoryError...: all mean a bad file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].removeprefix("Error while deserializing header: ")[:200]
        raise UserError(f"{path}: not a valid safetensors file of {what} ({reason}); re-save or re-download it") from None


def save_torch(path: Path, state: dict) -> Path:
    """Training state (optimiser moments, RNG) for resuming; reloaded only with weights_only=True."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_torch(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def field_defaults(model) -> dict:
    """A settings model's defaults, as config.yaml records values (paths as strings)."""
    return {name: json.loads(json.dumps(field.get_default(call_default_factory=True), default=str))
            for name, field in model.model_fields.items() if not field.is_required()}


def check_resumable(out: Path, state_file: str, resolved: dict, ignored: set[str] | frozenset = frozenset(), defaults: dict | None = None) -> None:
    """A checkpoint only continues the run that wrote it: any changed setting (but `ignored` ones,
    which may differ between a run and its continuation) would silently mix two runs. A setting that
    the checkpoint's config.yaml predates counts as its default (`defaults`): what the older run did."""
    import yaml

    from genadapt.errors import UserError

    if not (out / state_file).is_file() or not (out / "config.yaml").is_file():
        return
    previous = yaml.safe_load((out / "config.yaml").read_text())
    defaults = defaults or {}
    changed = sorted(key for key in set(previous) | set(resolved)
                     if key not in ignored and previous.get(key, defaults.get(key)) != resolved.get(key))
    if changed:
        raise UserError(f"{out} holds a checkpoint of a run with other settings ({', '.join(changed[:4])}); use a new --out, or the same settings to resume")


def load_checkpoint(path: Path, required: set[str]) -> dict:
    """A resume checkpoint, or a one-line error when it is unreadable or from an older format."""
    from genadapt.errors import UserError

    try:
        state = load_torch(path)
    except Exception as exc:  # truncated file, not a torch file, or an object weights_only refuses
        raise UserError(f"{path} cannot be read ({type(exc).__name__}); delete {path.parent} to start the run over") from None
    missing = required - set(state) if isinstance(state, dict) else required
    if missing:
        raise UserError(f"{path} lacks {', '.join(sorted(missing))} (written by an older genadapt); use a new --out, or delete {path.parent} to start over")
    return state


def module_states(objects: dict) -> dict:
    """`state_dict()` of each named model, optimiser, scheduler or augmenter, for a checkpoint."""
    return {name: item.state_dict() for name, item in objects.items()}


def restore_states(state: dict, objects: dict) -> None:
    """The inverse of `module_states`."""
    for name, item in objects.items():
        item.load_state_dict(state[name])


def _busy_cores(seconds: float = 0.25) -> float | None:
    """Cores busy right now, from two reads of /proc/stat `seconds` apart (Linux); None elsewhere."""
    import time

    def read() -> tuple[float, float]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [float(v) for v in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def free_cores() -> int:
    """Cores not busy with other work right now: the cores this process may use, less the cores the rest of the
    machine keeps busy (measured over a quarter second where /proc/stat exists; else the 1-minute load, which
    lags: it still counts a job that just ended), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, round(cores - busy + 0.25)))


def choose_threads(requested: int = 0) -> int:
    """Intra-op threads for a heavy job: `requested` (`--threads N`), else GENADAPT_THREADS, else a user's
    OMP_NUM_THREADS, else one thread on machines of 2 cores or fewer (two threads beside any other busy process
    stalled every barrier, 5-17x slower steps; docs/techniques.md), else the free cores."""
    requested = requested or int(os.environ.get("GENADAPT_THREADS", "0") or 0)
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    return 1 if (os.cpu_count() or 1) <= 2 else free_cores()


def use_cpu(threads: int = 0) -> int:
    """torch's thread count (`choose_threads`), exported to child processes (OMP_NUM_THREADS, so torchrun and
    accelerate workers keep it), and flush-to-zero: tiny weights and gradients drift into denormal floats, which
    x86 handles ~100x slower (pocket-sd's VAE slowed ~30x late in training). Returns the thread count."""
    import torch

    count = choose_threads(threads)
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_flush_denormal(True)
    return count


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("genadapt", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pillow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def write_manifest(out: Path, seed: int, datasets: dict, extra: dict | None = None) -> Path:
    """manifest.json: data files with hashes, split, seed, versions (the reproducibility record)."""
    return write_json(
        Path(out) / "manifest.json",
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seed": seed,
            "versions": versions(),
            "data": {role: images.manifest() for role, images in datasets.items()},
            **(extra or {}),
        },
    )


def progress(total: int, initial: int, desc: str, disable: bool = False):
    """A tqdm bar with ETA, resumed at `initial`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, smoothing=0.05, disable=disable)


def append_jsonl(path: Path, record: dict) -> None:
    with Path(path).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
