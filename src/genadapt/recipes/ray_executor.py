"""`compare --executor ray`: each adapt-and-evaluate run is a Ray task with declared resources.

Ray (an optional extra, `pip install genadapt[ray]`) connects to a running cluster (`--address auto` or a
`ray://host:10001` address) or starts a local one. A run's inputs travel by path: the base, the data, the
reference and the compare folder must be on storage every worker sees (a shared file system on a cluster; the
local disk on one machine). That is checked at start with a task that looks for them, and refused in one line
when they are not visible.

A task whose worker dies is retried by Ray up to `--retries` times (the run resumes from its last checkpoint, and
the run lock the dead worker left is taken over); a run that raises is retried the same number of times; a run
that still fails is reported as failed, with its error. Tasks are named after their run (`lora-10shot-r0`), so
Ray's dashboard shows them by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from genadapt.errors import UserError


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'genadapt[ray]' (or pip install ray)") from None
    return ray


def _visible(paths: list[str]) -> list[str]:
    """On a worker: which of `paths` it cannot see."""
    return [p for p in paths if not Path(p).exists()]


def connect(settings) -> None:
    ray = _ray()
    if ray.is_initialized():
        return
    # Workers inherit one OpenMP thread each unless told otherwise: runs on one node never stall each other.
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, int(settings.cpus_per_run))))}}
    try:
        if settings.address:
            ray.init(address=settings.address, runtime_env=runtime_env, log_to_driver=False)
        else:
            ray.init(runtime_env=runtime_env, log_to_driver=False, include_dashboard=False)
    except Exception as exc:  # noqa: BLE001 - a cluster that cannot be reached is the user's setup
        raise UserError(f"--address {settings.address or '(local)'}: cannot start or reach a Ray cluster ({str(exc).strip().splitlines()[0]})") from None


def check_shared_storage(settings) -> None:
    """The paths every run reads and writes must be visible from the workers (shared storage)."""
    ray = _ray()
    paths = [str(Path(settings.out).resolve())]
    for spec in (settings.base, settings.data, settings.reference):
        if spec and not str(spec).startswith("builtin:") and Path(str(spec).split("?", 1)[0]).exists():
            paths.append(str(Path(str(spec).split("?", 1)[0]).resolve()))
    missing = ray.get(ray.remote(num_cpus=0)(_visible).remote(paths))
    if missing:
        raise UserError(f"--executor ray: {missing[0]} is not visible from the Ray workers; put the base, data and --out on storage every node mounts")


def run_on_ray(settings, values: dict, steps: int, names: list[str], worker):
    """Yield (name, what `worker` returned, or its exception) as the Ray tasks finish."""
    connect(settings)
    check_shared_storage(settings)
    ray = _ray()
    remote = ray.remote(worker)
    options = dict(num_cpus=settings.cpus_per_run, num_gpus=settings.gpus_per_run, max_retries=settings.retries, retry_exceptions=settings.retries > 0)
    pending = {remote.options(name=name, **options).remote(values, name, steps): name for name in names}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for reference in done:
            name = pending.pop(reference)
            try:
                yield name, ray.get(reference)
            except Exception as exc:  # noqa: BLE001 - a run that failed after its retries is reported, never dropped
                cause = getattr(exc, "cause", None) or exc
                yield name, cause if isinstance(cause, BaseException) else exc
