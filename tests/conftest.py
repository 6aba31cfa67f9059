import os

import pytest

# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one single-threaded worker per usable core, at most 4 (many tests start child processes of their own);
    PYTEST_XDIST_AUTO_NUM_WORKERS, xdist's own override, still wins."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip().isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 4))


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Built-in datasets render into a per-session cache, never the user's."""
    if "GENADAPT_CACHE" not in os.environ:
        os.environ["GENADAPT_CACHE"] = str(tmp_path_factory.mktemp("genadapt-cache"))
    import torch

    torch.set_num_threads(1)
    yield
