"""The fused UNFLinear path (one autograd node, hand-written transposed-plan backward): gradients checked
numerically (gradcheck, float64), against the per-term reference's autograd gradients and against the plain
autograd path (``layer.fused = False``), including role-tied weights, the matmul form of broadcast additions
and the fallback under torch.func transforms."""

from __future__ import annotations

import pytest
import torch

from unf.nn import UNF, UNFLinear, WeightFeatures
from unf.nn.roles import RoleUNFLinear
from unf.spec import WeightSpaceSpec

from .test_nn_layers import gradcheck_layer
from .test_nn_reference import SPECS, _randomize, reference_unf_linear, rel_err, single_thread  # noqa: F401

F64 = torch.float64


def _grads(layer: torch.nn.Module, x: dict[str, torch.Tensor], fn=None) -> tuple[dict, list[torch.Tensor]]:
    """Gradients of a fixed random quadratic loss w.r.t. the inputs and the parameters."""
    xs = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y = fn(layer, xs) if fn is not None else layer(xs)
    gen = torch.Generator().manual_seed(7)
    loss = sum((y[k] * torch.randn(y[k].shape, generator=gen, dtype=y[k].dtype)).sum() + y[k].pow(2).sum()
               for k in sorted(y))
    params = [p for p in layer.parameters()]
    g = torch.autograd.grad(loss, [xs[k] for k in sorted(xs)] + params, allow_unused=True)
    gx = dict(zip(sorted(xs), g[:len(xs)]))
    return gx, [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, g[len(xs):])]


def _close(a: tuple[dict, list], b: tuple[dict, list], tol: float = 1e-10) -> None:
    assert rel_err(a[0], b[0]) <= tol
    for ga, gb in zip(a[1], b[1]):
        assert float((ga - gb).norm()) <= tol * max(float(gb.norm()), 1e-30)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("fixed,pe", [("relax", False), ("relax", True), ("exact", False), ("auto", True)])
def test_fused_gradients_match_reference(name: str, fixed: str, pe: bool) -> None:
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    layer = UNFLinear(spec, 2, 3, fixed=fixed, exact_max_size=2, positional_encoding=pe, dtype=F64)
    _randomize(layer, gen)
    x = WeightFeatures.randn(spec, 3, 2, generator=gen, dtype=F64).as_dict()
    fused = _grads(layer, x)
    _close(fused, _grads(layer, x, reference_unf_linear))
    layer.fused = False
    _close(fused, _grads(layer, x))


@pytest.mark.parametrize("name", ["rnn", "heads", "mlp_fixed"])
def test_fused_gradcheck(name: str) -> None:
    """Numerical gradients of inputs and every parameter (diagonal reads and writes in rnn's W_hh, transposed
    reads between heads' entries, a scalar entry, positional encodings and folded fixed axes)."""
    spec = SPECS[name]
    torch.manual_seed(0)
    layer = UNFLinear(spec, 1, 2, dtype=F64, positional_encoding=True, fixed="auto", exact_max_size=2)
    _randomize(layer, torch.Generator().manual_seed(1))
    assert gradcheck_layer(layer, WeightFeatures.randn(spec, 2, 1, dtype=F64))


def test_broadcast_matmul_path_matches_reference() -> None:
    """Sizes where broadcast additions go through the 0/1 expansion matmul (forward and backward)."""
    spec = WeightSpaceSpec.from_axes({"q": [("d", 16), ("H", 8), ("k", 8)], "o": [("H", 8), ("k", 8), ("d", 16)],
                                      "g": [("d", 16)], "e": [(None, 5), ("d", 16)]})
    gen = torch.Generator().manual_seed(0)
    layer = UNFLinear(spec, 8, 8, dtype=F64)
    assert any(s is not None for st, fin in layer._step_spec for s in st + fin)
    assert any(s is not None for s in layer._tree_spec)
    _randomize(layer, gen)
    x = WeightFeatures.randn(spec, 3, 8, generator=gen, dtype=F64).as_dict()
    assert rel_err(layer(x), reference_unf_linear(layer, x)) <= 1e-10
    with torch.no_grad():
        assert rel_err(layer(x), reference_unf_linear(layer, x)) <= 1e-10
    fused = _grads(layer, x)
    _close(fused, _grads(layer, x, reference_unf_linear))


def test_role_layer_gradients_flow_through_mix_weights() -> None:
    spec = SPECS["heads"]
    torch.manual_seed(0)
    layer = RoleUNFLinear(spec, 2, 2).double()
    with torch.no_grad():
        layer.bias_coef.normal_()
    x = WeightFeatures.randn(spec, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64).as_dict()
    fused = _grads(layer, x)
    assert float(fused[1][0].norm()) > 0  # the shared coefficient table gets a gradient
    layer.fused = False  # (the per-term reference does not know the role averaging)
    _close(fused, _grads(layer, x))
    layer.fused = True
    coef = layer.coef.detach().clone().requires_grad_()
    bias = layer.bias_coef.detach().clone().requires_grad_()

    def fn(c, b):
        out = torch.func.functional_call(layer, {"coef": c, "bias_coef": b}, (x,))
        return tuple(out[n] for n in sorted(out))

    assert torch.autograd.gradcheck(fn, (coef, bias))


def test_stack_fused_equals_autograd_path_and_no_grad_forward() -> None:
    spec = SPECS["rnn"]
    torch.manual_seed(0)
    model = UNF(spec, [1, 4, 4, 2], dtype=F64)
    x = WeightFeatures.randn(spec, 2, 1, generator=torch.Generator().manual_seed(1), dtype=F64).as_dict()
    fused = _grads(model, x)
    with torch.no_grad():
        y0 = model(x)
    for layer in model.layers:
        if isinstance(layer, UNFLinear):
            layer.fused = False
    assert rel_err(y0, model(x)) <= 1e-10
    _close(fused, _grads(model, x))


def test_vmap_takes_the_autograd_path() -> None:
    spec = SPECS["mlp"]
    torch.manual_seed(0)
    layer = UNFLinear(spec, 1, 2, dtype=F64)
    x = WeightFeatures.randn(spec, 3, 1, dtype=F64).as_dict()
    names = sorted(x)

    def f(*ts):
        out = layer({n: t.unsqueeze(0) for n, t in zip(names, ts)})
        return sum(out[n].sum() for n in out)

    batched = torch.func.vmap(torch.func.grad(f, argnums=tuple(range(len(names)))))(*[x[n] for n in names])
    for b in range(3):
        xs = [x[n][b].clone().requires_grad_() for n in names]
        g = torch.autograd.grad(f(*xs), xs)
        for gb, gl in zip(batched, g):
            assert torch.allclose(gb[b], gl, rtol=1e-10, atol=1e-12)
