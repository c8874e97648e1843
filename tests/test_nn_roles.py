"""Role-shared UNF layers (unf.nn.roles): equivariant on every zoo architecture, equal to a plain UNFLinear when
every term has its own key, and transferable across specs by role key."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import unf
from unf.nn import UNFLinear, WeightFeatures, assert_equivariant
from unf.nn.roles import RoleUNFLinear, term_role

from .zoo import ARCHITECTURES, build


def _spec(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unf.derive_spec(model, x).parameters_only()


def _mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), torch.randn(2, sizes[0])


def _features(spec, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightFeatures.randn(spec, 2, channels, generator=g, dtype=torch.float64).as_dict()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_role_layer_is_equivariant_on_every_zoo_architecture(name):
    model, x = build(name)
    spec = _spec(model, x)
    torch.manual_seed(0)
    layer = RoleUNFLinear(spec, 2, 3).double()
    with torch.no_grad():
        layer.bias_coef.normal_()  # nonzero constants so the bias patterns are exercised too
    assert assert_equivariant(layer, spec, _features(spec, 2), trials=5, rtol=1e-10) <= 1e-10


def test_role_layer_equals_plain_layer_with_the_same_term_coefficients():
    model, x = _mlp([12, 7, 5])
    spec = _spec(model, x)
    torch.manual_seed(0)
    role = RoleUNFLinear(spec, 3, 2).double()
    assert len(role.term_keys) == role.num_terms  # one key per term on a 1-hidden-layer MLP: no tying
    plain = UNFLinear(spec, 3, 2, relax_groups="per_axis").double()
    assert plain.num_terms == role.num_terms
    with torch.no_grad():
        role.bias_coef.normal_()
        for t in range(plain.num_terms):
            plain.term_coefficient(t).copy_(role.term_coefficient(t))
        for name in role.names:
            plain.bias_of(name).copy_(role.bias_of(name))
    xs = _features(spec, 3)
    a, b = role(xs), plain(xs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


def test_equal_keys_share_one_coefficient_and_are_averaged_per_output():
    model, x = _mlp([6, 5, 5, 5, 4])
    spec = _spec(model, x)
    layer = RoleUNFLinear(spec, 1, 1).double()
    roles = [term_role(t, layer.plan.entries) for t in layer.plan.terms]
    assert len(layer.term_keys) < layer.num_terms  # the deeper net reuses keys
    # set one key's coefficient to 1, everything else 0: each output entry that has terms of that key gets
    # the *mean* of those terms, so a constant input of ones maps to ones there (not to the term count)
    key = "p|p g=0|1 cross P=0|1"  # a hidden bias read, fully averaged, by another hidden layer's bias
    assert key in layer.term_keys
    with torch.no_grad():
        layer.coef.zero_()
        layer.bias_coef.zero_()
        layer.coef[layer.term_keys.index(key)] = 1.0
    ones = {k: torch.ones_like(v) for k, v in _features(spec, 1).items()}
    out = layer(ones)
    fed = {layer.names[t.out] for t, r in zip(layer.plan.terms, roles) if r == key}
    assert len(fed) == 3 and all(sum(r == key and t.out == layer.names.index(n) for t, r in
                                     zip(layer.plan.terms, roles)) == 2 for n in fed)
    for name, v in out.items():
        expected = 1.0 if name in fed else 0.0
        torch.testing.assert_close(v, torch.full_like(v, expected))


def test_role_state_transfers_to_a_deeper_wider_model():
    small, xs = _mlp([64, 32, 10])
    deep, xd = _mlp([40, 64, 64, 10])
    a = RoleUNFLinear(_spec(small, xs), 4, 3)
    b = RoleUNFLinear(_spec(deep, xd), 4, 3)
    coverage = b.load_role_state(a.role_state())
    shared = set(a.term_keys) & set(b.term_keys)
    assert 0.0 < coverage < 1.0 and shared
    for k in b.term_keys:
        want = a.coef[a.term_keys.index(k)] if k in shared else torch.zeros_like(b.coef[0])
        torch.testing.assert_close(b.coef[b.term_keys.index(k)], want)
    # same spec: an exact round trip
    c = RoleUNFLinear(_spec(small, xs), 4, 3)
    assert c.load_role_state(a.role_state()) == 1.0
    feats = _features(a.spec, 4)
    out_a, out_c = a.double()(feats), c.double()(feats)
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_c[k])
    with pytest.raises(ValueError, match="channels"):
        RoleUNFLinear(a.spec, 2, 3).load_role_state(a.role_state())


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gru", "gpt2"])
def test_a_converted_layer_keeps_its_exact_mean_scales(name):
    """1/n constants (reduction means, role averaging) are re-derived on ``.double()``, not cast up from float32:
    a layer built in float32 and converted computes exactly what one built in float64 computes."""
    model, x = build(name)
    spec = _spec(model, x)
    for cls in (UNFLinear, RoleUNFLinear):
        torch.manual_seed(0)
        converted = cls(spec, 2, 3).double()
        native = cls(spec, 2, 3, dtype=torch.float64)
        native.load_state_dict(converted.state_dict())
        xs = _features(spec, 2)
        with torch.no_grad():
            a, b = converted(xs), native(xs)
        for k in a:
            assert torch.equal(a[k], b[k]), (cls.__name__, k)
