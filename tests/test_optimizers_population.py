"""Segment ops, the factored (channels-first) families, and the rule and estimators on a batched population: every
fast path computes what the reference does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import optimizers as O
from meta_train.estimators import PES, FlatProblem, batches_populations, es, keep_freed_memory, unroll
from optimizers.features import (
    Segments,
    compute_features,
    segment_add_,
    segment_mean,
    segment_mean_square,
    segment_mul,
    segment_sum,
    step_encoding,
    tensor_features,
)

F64 = torch.float64


def segment_layouts() -> dict[str, Segments]:
    """Contiguous runs one per segment; runs that revisit segments; ids without runs (the index fallback)."""
    ids = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, 1, 1])
    return {"sizes": Segments.from_sizes([3, 1, 6]), "revisits": Segments.from_ids(ids, 3),
            "no_runs": Segments(ids, torch.bincount(ids, minlength=3).float(), 3)}


@pytest.mark.parametrize("layout", ["sizes", "revisits", "no_runs"])
def test_segment_ops_match_scatter_and_gather(layout):
    seg = segment_layouts()[layout]
    assert seg.split_runs == (layout != "no_runs")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 10, generator=gen, dtype=F64)  # (batch, channels, elements): reduce along dim -1
    table = torch.randn(2, 4, 3, generator=gen, dtype=F64)
    sums = torch.zeros(2, 4, 3, dtype=F64).index_add(-1, seg.ids, x)
    means = sums / seg.counts.to(F64)
    torch.testing.assert_close(segment_sum(x, seg, -1), sums)
    torch.testing.assert_close(segment_mean(x, seg, -1), means)
    torch.testing.assert_close(segment_mean_square(x, seg, -1),
                               torch.zeros(2, 4, 3, dtype=F64).index_add(-1, seg.ids, x * x) / seg.counts.to(F64))
    torch.testing.assert_close(segment_mul(x, table, seg, -1), x * table[..., seg.ids])
    fresh = x.clone()
    assert segment_add_(fresh, table, seg, -1) is fresh
    torch.testing.assert_close(fresh, x + table[..., seg.ids])
    # rows layout (N, C), the default dim 0
    rows = x[0].T
    torch.testing.assert_close(segment_mean(rows, seg), means[0].T)


def test_step_encoding_and_features_take_batch_axes():
    seg = Segments.from_sizes([4, 6])
    gen = torch.Generator().manual_seed(1)
    p, g, m = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen), torch.randn(3, 6, 10, generator=gen)
    step = torch.tensor([0.0, 5.0, 70.0])
    assert step_encoding(step).shape == (3, 11)
    assert compute_features(p, g, m, step, seg).shape == (3, 10, O.N_FEATURES)
    tf = tensor_features(p, g, m, seg)
    for i in range(3):
        torch.testing.assert_close(step_encoding(step[i]), step_encoding(step)[i])
        torch.testing.assert_close(tensor_features(p[i], g[i], m[i], seg), tf[i])
        torch.testing.assert_close(compute_features(p[i], g[i], m[i], step[i], seg),
                                   torch.cat([tf[i].T, step_encoding(step[i]).expand(10, 11)], 1))


FAMILIES = {"mlp": lambda: O.PerParamMLP(hidden=5), "deepset": lambda: O.DeepSet(hidden=5),
            "deepset-readout-only": lambda: O.DeepSet(hidden=5, layers=0)}


def random_family(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    f = FAMILIES[name]().double()
    for p in f.parameters():
        nn.init.normal_(p, std=0.5)
    return f


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["sizes", "revisits", "no_runs"])
def test_forward_factored_equals_forward_on_the_full_features(family, layout):
    f, seg = random_family(family), segment_layouts()[layout]
    gen = torch.Generator().manual_seed(2)
    p, g, m = (torch.randn(10, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64),
               torch.randn(6, 10, generator=gen, dtype=F64))
    step = torch.tensor(17.0, dtype=F64)
    full = f(compute_features(p, g, m, step, seg), seg)
    torch.testing.assert_close(f.forward_factored(tensor_features(p, g, m, seg), step_encoding(step), seg), full)


def rule_with(family: str) -> O.LearnedRule:
    rule = O.LearnedRule(random_family(family), beta=0.3).double()
    return rule


@pytest.mark.parametrize("family", ["mlp", "deepset"])
@pytest.mark.parametrize("shared_f", [False, True])
def test_population_update_equals_per_particle_updates(family, shared_f):
    """One batched rule step on P particles (their own meta-parameters, or only their own scalars with ``f``
    shared) equals P separate steps, skipped (NaN-gradient) elements included."""
    rule, seg, n, pop = rule_with(family), Segments.from_sizes([3, 1, 6]), 10, 3
    gen = torch.Generator().manual_seed(3)
    theta = {k: v.detach() + 0.1 * torch.randn((pop, *v.shape), generator=gen, dtype=F64)
             for k, v in rule.named_parameters() if not (shared_f and k.startswith("f."))}
    w, grad = torch.randn(pop, n, generator=gen, dtype=F64), torch.randn(pop, n, generator=gen, dtype=F64)
    grad[1, 4] = float("nan")
    grad[2, 0] = float("inf")
    m, s = torch.randn(pop, 7, n, generator=gen, dtype=F64), torch.tensor([0.0, 3.0, 9.0], dtype=F64)
    new_w, state, skipped = functional_call(rule, theta, (w, grad, O.RuleState(m, s), seg))
    for i in range(pop):
        ref = functional_call(rule, {k: v[i] for k, v in theta.items()}, (w[i], grad[i], O.RuleState(m[i], s[i]), seg))
        torch.testing.assert_close(new_w[i], ref[0])
        torch.testing.assert_close(state.momenta[i], ref[1].momenta)
        torch.testing.assert_close(state.step[i], ref[1].step)
        assert torch.equal(skipped[i], ref[2])
    # skipped elements keep their value and momenta bit for bit
    assert torch.equal(new_w[1, 4], w[1, 4]) and torch.equal(state.momenta[1, :, 4], m[1, :, 4])
    assert torch.equal(state.momenta[2, :, 0], m[2, :, 0])


class Unfactored(nn.Module):
    """A family without ``forward_factored``: ES and PES vmap it over particles."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.inner(features, segments)


@pytest.fixture
def quadratic():
    a = torch.linspace(0.5, 2.0, 10, dtype=F64)
    problem = FlatProblem(lambda w, b: 0.5 * (a * (w - b) ** 2).sum(), Segments.from_sizes([3, 1, 6]))
    gen = torch.Generator().manual_seed(4)
    batches = [0.1 * torch.randn(10, generator=gen, dtype=F64) for _ in range(3)]
    return problem, batches


@pytest.mark.parametrize("family", ["mlp", "deepset"])
def test_batched_and_vmapped_populations_agree_with_a_loop(family, quadratic):
    problem, batches = quadratic
    batched = rule_with(family)
    vmapped = O.LearnedRule(Unfactored(batched.f), beta=0.3).double()
    vmapped.load_state_dict({("f.inner." + k[2:] if k.startswith("f.") else k): v
                             for k, v in batched.state_dict().items()})
    assert batches_populations(batched) and not batches_populations(vmapped)
    w, m, s = torch.linspace(-1, 1, 10, dtype=F64), torch.zeros(7, 10, dtype=F64), torch.zeros((), dtype=F64)
    estimates = {}
    for name, rule in (("batched", batched), ("vmapped", vmapped)):
        theta = {k: v.detach() for k, v in rule.named_parameters()}
        noise = {k: 1e-2 * torch.randn((4, *v.shape), generator=torch.Generator().manual_seed(5), dtype=F64)
                 for k, v in theta.items()}
        pes = PES(rule, problem, particles=4, sigma=1e-2)
        pes.reset(w, m, theta)
        pes.step(theta, batches[:1], noise=noise)
        g, loss = pes.step(theta, batches[1:], noise=noise)
        e, _ = es(rule, theta, problem, w, m, s, batches, noise=noise, sigma=1e-2)
        estimates[name] = ({k.replace("f.inner.", "f."): v for k, v in g.items()}, pes.w.clone(), loss,
                           {k.replace("f.inner.", "f."): v for k, v in e.items()})
        if name == "batched":  # the same PES truncations, one particle and sign at a time through unroll
            for sign_index, sign in enumerate((1.0, -1.0)):
                for i in range(4):
                    th = {k: theta[k] + sign * noise[k][i] for k in theta}
                    w1, m1, s1, _ = unroll(rule, th, problem, w, m, s, batches[:1])
                    w2 = unroll(rule, th, problem, w1, m1, s1, batches[1:])[0]
                    torch.testing.assert_close(pes.w[sign_index, i], w2)
    (g_b, w_b, loss_b, e_b), (g_v, w_v, loss_v, e_v) = estimates["batched"], estimates["vmapped"]
    torch.testing.assert_close(w_b, w_v)
    torch.testing.assert_close(loss_b, loss_v)
    for k in g_b:
        torch.testing.assert_close(g_b[k], g_v[k])
        torch.testing.assert_close(e_b[k], e_v[k])


def test_batched_unroll_returns_per_particle_losses(quadratic):
    problem, batches = quadratic
    rule = rule_with("deepset")
    theta = {k: v.detach().expand(5, *v.shape) for k, v in rule.named_parameters()}
    w = torch.randn(5, 10, dtype=F64)
    w2, m2, s2, losses = unroll(rule, theta, problem, w, torch.zeros(5, 7, 10, dtype=F64),
                                torch.zeros(5, dtype=F64), batches, batched=True)
    assert w2.shape == (5, 10) and m2.shape == (5, 7, 10) and losses.shape == (5, 3)
    assert torch.equal(s2, torch.full((5,), 3.0, dtype=F64))
    single = unroll(rule, {k: v[0] for k, v in theta.items()}, problem, w[0], torch.zeros(7, 10, dtype=F64),
                    torch.zeros((), dtype=F64), batches)
    torch.testing.assert_close(losses[0], single[3])
    torch.testing.assert_close(w2[0], single[0])


def test_keep_freed_memory_reports_whether_it_applied():
    assert isinstance(keep_freed_memory(), bool)
