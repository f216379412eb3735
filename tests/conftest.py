import atexit
import os
import random
import shutil
import tempfile

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


def _private_compile_cache():
    """One inductor cache directory per test run (shared by its xdist workers, removed at the
    end), unless the user set one: no graph compiled by an earlier run makes a compile in
    this one warm (a test's compile times must not depend on what ran before)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    path = os.path.join(tempfile.gettempdir(), f"bayes-fusion-tests-inductor-{run}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or the only process)
        atexit.register(shutil.rmtree, path, ignore_errors=True)


_private_compile_cache()


@pytest.fixture(autouse=True)
def _no_compile_records(monkeypatch, tmp_path):
    """Every test starts with no compile costs on record (its own records file), so that
    ``fit(jit=None)`` decides from the defaults, not from what earlier tests compiled."""
    monkeypatch.setenv("BAYES_FUSION_COMPILE_COSTS", str(tmp_path / "compile_costs.json"))


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
