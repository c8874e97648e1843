"""The spec data model: hand-written specs, permutations, views, JSON, display."""

from __future__ import annotations

import pytest
import torch

from unf import Entry, WeightSpaceSpec

MLP = {
    "W1": [("h", 5), (None, 3)], "b1": [("h", 5)],
    "W2": [(None, 2), ("h", 5)], "b2": [(None, 2)],
}


def mlp_state(gen):
    return {"W1": torch.randn(5, 3, generator=gen), "b1": torch.randn(5, generator=gen),
            "W2": torch.randn(2, 5, generator=gen), "b2": torch.randn(2, generator=gen)}


def mlp_forward(s, x):
    return torch.tanh(x @ s["W1"].T + s["b1"]) @ s["W2"].T + s["b2"]


def test_from_axes_builds_groups_and_entries():
    spec = WeightSpaceSpec.from_axes(MLP)
    assert spec.groups == {"h": 5}
    assert [e.name for e in spec.entries] == ["W1", "b1", "W2", "b2"]
    assert spec["W2"].axes == (None, "h") and spec["W2"].shape == (2, 5)
    assert spec.axes_of("h") == [("W1", 0), ("b1", 0), ("W2", 1)]


def test_from_axes_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="group 'h' has size 5 elsewhere but 4"):
        WeightSpaceSpec.from_axes({"a": [("h", 5)], "b": [("h", 4)]})
    with pytest.raises(ValueError, match="unknown group"):
        WeightSpaceSpec((Entry("a", "a", (3,), ("zz",)),), {})
    with pytest.raises(ValueError, match="duplicate entry names"):
        WeightSpaceSpec((Entry("a", "a", (3,), (None,)), Entry("a", "a", (3,), (None,))), {})


@pytest.mark.parametrize("seed", range(5))
def test_hand_written_spec_permutation_preserves_function(seed):
    gen = torch.Generator().manual_seed(seed)
    spec = WeightSpaceSpec.from_axes(MLP)
    state = mlp_state(gen)
    x = torch.randn(7, 3, generator=gen)
    perm = spec.random_permutation(gen)
    permuted = spec.permute_state_dict(state, perm)
    assert not torch.equal(permuted["W1"], state["W1"]) or torch.equal(perm["h"], torch.arange(5))
    torch.testing.assert_close(mlp_forward(permuted, x), mlp_forward(state, x))
    # the inverse permutation restores the weights exactly
    back = spec.permute_state_dict(permuted, spec.inverse_permutation(perm))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_permutation_convention_new_equals_old_index_select():
    spec = WeightSpaceSpec.from_axes({"v": [("g", 4)]})
    perm = {"g": torch.tensor([2, 0, 3, 1])}
    out = spec.permute_state_dict({"v": torch.tensor([10.0, 11, 12, 13])}, perm)
    assert out["v"].tolist() == [12.0, 10, 13, 11]


def test_views_with_steps_round_trip_and_share_storage():
    # a fused (4, 6) tensor cut into two (2, 2, 3)-shaped blocks along axis 1
    entries = (
        Entry("w[0]", "w", (4, 3), ("a", "b"), steps=(("narrow", 1, 0, 3),), block=((0, 4), (0, 3))),
        Entry("w[1]", "w", (2, 2, 3), ("c", None, "b"), steps=(("narrow", 1, 3, 3), ("view", (2, 2, 3))),
              block=((0, 4), (3, 6))),
    )
    spec = WeightSpaceSpec(entries, {"a": 4, "b": 3, "c": 2})
    state = {"w": torch.arange(24.0).view(4, 6), "other": torch.ones(2)}
    views = spec.to_views(state)
    assert views["w[1]"].shape == (2, 2, 3)
    assert views["w[0]"].data_ptr() == state["w"].data_ptr()  # a view, not a copy
    back = spec.from_views({k: v * 2 for k, v in views.items()}, like=state)
    assert torch.equal(back["w"], state["w"] * 2) and back["other"] is state["other"]
    assert spec.sources == ("w",)


def test_to_views_errors_name_the_problem():
    spec = WeightSpaceSpec.from_axes(MLP)
    with pytest.raises(KeyError, match="state_dict lacks"):
        spec.to_views({"W1": torch.zeros(5, 3)})
    bad = mlp_state(torch.Generator().manual_seed(0))
    bad["b1"] = torch.zeros(6)
    with pytest.raises((ValueError, RuntimeError)):
        spec.to_views(bad)


def test_json_round_trip_and_format_check():
    spec = WeightSpaceSpec.from_axes(MLP)
    assert WeightSpaceSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="not a WeightSpaceSpec"):
        WeightSpaceSpec.from_json('{"entries": []}')


def test_str_is_a_table():
    text = str(WeightSpaceSpec.from_axes(MLP))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["entry", "source", "block", "shape"]
    assert any(line.startswith("W2") and "(-, h)" in line for line in lines)
    assert lines[-1].startswith("4 entries, 3 permuted axes, 1 groups: h=5")


def test_parameters_only_drops_buffers():
    spec = WeightSpaceSpec((Entry("w", "w", (3,), ("g",)), Entry("rm", "rm", (3,), ("g",), kind="buffer"),
                            Entry("x", "x", (2,), ("k",), kind="buffer")), {"g": 3, "k": 2})
    p = spec.parameters_only()
    assert [e.name for e in p.entries] == ["w"] and p.groups == {"g": 3}


def test_random_permutation_is_reproducible():
    spec = WeightSpaceSpec.from_axes(MLP)
    a = spec.random_permutation(torch.Generator().manual_seed(3))
    b = spec.random_permutation(torch.Generator().manual_seed(3))
    assert torch.equal(a["h"], b["h"]) and sorted(a["h"].tolist()) == list(range(5))
