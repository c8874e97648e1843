"""Meta-gradient estimators on a quadratic inner problem: BPTT is exact, ES and PES are unbiased."""

from __future__ import annotations

import pytest
import torch

import optimizers as O
from meta_train.estimators import PES, FlatProblem, bptt, es, unroll
from optimizers.features import Segments

N = 6
SCALARS = ("raw_alpha", "beta", "raw_gamma0")


@pytest.fixture
def setup():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        a = torch.linspace(0.5, 2.0, N)
        problem = FlatProblem(lambda w, b: 0.5 * (a * (w - b) ** 2).sum(), Segments.from_sizes([2, 4]))
        rule = O.LearnedRule(O.PerParamMLP(hidden=4, layers=1), beta=0.1).double()
        with torch.no_grad():
            for p in rule.f.parameters():
                p.normal_(0, 0.5)
        theta = {k: v.detach().clone() for k, v in rule.named_parameters() if k in SCALARS}
        gen = torch.Generator().manual_seed(1)
        batches = [0.1 * torch.randn(N, generator=gen) for _ in range(6)]
        yield rule, theta, problem, torch.ones(N), torch.zeros(7, N), torch.zeros(()), batches
    finally:
        torch.set_default_dtype(dtype)


def meta_loss(rule, theta, problem, w, m, s, batches):
    return unroll(rule, theta, problem, w, m, s, batches)[3].mean()


def test_bptt_matches_finite_differences(setup):
    rule, theta, problem, w, m, s, batches = setup
    grads, loss, (w2, m2, s2) = bptt(rule, theta, problem, w, m, s, batches)
    assert float(s2) == len(batches) and torch.isfinite(loss)
    for k in theta:
        h = 1e-6
        up = {**theta, k: theta[k] + h}
        down = {**theta, k: theta[k] - h}
        fd = (meta_loss(rule, up, problem, w, m, s, batches)
              - meta_loss(rule, down, problem, w, m, s, batches)).detach() / (2 * h)
        assert abs(float(grads[k]) - float(fd)) <= 1e-7 * max(1.0, abs(float(fd))), k
    # and it equals plain autograd through the same unroll
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    auto = torch.autograd.grad(meta_loss(rule, leaves, problem, w, m, s, batches), list(leaves.values()))
    for k, g in zip(leaves, auto):
        torch.testing.assert_close(grads[k], g)


def _check_unbiased(estimates: list[dict], target: dict, z: float = 4.0) -> None:
    for k in target:
        samples = torch.stack([e[k] for e in estimates])
        mean, se = samples.mean(0), samples.std(0) / len(estimates) ** 0.5
        gap = abs(float(mean) - float(target[k]))
        assert gap <= z * float(se) + 1e-9, (k, float(mean), float(target[k]), float(se))


def test_es_is_unbiased_within_statistical_tolerance(setup):
    rule, theta, problem, w, m, s, batches = setup
    target, _, _ = bptt(rule, theta, problem, w, m, s, batches)
    estimates = [es(rule, theta, problem, w, m, s, batches, particles=100, sigma=1e-3,
                    generator=torch.Generator().manual_seed(10 + r))[0] for r in range(30)]
    _check_unbiased(estimates, target)


def test_pes_over_truncations_matches_full_unroll_in_expectation(setup):
    rule, theta, problem, w, m, s, batches = setup
    truncations = [batches[0:2], batches[2:4], batches[4:6]]
    # full-unroll objective: the sum of the truncations' mean losses (each truncation has 2 steps)
    full, _, _ = bptt(rule, theta, problem, w, m, s, batches)
    target = {k: v * len(truncations) for k, v in full.items()}
    estimates = []
    for r in range(30):
        pes = PES(rule, problem, particles=100, sigma=1e-3)
        pes.reset(w, m, theta)
        gen = torch.Generator().manual_seed(100 + r)
        total = {k: torch.zeros_like(v) for k, v in theta.items()}
        for batch_list in truncations:
            g, _ = pes.step(theta, batch_list, gen)
            total = {k: total[k] + g[k] for k in total}
        estimates.append(total)
    _check_unbiased(estimates, target)


def test_pes_reset_restarts_chosen_particles(setup):
    rule, theta, problem, w, m, s, _ = setup
    pes = PES(rule, problem, particles=4, sigma=1e-2)
    with pytest.raises(RuntimeError, match="reset"):
        pes.step(theta, [torch.zeros(N)])
    pes.reset(w, m, theta)
    pes.step(theta, [torch.zeros(N)], torch.Generator().manual_seed(0))
    moved = pes.w.clone()
    which = torch.tensor([True, False, True, False])
    pes.reset(w, m, theta, which)
    assert torch.equal(pes.w[:, 0], w.expand(2, N)) and torch.equal(pes.w[:, 1], moved[:, 1])
    assert float(pes.xi["beta"][0]) == 0 and float(pes.xi["beta"][1]) != 0


def test_vmapped_population_equals_a_python_loop(setup):
    rule, theta, problem, w, m, s, batches = setup
    gen = torch.Generator().manual_seed(5)
    grads, _ = es(rule, theta, problem, w, m, s, batches[:2], particles=8, sigma=1e-2, generator=gen)
    gen = torch.Generator().manual_seed(5)
    eps = {k: torch.randn((8, *v.shape), generator=gen, dtype=v.dtype) * 1e-2 for k, v in theta.items()}
    loop = {k: torch.zeros_like(v) for k, v in theta.items()}
    for i in range(8):
        plus = meta_loss(rule, {k: theta[k] + eps[k][i] for k in theta}, problem, w, m, s, batches[:2])
        minus = meta_loss(rule, {k: theta[k] - eps[k][i] for k in theta}, problem, w, m, s, batches[:2])
        for k in theta:
            loop[k] += (plus - minus) * eps[k][i] / (2 * 1e-4 * 8)
    for k in theta:
        torch.testing.assert_close(grads[k], loop[k])
