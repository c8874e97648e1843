"""The small-model step (optimizers/small.py) equals the reference rule, and its compiled UNF read-out equals the
UNF layer, on layouts it was not written for (diagonal patterns, heads, gathered entries)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optimizers as O
import unf
from optimizers.features import Segments, step_encoding
from optimizers.small import STEP_TABLE, SmallPlan, _Weights, small_update, supports_small_path

from .zoo import ARCHITECTURES, build

#: every architecture of the compiler's zoo (square recurrent entries: diagonal reads and writes; attention heads:
#: entries that are views of a fused projection, so gathered rather than contiguous runs)
MODELS = sorted(ARCHITECTURES)


def _family(name: str, tie: str, dtype=torch.float32, scale: float = 0.3):
    model, x = build(name)
    spec = unf.derive_spec(model, x).parameters_only()
    f = O.UNFFamily(spec, hidden=3, layers=2, tie=tie).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * scale)
    named = dict(model.named_parameters())
    seg = f.bind([named[n] for n in spec.sources])
    return f, seg


@pytest.mark.parametrize("tie", ["role", "none"])
@pytest.mark.parametrize("name", MODELS)
def test_compiled_readout_equals_the_layer(name, tie):
    f, seg = _family(name, tie, torch.float64, scale=1.0)
    n = seg.ids.numel()
    rule = O.LearnedRule(f).double()
    plan = SmallPlan(rule, seg, n)
    coefficients = _Weights(rule, plan).readout  # (divided by the bound, as the step uses them)
    h = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = plan.readout(h, *coefficients) * rule.bound
    with torch.no_grad():
        want = f.deepset.out(h, seg).squeeze(-1) + f.unf_readout(h, project_first=True)
    assert want.abs().max() > 1  # every part contributes: not a comparison of zeros
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_both_identity_layouts_are_exercised():
    """Contiguous entries use one product per run; gathered entries (attention heads) the row-wise path."""
    runs = {}
    for name in MODELS:
        f, seg = _family(name, "role")
        runs[name] = SmallPlan(O.LearnedRule(f), seg, seg.ids.numel()).readout.runs is not None
    assert runs["mlp"] and not runs["gpt2"]


def _inputs(n: int, nan: bool, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    if nan:
        grad[::7] = float("nan")
        grad[3::11] = float("inf")
    return param, grad, O.RuleState(torch.randn(7, n, generator=gen), torch.tensor(12.0))


def _compare(rule, seg, n, nan: bool, active=None, lr=0.7):
    param, grad, state = _inputs(n, nan)
    mine = O.RuleState(state.momenta.clone(), state.step.clone())
    with torch.no_grad():
        ref = rule.update(param, grad, state, seg, lr=lr, active=active)
        got = small_update(rule, param, grad, mine, seg, lr=lr, active=active)
    moved = (ref[0] - param).abs().max()
    assert moved > 0.01  # the learned term is not saturated or zero: the comparison means something
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].momenta, ref[1].momenta, rtol=0, atol=0)
    assert float(got[1].step) == 13.0
    skipped = torch.zeros(n, dtype=torch.bool) if got[2] is None else got[2]
    assert torch.equal(skipped, ref[2])
    return got


def _active(n: int):
    return torch.rand(n, generator=torch.Generator().manual_seed(3)) > 0.2


@pytest.mark.parametrize("case", ["finite", "nonfinite", "inactive"])
@pytest.mark.parametrize("family", ["mlp", "deepset"])
@pytest.mark.parametrize("sizes", [[5], [3, 7, 1, 200], [2048, 32, 320, 10], [0, 9]])
def test_small_step_equals_reference(family, sizes, case):
    f = {"mlp": O.PerParamMLP, "deepset": O.DeepSet}[family](hidden=6)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(3)
    rule = O.LearnedRule(f, beta=0.3)
    n = sum(sizes)
    assert supports_small_path(rule, n)
    _compare(rule, Segments.from_sizes(sizes), n, nan=case == "nonfinite",
             active=_active(n) if case == "inactive" else None)


@pytest.mark.parametrize("case", ["finite", "nonfinite", "inactive"])
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gru", "mha", "gpt2"])
def test_small_unf_step_equals_reference(name, case):
    f, seg = _family(name, "role", scale=0.5)
    rule = O.LearnedRule(f, beta=0.3)
    n = seg.ids.numel()
    assert supports_small_path(rule, n)
    _compare(rule, seg, n, nan=case == "nonfinite", active=_active(n) if case == "inactive" else None)


@pytest.mark.parametrize("case", ["finite", "nonfinite"])
@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_small_step_with_relative_steps_equals_reference(name, case):
    """``scale_floor``: the learned term times each segment's parameter scale, which the small path takes from its
    feature statistics (the reference from the parameters)."""
    f, seg = _family(name, "role", scale=0.5)
    rule = O.LearnedRule(f, beta=0.3, scale_floor=1.0)  # the inputs have std ~1: some segments floored
    n = seg.ids.numel()
    assert supports_small_path(rule, n)
    _compare(rule, seg, n, nan=case == "nonfinite", active=_active(n) if case == "inactive" else None)


def test_weights_changed_between_steps_are_picked_up():
    f, seg = _family("mlp", "role", scale=0.5)
    rule = O.LearnedRule(f, beta=0.3)
    n = seg.ids.numel()
    workspace: dict = {}
    param, grad, state = _inputs(n, nan=False)
    with torch.no_grad():
        small_update(rule, param, grad, O.RuleState(state.momenta.clone(), state.step.clone()), seg,
                     workspace=workspace)
        for p in rule.parameters():  # in place, as a meta-optimizer would
            p.mul_(-1.3)
        got = small_update(rule, param, grad, O.RuleState(state.momenta.clone(), state.step.clone()), seg,
                           workspace=workspace)[0].clone()
        ref = rule.update(param, grad, state, seg)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [0.0, 1.0, STEP_TABLE - 1.0, STEP_TABLE, 3 * STEP_TABLE + 17.0, 2.5])
def test_step_bias_table_equals_the_encoding(step):
    f = O.DeepSet(hidden=4)
    rule = O.LearnedRule(f)
    seg = Segments.from_sizes([3, 4])
    plan = SmallPlan(rule, seg, 7)
    weights = _Weights(rule, plan)
    s = torch.tensor(step)
    layer = f.layers[0]
    want = layer.elem.bias + (layer.elem.weight + layer.pool.weight)[:, 8:] @ step_encoding(s)
    torch.testing.assert_close(weights.first_bias(plan, s), want, rtol=1e-6, atol=1e-6)


def test_optimizer_takes_the_small_path_on_small_cpu_models_only():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = O.UNFOptimizer(model, torch.randn(2, 6))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert opt._flat[0].workspace["path"][1] == "small"
    big = nn.Linear(200, 100)
    opt = O.LearnedOptimizer(big.parameters(), O.LearnedRule(O.DeepSet()))
    big(torch.randn(2, 200)).sum().backward()
    opt.step()
    assert opt._flat[0].workspace["path"][1] == "chunked"
    # float64 rules keep the reference path (the small path's buffers are fp32)
    assert not supports_small_path(O.LearnedRule(O.DeepSet()).double(), 10)


def test_optimizer_steps_equal_the_reference_rule_over_many_steps():
    """50 optimizer steps through the small path against the functional rule on the same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = O.UNFOptimizer(model, x)
    with torch.no_grad():
        for p in opt.rule.f.parameters():
            p.normal_(0, 0.3)
        opt.rule.beta.fill_(0.05)
    rule, seg = opt.rule, opt._segments_for(list(opt.param_groups[0]["params"]))
    params = opt.param_groups[0]["params"]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    state = O.init(flat.numel())
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        with torch.no_grad():
            flat, state, _ = rule.update(flat, grad, state, seg)
        opt.step()
        # the same gradients: the model follows the functional rule to rounding
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), flat, rtol=1e-4,
                                   atol=1e-5)
        with torch.no_grad():  # resynchronise, so rounding differences do not compound through the loss
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            state = O.RuleState(opt._flat[0].momenta.clone(), opt._flat[0].step.clone())
    assert opt._flat[0].workspace["path"][1] == "small"
