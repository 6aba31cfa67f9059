"""One writer per run folder, and a run folder that can be written at all: checked before any work starts.

* `prepare_out` refuses an `--out` that is a file, lies under a file, is a device, cannot be written, has a
  name the file system cannot encode, or lies inside the training data (its sample grids would become
  training images on the next run).
* `RunLock` holds `out/.genadapt.lock` (pid, host, start time) for the run's lifetime. A second writer gets a
  one-line error naming the holder; a lock whose process is gone (killed, crashed) is taken over, with a message.
* `check_same_data` refuses to resume a checkpoint on data that changed (by the manifest's hashes and captions).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from genadapt.errors import UserError

LOCK_FILE = ".genadapt.lock"


def prepare_out(out: Path, data: str | None = None) -> Path:
    out = Path(out)
    try:
        str(out).encode(sys.getfilesystemencoding(), "strict")
    except UnicodeEncodeError:
        raise UserError(f"--out {out!r}: the file system cannot store that name; use a name in plain letters and digits") from None
    if out.exists() and not out.is_dir():
        kind = "a device or special file" if not out.is_file() else "a file"
        raise UserError(f"--out {out}: is {kind}, not a folder; pass a folder path (it is created if missing)")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, so no folder can be made under it; pick another --out")
            break
    if data and not str(data).startswith("builtin:"):
        data_path = Path(str(data).split("?", 1)[0]).resolve()
        if data_path.is_dir() and (out.resolve() == data_path or data_path in out.resolve().parents):
            raise UserError(f"--out {out} is inside --data {data}: its sample grids would be read as training images next time; put the run elsewhere")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc}); pick a folder you can write to") from None
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(out):` the only writer of `out`; released on exit, taken over if its holder died."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.held = False

    def __enter__(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                if not isinstance(exc, FileExistsError):
                    full = disk_full_error(exc, self.path)
                    raise full or UserError(f"{self.path.parent}: cannot create the run lock ({exc.strerror}); check the folder") from None
                holder = self._holder()  # the lock exists
                if holder and holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    print(f"note: {self.path.parent} was left locked by process {holder.get('pid')}, which is gone; taking it over", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                if holder is None:  # a lock being written this instant, or an unreadable one
                    raise UserError(f"{self.path.parent} is locked ({self.path} cannot be read); if no run is writing there, delete that file")
                raise UserError(
                    f"{self.path.parent} is being written by process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}; "
                    "wait for it to finish, or use another --out"
                )
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump(me, file)
            except OSError as exc:
                self.path.unlink(missing_ok=True)
                raise disk_full_error(exc, self.path) or UserError(f"{self.path}: cannot write the run lock ({exc.strerror})") from None
            self.held = True
            sweep_partial_writes(self.path.parent)
            return self
        raise UserError(f"{self.path.parent}: could not take the lock {self.path}; delete it if no run is writing there")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def sweep_partial_writes(out: Path) -> None:
    """Temp files and staging folders a killed writer left (atomic writes never rename them into place);
    only the lock holder calls this, so nothing is writing them."""
    import shutil

    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
    for staging in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)


def data_digest(images) -> str:
    """What a run trained on: every file's hash and caption, in order."""
    digest = hashlib.sha256()
    for record in images.records:
        digest.update(f"{record.sha256}\t{record.caption}\n".encode())
    return digest.hexdigest()


def check_same_data(out: Path, state_file: str, images) -> None:
    """A checkpoint only continues on the data it was trained on."""
    manifest = Path(out) / "manifest.json"
    if not (Path(out) / state_file).is_file() or not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("data_sha256")
    except (OSError, ValueError):
        return
    if recorded and recorded != data_digest(images):
        raise UserError(f"{out} holds a checkpoint trained on other data (files or captions changed since); use a new --out to train on this data")


def check_not_shorter(state_step: int, steps: int, out: Path) -> None:
    if state_step > steps:
        raise UserError(f"{out} holds a run already trained {state_step} steps; --steps {steps} would report a shorter run than its weights are. Use --steps {state_step} or more, or a new --out")


def disk_full_error(exc: OSError, path: Path, needed: int | None = None) -> UserError | None:
    """A one-line 'no space left' error (with how much was needed and is free) for ENOSPC/EDQUOT, else None."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    import shutil

    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        free = None
    need = f"; it needed about {needed / 1e6:.1f} MB" if needed else ""
    have = f", {free / 1e6:.1f} MB are free" if free is not None else ""
    return UserError(f"no space left on the device writing {path}{need}{have}. The previous checkpoint is intact; free some space and rerun to resume")
