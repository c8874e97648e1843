"""The spec compiler on real architectures: specs preserve the function and are as large as expected."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from torch import nn

import unf
from unf import WeightSpaceSpec, check_spec, derive_spec

from .zoo import ARCHITECTURES, bert_base_model, build

TRIALS = 20


@pytest.fixture(scope="module")
def derived():
    """Derive each architecture's spec once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model, x = build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("error", unf.UnknownOpWarning)  # the zoo must be fully covered
                cache[name] = (model, x, derive_spec(model, x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_spec_preserves_function(derived, name):
    model, x, spec = derived(name)
    report = check_spec(model, spec, x, trials=TRIALS, generator=torch.Generator().manual_seed(1))
    assert report.ok, f"{name}: {report}"
    assert report.max_rel_error <= 1e-5
    assert len(report.errors) == TRIALS
    assert spec.groups, f"{name}: no symmetry found at all"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_entries_cover_every_floating_tensor(derived, name):
    model, _, spec = derived(name)
    state = model.state_dict()
    covered = Counter()
    for e in spec.entries:
        covered[e.source] += e.view(state[e.source]).numel()
    for key, t in state.items():
        if t.is_floating_point() and key not in sum((e.aliases for e in spec.entries), ()):
            assert covered[key] == t.numel(), key
    # views are views: writing through to_views/from_views round-trips exactly
    back = spec.from_views(spec.to_views(state), like=state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def groups_of(spec: WeightSpaceSpec, entry: str) -> tuple:
    return spec[entry].axes


def test_gpt2_groups(derived):
    layers = 2
    model, _, spec = derived("gpt2")
    residual = spec["transformer.wte.weight"].axes[1]
    assert residual is not None and spec["transformer.wte.weight"].axes[0] is None  # vocab fixed
    per_layer = []
    for i in range(layers):
        p = f"transformer.h.{i}."
        q, k, v = (spec[f"{p}attn.c_attn.weight[{j}]"] for j in range(3))
        assert q.shape == (16, 2, 8)  # (d_model, heads, head_dim)
        heads, qk, vo = q.axes[1], q.axes[2], v.axes[2]
        assert q.axes == k.axes == (residual, heads, qk)
        assert v.axes == (residual, heads, vo)
        assert qk != vo and None not in (heads, qk, vo)
        assert spec[f"{p}attn.c_proj.weight"].axes == (heads, vo, residual)
        hidden = spec[f"{p}mlp.c_fc.weight"].axes[1]
        assert spec[f"{p}mlp.c_proj.weight"].axes == (hidden, residual)
        per_layer.append({heads, qk, vo, hidden})
        for ln in ("ln_1", "ln_2"):
            assert spec[f"{p}{ln}.weight"].axes == (residual,)
    assert not per_layer[0] & per_layer[1]
    # one residual group + per layer: heads, qk head-dim, vo head-dim, MLP hidden
    assert len(spec.groups) == 1 + 4 * layers
    # the tied head is one entry with an alias, permuted consistently
    assert "lm_head.weight" in spec["transformer.wte.weight"].aliases
    assert "lm_head.weight" not in spec.sources


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_rnn_hidden_group_on_both_axes_of_weight_hh(derived, name):
    _, _, spec = derived(name)
    gates = 4 if name == "lstm" else 3
    for layer in range(2):
        hh = [spec[f"rnn.weight_hh_l{layer}[{g}]"] for g in range(gates)]
        h = hh[0].axes[0]
        assert h is not None and all(e.axes == (h, h) and e.shape == (6, 6) for e in hh)
        ih = spec[f"rnn.weight_ih_l{layer}[0]"]
        assert ih.axes[0] == h
    h0, h1 = spec["rnn.weight_hh_l0[0]"].axes[0], spec["rnn.weight_hh_l1[0]"].axes[0]
    assert h0 != h1 and spec["rnn.weight_ih_l1[0]"].axes == (h1, h0)
    assert spec["rnn.weight_ih_l0[0]"].axes[1] is None  # input features are fixed


def test_llama_rotary_fixes_qk_head_dim_only(derived):
    _, _, spec = derived("llama")
    p = "model.model.layers.0.self_attn." if "model.model.layers.0.self_attn.q_proj.weight" in spec.sources \
        else "model.layers.0.self_attn."
    q, k, v, o = (spec[f"{p}{n}_proj.weight"] for n in "qkvo")
    kv_heads, rep, q_dim, d = q.axes
    assert q.shape == (2, 2, 4, 16) and q_dim is None  # rotary pairs head-dim coordinates
    assert kv_heads is not None and rep is not None  # GQA: kv groups x query heads per group
    assert k.axes == (kv_heads, None, d)
    assert v.axes[0] == kv_heads and v.axes[1] is not None
    assert o.axes == (d, kv_heads, rep, v.axes[1])


def test_bert_heads_and_mlp(derived):
    _, _, spec = derived("bert")
    p = "bert.encoder.layer.0."
    q = spec[f"{p}attention.self.query.weight"]
    assert q.shape == (2, 8, 16) and None not in q.axes
    assert spec[f"{p}attention.self.key.weight"].axes == q.axes
    # the classifier reads the pooled first token: the residual stream stays permutable
    assert spec["bert.embeddings.word_embeddings.weight"].axes[1] is not None


def test_bare_bert_output_is_fixed():
    model, x = build_from(bert_base_model)
    spec = derive_spec(model, x)
    # BertModel returns the residual stream itself: outputs are fixed, so the residual must be fixed
    assert spec["embeddings.word_embeddings.weight"].axes == (None, None)
    assert check_spec(model, spec, x, trials=5).ok


def build_from(factory):
    torch.manual_seed(0)
    model, x = factory()
    model = model.double()
    unf.randomize_(model, torch.Generator().manual_seed(0))
    return model, x


def test_cnn_spatial_axes_fixed_and_bn_buffers_follow_channels(derived):
    _, _, spec = derived("cnn_bn")
    c0 = spec["features.0.weight"].axes[0]
    assert spec["features.0.weight"].axes[1:] == (None, None, None)
    for b in ("weight", "bias", "running_mean", "running_var"):
        assert spec[f"features.1.{b}"].axes == (c0,)
    assert spec["features.1.running_mean"].kind == "buffer"
    c1 = spec["features.4.weight"].axes[0]
    head = spec["head.weight"]
    assert head.shape == (5, 6, 4) and head.axes == (None, c1, None)  # flatten: channels x spatial


def test_resnet_shortcuts_tie_channels(derived):
    _, _, spec = derived("resnet")
    stem = spec["stem.0.weight"].axes[0]
    assert spec["blocks.0.conv2.weight"].axes[0] == stem  # identity shortcut ties block output to input
    proj = spec["blocks.2.shortcut.0.weight"]
    assert proj.shape == (6, 4, 1, 1) and proj.axes[1] == stem
    assert spec["blocks.2.conv2.weight"].axes[0] == proj.axes[0]
    assert spec["blocks.2.conv1.weight"].axes[0] != proj.axes[0]  # inner channels are free


def test_module_applied_twice_is_consistent():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.shared(h))
            return self.out(torch.tanh(self.shared(h)))

    model, x = build_from(lambda: (Twice(), torch.randn(4, 3, dtype=torch.float64)))
    spec = derive_spec(model, x)
    g = spec["inp.weight"].axes[0]
    assert spec["shared.weight"].axes == (g, g)
    assert check_spec(model, spec, x, trials=TRIALS).ok


def test_tied_parameters_permute_together():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5)
            self.mid = nn.Linear(5, 5)
            self.head = nn.Linear(5, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.relu(self.mid(self.emb(idx))))

    model, x = build_from(lambda: (Tied(), torch.randint(0, 7, (2, 4))))
    spec = derive_spec(model, x)
    assert spec["emb.weight"].aliases == ("head.weight",)
    assert check_spec(model, spec, x, trials=TRIALS).ok
    permuted = spec.permute_state_dict(model.state_dict(), spec.random_permutation())
    assert permuted["head.weight"] is permuted["emb.weight"]


def test_check_spec_catches_a_wrong_spec(derived):
    model, x, spec = derived("mlp")
    w0 = spec["net.0.weight"]
    # claim the input axis is permutable, which it is not
    wrong = WeightSpaceSpec(
        tuple(e if e.name != "net.0.weight" else type(e)(**{**e.__dict__, "axes": (w0.axes[0], "bogus")})
              for e in spec.entries), {**spec.groups, "bogus": w0.shape[1]})
    report = check_spec(model, wrong, x, trials=5)
    assert not report.ok and report.max_rel_error > 1e-2
    # forgetting to permute a bias that belongs to a group is caught too
    missing = WeightSpaceSpec(
        tuple(e if e.name != "net.0.bias" else type(e)(**{**e.__dict__, "axes": (None,)}) for e in spec.entries),
        spec.groups)
    assert not check_spec(model, missing, x, trials=5).ok


def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)


@torch.library.custom_op("unf_tests::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return _mystery(x)


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_unknown_op_fixes_axes_and_warns():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = mystery(h)  # position-dependent: permuting the hidden axis would change the output
            return self.c(torch.relu(self.b(h)))

    model, x = build_from(lambda: (Odd(), torch.randn(4, 3, dtype=torch.float64)))
    with pytest.warns(unf.UnknownOpWarning, match=r"unf_tests\.mystery.*\(in <top level>\)"):
        spec = derive_spec(model, x)
    assert spec["a.weight"].axes == (None, None) and spec["b.weight"].axes[1] is None
    assert spec["b.weight"].axes[0] is not None  # downstream of the op the symmetry survives
    assert check_spec(model, spec, x, trials=TRIALS).ok


def test_unknown_op_warning_names_the_module():
    class Inner(nn.Module):
        def forward(self, x):
            return mystery(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.odd = nn.Linear(3, 4), Inner()

        def forward(self, x):
            return self.odd(self.lin(x))

    with pytest.warns(unf.UnknownOpWarning, match=r"in odd\)"):
        derive_spec(Outer(), torch.randn(2, 3))


def test_bad_inputs_give_clear_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(unf.SpecError, match=r"example inputs do not fit Linear.*\(2, 5\)"):
        derive_spec(model, torch.randn(2, 5))
    with pytest.raises(unf.SpecError, match="tensor or a tuple"):
        derive_spec(model, {"x": torch.randn(2, 3)})
    with pytest.raises(unf.SpecError, match="nn.Module"):
        derive_spec(lambda x: x, torch.randn(2, 3))


def test_unexportable_model_gives_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            if y.sum() > 0:  # Python control flow on tensor data cannot be exported
                return y
            return -y

    with pytest.raises(unf.SpecError, match=r"torch.export could not trace DataDependent.*control flow"):
        derive_spec(DataDependent(), torch.randn(2, 3))


def test_causal_hand_written_attention():
    class HandAttention(nn.Module):
        def __init__(self, d=8, heads=2):
            super().__init__()
            self.h = heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.register_buffer("mask", torch.tril(torch.ones(6, 6)).bool(), persistent=False)

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = (f(x).view(B, T, self.h, D // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
            att = (q @ k.transpose(-2, -1)) / (D // self.h) ** 0.5
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
            return self.o((att @ v).transpose(1, 2).reshape(B, T, D)).sum(1)

    model, x = build_from(lambda: (HandAttention(), torch.randn(2, 6, 8, dtype=torch.float64)))
    spec = derive_spec(model, x)
    assert check_spec(model, spec, x, trials=TRIALS).ok
    assert spec["q.weight"].axes[:2] == spec["k.weight"].axes[:2] and None not in spec["q.weight"].axes[:2]
    assert spec["v.weight"].axes[1] not in (None, spec["q.weight"].axes[1])


def test_spec_json_round_trip_of_derived_spec(derived):
    model, x, spec = derived("gpt2")
    again = WeightSpaceSpec.from_json(spec.to_json())
    assert again == spec
    assert check_spec(model, again, x, trials=3).ok


def test_in_place_writes_through_views_are_functionalized():
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
            h[:, :4] = torch.relu(self.a(x))  # slice + copy_ in export's IR
            return self.b(h)

    model, x = build_from(lambda: (Writes(), torch.randn(5, 3, dtype=torch.float64)))
    spec = derive_spec(model, x)
    assert check_spec(model, spec, x, trials=TRIALS).ok
    hidden = spec["a.weight"].axes[0]
    b = [e for e in spec.entries if e.source == "b.weight"]
    assert hidden is not None and b[0].axes == (None, hidden)  # columns 0:4 read the written block


def test_in_place_arithmetic_with_positional_factor_is_fixed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
            h.add_(self.a(x))
            h.mul_(torch.linspace(0.5, 1.5, 4, dtype=x.dtype))  # position-dependent scale
            return self.b(h)

    model, x = build_from(lambda: (Scaled(), torch.randn(5, 3, dtype=torch.float64)))
    spec = derive_spec(model, x)
    assert spec["a.weight"].axes == (None, None)
    assert check_spec(model, spec, x, trials=TRIALS).ok


def test_grouped_conv_structure(derived):
    _, _, spec = derived("conv1d_grouped")
    w = spec["c2.weight"]
    # out channels = 4 conv groups x 2, and GroupNorm(2) reads them as 2 x 4: the common refinement is 2 x 2 x 2
    assert w.shape == (2, 2, 2, 2, 3)  # (gn group, conv group within it, out per conv group, in per group, k)
    assert None not in w.axes[:4] and w.axes[4] is None
    assert spec["gn.weight"].axes == w.axes[:3]
