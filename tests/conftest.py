import os

import pytest

# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Built-in datasets render into a per-session cache, never the user's."""
    if "GENADAPT_CACHE" not in os.environ:
        os.environ["GENADAPT_CACHE"] = str(tmp_path_factory.mktemp("genadapt-cache"))
    import torch

    torch.set_num_threads(1)
    yield
