import os
import random

import numpy as np
import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


def _share_the_cores_between_workers():
    """Under pytest-xdist each worker gets its share of the cores for torch's intra-op threads
    (two workers with two threads each on two cores oversubscribe them, and torch's threads
    then slow down many-fold); the subprocesses a test starts (benchmarks, examples, chain
    workers that set no count of their own) inherit it through ``OMP_NUM_THREADS``. An
    ``OMP_NUM_THREADS`` set by the user is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Seed every RNG, clear the Pyro param store and turn on Pyro validation for each test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
