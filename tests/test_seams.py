"""Every private attribute of Pyro and torch the package uses sits in bayes_fusion.infer.seams;
these tests fail loudly when a library underneath moves one."""

import math
from pathlib import Path

import pyro
import torch
from pyro.infer import NUTS
from pyro.infer.autoguide import AutoMultivariateNormal

from bayes_fusion.infer import seams
from bayes_fusion.infer.mcmc.chains import run_chain
from bayes_fusion.infer.mcmc.potential import FlatPotential

PYRO_NUTS_PRIVATES = (
    "_initialize_adapter",
    "_kinetic_energy",
    "_fetch_from_cache",
    "_cache",
)


def test_pyro_nuts_still_has_the_private_attributes_the_kernel_uses():
    for name in PYRO_NUTS_PRIVATES:
        assert hasattr(NUTS, name), f"pyro's NUTS no longer has {name}: update infer/seams.py"
    kernel = NUTS(potential_fn=lambda p: (p["x"] ** 2).sum() / 2)
    kernel.initial_params = {"x": torch.zeros(2)}
    kernel.setup(warmup_steps=2)
    for name in ("_adapter", "_t", "_warmup_steps", "_mean_accept_prob", "_divergences"):
        assert hasattr(kernel, name), f"pyro's NUTS kernel no longer has {name}"
    assert hasattr(kernel._adapter, "mass_matrix_adapter")


class _Gibbs:
    """A standard normal in 2-d with a Gibbs block that counts its updates."""

    def __init__(self):
        self.updates = 0

    def __call__(self, params):
        return self.potential(params)

    def potential(self, params):
        return 0.5 * (params["x"] ** 2).sum()

    def gibbs_init(self, params):
        self.updates = 0

    def gibbs_update(self, params):
        self.updates += 1
        return {"count": torch.tensor(float(self.updates))}


def test_kernel_starts_from_the_metric_runs_the_block_and_records_the_draw_stats():
    potential = _Gibbs()
    metric = {(FlatPotential.SITE,): torch.diag(torch.tensor([4.0, 0.25]))}
    flat = FlatPotential(potential, {"x": torch.zeros(2)})
    kernel = seams.nuts_kernel_class(metric, gibbs=True)(potential_fn=flat, max_tree_depth=4)
    kernel.initial_params = {FlatPotential.SITE: flat.start}
    kernel.setup(5)
    started = kernel._adapter.mass_matrix_adapter.inverse_mass_matrix[(FlatPotential.SITE,)]
    torch.testing.assert_close(started, metric[(FlatPotential.SITE,)])
    params = kernel.initial_params
    for _ in range(12):
        params = kernel.sample(params)
    stats = kernel.draw_stats()
    assert set(stats) == set(seams.SAMPLE_STATS)
    assert all(len(v) == 7 for v in stats.values())  # draws after the 5 warm-up steps
    assert all(math.isfinite(e) for e in stats["energy"])
    assert all(0.0 <= a <= 1.0 + 1e-9 for a in stats["acceptance_rate"])
    # lp is the log density of the draw: -potential(x) (the potential's own number)
    x = params[FlatPotential.SITE]
    assert math.isclose(stats["lp"][-1], -float(potential.potential({"x": x})), rel_tol=1e-6)
    assert potential.updates == 12
    assert kernel.block_draws()["count"].tolist() == [float(i) for i in range(6, 13)]


def test_run_chain_records_divergences_in_the_draw_stats():
    def cliff(params):  # a wall at x = 1: trajectories crossing it diverge
        x = params["x"]
        return 0.5 * (x**2).sum() + torch.where(x[0] > 1.0, 1e6 * (x[0] - 1.0), 0.0)

    settings = {"max_tree_depth": 5, "target_accept_prob": 0.8, "full_mass": False}
    _, divergences, stats, _ = run_chain(cliff, {"x": torch.zeros(2)}, 60, 30, 0, settings)
    flagged = [i for i, d in enumerate(stats["diverging"]) if d]
    assert divergences and flagged == divergences


def test_unpack_latent_splits_a_packed_draw_by_site():
    def model():
        pyro.sample("a", pyro.distributions.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("b", pyro.distributions.Normal(0.0, 1.0))

    guide = AutoMultivariateNormal(model)
    guide()
    latent = torch.arange(3.0)
    pairs = {site["name"]: value for site, value in seams.unpack_latent(guide, latent)}
    assert set(pairs) == {"a", "b"} and pairs["a"].shape == (2,)


def test_private_code_gives_a_function_its_own_code_object():
    def f(x):
        return x + 1

    g = seams.private_code(f, "f_copy")
    assert g.__code__ is not f.__code__ and g.__code__.co_name == "f_copy"
    assert g(1) == 2


def test_worker_environment_puts_this_package_first_on_the_path():
    env = seams.worker_environment(3)
    root = env["PYTHONPATH"].split(":")[0]
    assert env["OMP_NUM_THREADS"] == "3"
    assert (Path(root) / "bayes_fusion" / "__init__.py").exists()


def test_trusted_vector_isa_skips_inductors_probes_only_for_the_isa_aten_runs(monkeypatch):
    import platform

    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    # the internals the seam reads are still there
    assert callable(cpu_vec_isa.x86_isa_checker) and cpu_vec_isa.supported_vec_isa_list
    assert inductor_config.cpp.vec_isa_ok is None
    x86 = platform.machine() in ("x86_64", "AMD64")
    cases = {
        ("AVX512", ("avx2", "avx512")): True,  # inductor would pick AVX-512, ATen runs it
        ("AVX2", ("avx2", "avx512")): False,  # ATen chose AVX2 (or was told to): probe
        ("AVX2", ("avx2",)): True,
        ("DEFAULT", ("avx2",)): False,
        ("AVX512", ("avx2", "avx512", "avx512_vnni", "amx_tile")): False,  # AMX: probe
    }
    for (capability, flags), trusted in cases.items():
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda f=flags: list(f))
        assert seams._aten_runs_inductor_isa() is (trusted and x86), (capability, flags)
        with seams.trusted_vector_isa():
            assert inductor_config.cpp.vec_isa_ok is (True if trusted and x86 else None)
        assert inductor_config.cpp.vec_isa_ok is None
    # a value the user set is left alone
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2"])
    with inductor_config.patch({"cpp.vec_isa_ok": False}), seams.trusted_vector_isa():
        assert inductor_config.cpp.vec_isa_ok is False
