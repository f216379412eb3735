import os
import random

import numpy as np
import pyro
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


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
