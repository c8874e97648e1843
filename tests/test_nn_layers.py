"""UNF layers: equivariance (hand-written and derived specs), invariance, gradients, baselines, features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unf.nn import (
    UNF,
    DeepSet,
    DeepSetLayer,
    EntryNorm,
    InvariantPool,
    StatNN,
    UNFInvariant,
    UNFLinear,
    WeightFeatures,
)
from unf.spec import WeightSpaceSpec

from .test_nn_reference import SPECS, rel_err, single_thread  # noqa: F401 (autouse fixture)

F64 = torch.float64


def _check_equivariant(model: nn.Module, spec: WeightSpaceSpec, x: WeightFeatures, n_perms: int = 10,
                       seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    y = model(x)
    worst = 0.0
    for _ in range(n_perms):
        perm = spec.random_permutation(gen)
        worst = max(worst, rel_err(model(x.permute(perm)), y.permute(perm)))
    return worst


def _check_invariant(model: nn.Module, spec: WeightSpaceSpec, x: WeightFeatures, n_perms: int = 10) -> float:
    gen = torch.Generator().manual_seed(1)
    y = model(x)
    worst = 0.0
    for _ in range(n_perms):
        y2 = model(x.permute(spec.random_permutation(gen)))
        worst = max(worst, float((y2 - y).detach().norm() / y.detach().norm()))
    return worst


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("kw", [{}, {"fixed": "exact"}, {"fixed": "auto", "exact_max_size": 2,
                                                          "positional_encoding": True, "norm": True}])
def test_unf_stack_is_equivariant(name: str, kw: dict) -> None:
    spec = SPECS[name]
    torch.manual_seed(0)
    model = UNF(spec, [2, 4, 4, 3], dtype=F64, **kw)
    with torch.no_grad():  # nonzero encodings, so the symmetry-breaking path is exercised
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = WeightFeatures.randn(spec, 3, 2, dtype=F64)
    assert _check_equivariant(model, spec, x) <= 1e-10


@pytest.mark.parametrize("pool", ["mean", "sum", "max"])
def test_invariant_model_is_invariant(pool: str) -> None:
    spec = SPECS["heads"]
    torch.manual_seed(0)
    model = UNFInvariant(spec, [1, 4, 4], out_features=2, pool=pool, dtype=F64, positional_encoding=True)
    x = WeightFeatures.randn(spec, 4, 1, dtype=F64)
    assert _check_invariant(model, spec, x) <= 1e-10
    pool_layer = InvariantPool(spec, 3)
    # fixed axes are kept as features: emb's (4,) fixed axis makes it 3 * 4 wide, the others 3 each
    assert pool_layer.out_features == 3 * 6 + 3 * 4
    assert InvariantPool(spec, 3, max_fixed_size=2).out_features == 3 * 7


def test_gradcheck_tiny_spec() -> None:
    spec = WeightSpaceSpec.from_axes({"W": [("h", 2), ("h", 2)], "b": [("h", 2)], "v": [(None, 2), ("h", 2)]})
    torch.manual_seed(0)
    layer = UNFLinear(spec, 2, 2, dtype=F64, positional_encoding=True, fixed="auto", exact_max_size=1)
    assert gradcheck_layer(layer, WeightFeatures.randn(spec, 2, 2, dtype=F64))


def gradcheck_layer(layer: torch.nn.Module, x) -> bool:
    """``torch.autograd.gradcheck`` of ``layer`` in its inputs and every parameter at once."""
    names = list(x)
    pnames = [n for n, _ in layer.named_parameters()]

    def fn(*args):
        feats = dict(zip(names, args[:len(names)]))
        out = torch.func.functional_call(layer, dict(zip(pnames, args[len(names):])), (feats,))
        return tuple(out[n] for n in names)

    inputs = tuple(x[n].clone().requires_grad_() for n in names) + tuple(
        p.detach().clone().requires_grad_() for p in layer.parameters())
    return torch.autograd.gradcheck(fn, inputs)


def test_init_keeps_activations_order_one() -> None:
    """Fan-in over all terms feeding an output keeps outputs O(1) even with hundreds of terms."""
    spec = SPECS["heads"]
    torch.manual_seed(0)
    layer = UNFLinear(spec, 8, 8, dtype=F64)
    assert layer.num_terms > 150
    x = WeightFeatures.randn(spec, 64, 8, dtype=F64)
    y = layer(x)
    for n, t in y.items():
        assert 0.2 < float(t.detach().std()) < 5.0, n


def test_deepset_and_statnn_baselines() -> None:
    spec = SPECS["rnn"]
    torch.manual_seed(0)
    x = WeightFeatures.randn(spec, 3, 2, dtype=F64)
    for per_entry in (False, True):
        ds = DeepSet(spec, [2, 5, 3], per_entry=per_entry, dtype=F64)
        assert _check_equivariant(ds, spec, x) <= 1e-12
        y = ds(x)
        assert isinstance(y, WeightFeatures) and y.channels == 3
    layer = DeepSetLayer(spec, 2, 4, dtype=F64)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 2 * 4 + 4
    stat = StatNN(spec, 2, 3, dtype=F64)
    assert stat.features.out_features == len(spec.entries) * 2 * 7
    assert _check_invariant(stat, spec, x) <= 1e-12
    # quantiles and moments match torch's
    f = stat.features(x).view(3, len(spec.entries), 2, 7)
    w = x["W_hh"].flatten(2)
    assert torch.allclose(f[:, 1, :, 4], torch.quantile(w, 0.5, dim=2))
    assert torch.allclose(f[:, 1, :, 0], w.mean(2))
    assert torch.allclose(f[:, 1, :, 1], w.var(2, unbiased=False))
    assert torch.allclose(f[:, 1, :, 3], torch.quantile(w, 0.25, dim=2))


def test_entry_norm() -> None:
    spec = SPECS["mlp"]
    x = WeightFeatures.randn(spec, 2, 3, dtype=F64) * 7.0
    y = EntryNorm(spec, 3, dtype=F64)(x)
    for t in y.values():
        assert torch.allclose(t.pow(2).flatten(2).mean(2), torch.ones(2, 3, dtype=F64), atol=1e-4)


def test_features_roundtrip_and_stacking() -> None:
    spec = WeightSpaceSpec.from_axes({"0.weight": [("h", 5), (None, 3)], "0.bias": [("h", 5)],
                                      "2.weight": [(None, 2), ("h", 5)], "2.bias": [(None, 2)]})
    models = [nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double() for _ in range(4)]
    feats = WeightFeatures.from_models(spec, models)
    assert (feats.batch_size, feats.channels, feats.dtype) == (4, 1, F64)
    assert feats.flatten().shape == (4, 1, 5 * 3 + 5 + 2 * 5 + 2)
    assert rel_err(WeightFeatures.unflatten(spec, feats.flatten()), feats) == 0.0
    sds = feats.to_state_dicts(models[0].state_dict())
    for m, sd in zip(models, sds):
        for k, v in m.state_dict().items():
            assert torch.equal(sd[k], v)
    # permuting features == permuting the model's state dict
    perm = spec.random_permutation(torch.Generator().manual_seed(0))
    permuted = spec.permute_state_dict(models[1].state_dict(), perm)
    assert rel_err(feats.permute(perm).to_views(1), spec.to_views(permuted)) == 0.0
    # stacking channels / batches; layers return the same container kind
    both = WeightFeatures.cat_channels([feats, feats * 2.0])
    assert both.channels == 2 and WeightFeatures.cat_batch([feats, feats]).batch_size == 8
    layer = UNFLinear(spec, 2, 3, dtype=F64)
    assert isinstance(layer(both), WeightFeatures) and isinstance(layer(both.as_dict()), dict)
    with pytest.raises(ValueError):
        WeightFeatures(spec, {**feats.as_dict(), "0.bias": torch.zeros(4, 1, 6)})
    with pytest.raises(KeyError):
        WeightFeatures(spec, {"0.bias": torch.zeros(4, 1, 5)})
    target = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    feats.load_into(target, index=2)
    assert torch.equal(target[0].weight, models[2][0].weight)


def test_torch_compile_matches_eager() -> None:
    spec = WeightSpaceSpec.from_axes({"W": [("h", 3), ("h", 3)], "b": [("h", 3)], "v": [(None, 2), ("h", 3)]})
    torch.manual_seed(0)
    model = UNF(spec, [1, 3, 1])
    x = WeightFeatures.randn(spec, 2, 1).as_dict()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y, yc = model(x), compiled(x)
    assert rel_err(yc, y) < 1e-5
    loss = sum(t.sum() for t in compiled(x).values())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- derived specs
def _derived_cases():
    """MLP, small CNN, LSTM and a small HF GPT-2 (logits only), with the compiler's derived specs."""
    try:
        from unf.compiler import derive_spec  # noqa: F401
    except ImportError:  # the compiler is optional while it is being built
        return []
    return ["mlp", "cnn", "lstm", "gpt2"]


def _derived_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), \
            torch.randn(2, 4)
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)), \
            torch.randn(2, 3, 6, 6)
    if name == "lstm":
        class Head(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.LSTM(3, 4, batch_first=True)
                self.fc = nn.Linear(4, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fc(self.rnn(x)[0][:, -1])

        return Head(), torch.randn(2, 5, 3)
    from transformers import GPT2Config, GPT2LMHeadModel

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50,
                                                    n_positions=16))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(ids).logits

    return Logits(), torch.randint(0, 50, (2, 6))


@pytest.mark.parametrize("name", _derived_cases())
def test_equivariance_on_derived_specs(name: str) -> None:
    from unf.compiler import derive_spec

    model, x = _derived_model(name)
    spec = derive_spec(model, x)
    # the model's own weights as channel 0, noise as channel 1
    feats = WeightFeatures.from_models(spec, [model.double()], dtype=F64)
    feats = WeightFeatures.cat_batch([feats, WeightFeatures.randn(spec, 1, 1, dtype=F64)])
    feats = WeightFeatures.cat_channels([feats, WeightFeatures.randn(spec, 2, 1, dtype=F64)])
    torch.manual_seed(0)
    unf = UNF(spec, [2, 2, 2, 1], dtype=F64, positional_encoding=True)
    assert _check_equivariant(unf, spec, feats) <= 1e-10
    inv = UNFInvariant(spec, [2, 2], out_features=1, head_hidden=(4,), dtype=F64)
    assert _check_invariant(inv, spec, feats) <= 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", sorted(SPECS) + _derived_cases())
@pytest.mark.parametrize("role", [False, True])
def test_forward_rows_equals_forward(name: str, role: bool, monkeypatch) -> None:
    """Project-first evaluation (:meth:`UNFLinear.forward_rows`) is the same map as :meth:`UNFLinear.forward`,
    with and without autograd, in column blocks into a reused workspace, for 1 and 2 output channels."""
    import unf.nn.layers as layers
    from unf.nn import RoleUNFLinear

    if name in SPECS:
        spec = SPECS[name]
    else:
        from unf.compiler import derive_spec

        spec = derive_spec(*_derived_model(name)).parameters_only()
    monkeypatch.setattr(layers, "_PROJECT_CHUNK", 3)  # several column blocks even for tiny entries
    for co in (1, 2):
        torch.manual_seed(co)
        layer = (RoleUNFLinear(spec, 3, co, dtype=F64) if role else UNFLinear(spec, 3, co, dtype=F64))
        with torch.no_grad():
            for p in layer.parameters():  # zero-initialised biases and coefficients would hide terms
                p.normal_()
        x = WeightFeatures.randn(spec, 1, 3, dtype=F64)
        rows = {n: t[0].reshape(3, -1).t().contiguous() for n, t in x.items()}
        workspace: dict = {}
        with torch.no_grad():
            ref = layer(x)
            for _ in range(2):  # the second call reuses the first's buffers
                out = layer.forward_rows(rows, workspace)
                for n in layer.names:
                    assert _rel(out[n], ref[n][0]) <= 1e-12, n
        rows = {n: t.requires_grad_() for n, t in rows.items()}
        out = layer.forward_rows(rows)
        loss = sum((out[n] * ref[n][0].sin()).sum() for n in layer.names)
        grads = torch.autograd.grad(loss, [*rows.values(), *layer.parameters()], allow_unused=True)
        xs = {n: t.detach().t().reshape(x[n].shape).requires_grad_() for n, t in rows.items()}
        ref_out = layer(xs)
        ref_loss = sum((ref_out[n][0] * ref[n][0].sin()).sum() for n in layer.names)
        ref_grads = torch.autograd.grad(ref_loss, [*xs.values(), *layer.parameters()], allow_unused=True)
        for n, g, r in zip(list(rows), grads, ref_grads):
            assert _rel(g, r.reshape(3, -1).t()) <= 1e-12, n
        for g, r in zip(grads[len(rows):], ref_grads[len(rows):]):
            assert (g is None and r is None) or _rel(g, r) <= 1e-12
