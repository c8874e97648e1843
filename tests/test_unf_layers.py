"""UNF layers on every architecture of the compiler's test suite (derived specs): equivariant and invariant.

The basis, completeness, reference and training tests of the layers live in tests/test_nn_*.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import unf
from unf.nn import UNF, UNFInvariant, WeightFeatures, assert_equivariant, assert_invariant

from .zoo import ARCHITECTURES, build


@pytest.fixture(scope="module")
def zoo_specs():
    cache = {}

    def get(name):
        if name not in cache:
            model, x = build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = unf.derive_spec(model, x).parameters_only()
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_three_layer_unf_is_equivariant_and_invariant_model_invariant(zoo_specs, name):
    spec = zoo_specs(name)
    torch.manual_seed(0)
    x = WeightFeatures.randn(spec, 2, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).as_dict()
    net = UNF(spec, [1, 3, 3, 1]).double()
    assert assert_equivariant(net, spec, x, trials=10, rtol=1e-10) <= 1e-10
    inv = UNFInvariant(spec, [1, 3, 3], out_features=2).double()
    assert assert_invariant(inv, spec, x, trials=10, rtol=1e-10) <= 1e-10


def test_checks_catch_a_non_equivariant_function(zoo_specs):
    spec = zoo_specs("mlp")
    x = WeightFeatures.randn(spec, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).as_dict()

    def leaky(features):  # mixes positions along every axis: not equivariant
        return {k: v.flip(-1) for k, v in features.items()}

    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(leaky, spec, x)
    with pytest.raises(AssertionError, match="not invariant"):
        assert_invariant(lambda f: torch.cat([v.flatten(1) for v in f.values()], 1)[:, :3], spec, x)
