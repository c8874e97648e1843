"""Property tests: random architectures built from the covered ops; every derived spec preserves the function."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import unf

ACTS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid,
        "softplus": F.softplus}


class RMSNorm(nn.Module):
    """Hand-written RMSNorm (pow-mean-rsqrt pattern), as LLaMA-style code writes it."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def make_norm(kind: str, d: int) -> nn.Module:
    return {"none": nn.Identity(), "layer": nn.LayerNorm(d), "rms": RMSNorm(d),
            "layer_nobias": nn.LayerNorm(d, bias=False)}[kind]


class MLPBlock(nn.Module):
    def __init__(self, d, hidden, act, norm, residual, gated):
        super().__init__()
        self.norm, self.act, self.residual, self.gated = make_norm(norm, d), ACTS[act], residual, gated
        self.up = nn.Linear(d, 2 * hidden if gated else hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.up(self.norm(x))
        if self.gated:  # SwiGLU-style: one fused projection chunked into gate and value
            g, v = h.chunk(2, dim=-1)
            h = self.act(g) * v
        else:
            h = self.act(h)
        y = self.down(h)
        return x + y if self.residual else y


class AttentionBlock(nn.Module):
    def __init__(self, d, heads, head_dim, kv_heads, norm, causal, hand_written, fused):
        super().__init__()
        self.h, self.hd, self.kvh = heads, head_dim, kv_heads
        self.causal, self.hand, self.fused = causal, hand_written, fused
        self.norm = make_norm(norm, d)
        if fused:
            self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim)
        else:
            self.q = nn.Linear(d, heads * head_dim)
            self.k = nn.Linear(d, kv_heads * head_dim, bias=False)
            self.v = nn.Linear(d, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x):
        B, T, _ = x.shape
        y = self.norm(x)
        if self.fused:
            q, k, v = self.qkv(y).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        else:
            q, k, v = self.q(y), self.k(y), self.v(y)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2)
        if self.kvh != self.h:  # grouped-query attention: repeat kv heads
            rep = self.h // self.kvh
            k = k[:, :, None].expand(B, self.kvh, rep, T, self.hd).reshape(B, self.h, T, self.hd)
            v = v[:, :, None].expand(B, self.kvh, rep, T, self.hd).reshape(B, self.h, T, self.hd)
        if self.hand:
            att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5
            if self.causal:
                mask = torch.ones(T, T, dtype=torch.bool).tril()
                att = att.masked_fill(~mask, float("-inf"))
            out = att.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.o(out.transpose(1, 2).reshape(B, T, self.h * self.hd))


class ConcatBlock(nn.Module):
    """Two branches concatenated along features, then mixed back."""

    def __init__(self, d, a, b, act):
        super().__init__()
        self.left, self.right, self.mix, self.act = nn.Linear(d, a), nn.Linear(d, b), nn.Linear(a + b, d), ACTS[act]

    def forward(self, x):
        return self.mix(self.act(torch.cat([self.left(x), self.right(x)], dim=-1)))


class TokenNet(nn.Module):
    def __init__(self, d_in, d, blocks, classes, pool):
        super().__init__()
        self.inp, self.blocks = nn.Linear(d_in, d), nn.ModuleList(blocks)
        self.head, self.pool = nn.Linear(d, classes), pool

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        h = h.mean(1) if self.pool == "mean" else h.amax(1) if self.pool == "max" else h[:, -1]
        return self.head(h)


@st.composite
def token_nets(draw):
    d = draw(st.integers(2, 6))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["mlp", "attention", "concat"]))
        if kind == "mlp":
            blocks.append(MLPBlock(d, draw(st.integers(2, 6)), draw(st.sampled_from(sorted(ACTS))),
                                   draw(st.sampled_from(["none", "layer", "rms", "layer_nobias"])),
                                   draw(st.booleans()), draw(st.booleans())))
        elif kind == "attention":
            kv = draw(st.integers(1, 2))
            blocks.append(AttentionBlock(d, kv * draw(st.integers(1, 2)), draw(st.integers(2, 3)), kv,
                                         draw(st.sampled_from(["none", "layer", "rms"])), draw(st.booleans()),
                                         draw(st.booleans()), draw(st.booleans())))
        else:
            blocks.append(ConcatBlock(d, draw(st.integers(2, 4)), draw(st.integers(2, 4)),
                                      draw(st.sampled_from(sorted(ACTS)))))
    model = TokenNet(3, d, blocks, draw(st.integers(1, 3)), draw(st.sampled_from(["mean", "max", "last"])))
    return model, (2, draw(st.integers(2, 4)), 3)


class ConvNet(nn.Module):
    def __init__(self, widths, norm, residual, head, act):
        super().__init__()
        layers, c = [], 1
        self.residual = residual
        for w in widths:
            layers.append(nn.Conv2d(c, w, 3, padding=1))
            c = w
        self.convs = nn.ModuleList(layers)
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(w) if norm == "batch" else nn.GroupNorm(2 if w % 2 == 0 else 1, w) if norm == "group"
            else nn.Identity() for w in widths)
        self.act, self.head_kind = ACTS[act], head
        self.head = nn.Linear(c * (16 if head == "flatten" else 1), 3)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            y = self.act(norm(conv(x)))
            x = x + y if self.residual and y.shape == x.shape else y
        if self.head_kind == "flatten":
            return self.head(F.avg_pool2d(x, 2).flatten(1))
        return self.head(x.mean((2, 3)))


@st.composite
def conv_nets(draw):
    widths = draw(st.lists(st.integers(2, 5), min_size=1, max_size=3))
    return (ConvNet(widths, draw(st.sampled_from(["none", "batch", "group"])), draw(st.booleans()),
                    draw(st.sampled_from(["flatten", "mean"])), draw(st.sampled_from(sorted(ACTS)))),
            (2, 1, 8, 8))


def _check(model: nn.Module, shape: tuple[int, ...], seed: int) -> unf.WeightSpaceSpec:
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    unf.randomize_(model, gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", unf.UnknownOpWarning)  # every op used here has a rule
        spec = unf.derive_spec(model, x)
    report = unf.check_spec(model, spec, x, trials=5, generator=gen)
    assert report.ok, f"{report}\n{spec}\n{model}"
    return spec


@given(token_nets(), st.integers(0, 2**16))
def test_random_token_networks_specs_preserve_function(net, seed):
    model, shape = net
    spec = _check(model, shape, seed)
    # never vacuous: the input projection's outputs (a hidden layer) can always be permuted somewhere
    assert spec.groups


@given(conv_nets(), st.integers(0, 2**16))
def test_random_conv_networks_specs_preserve_function(net, seed):
    model, shape = net
    spec = _check(model, shape, seed)
    assert spec["convs.0.weight"].axes[0] is not None  # first conv's channels are hidden


@given(st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]), st.integers(1, 3), st.integers(2, 5), st.booleans(),
       st.integers(0, 2**16))
def test_random_recurrent_networks_specs_preserve_function(cell, layers, hidden, bidirectional, seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cell(3, hidden, num_layers=layers, bidirectional=bidirectional)
            self.fc = nn.Linear(hidden * (2 if bidirectional else 1), 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out.mean(0))

    spec = _check(Net(), (4, 2, 3), seed)
    h = spec["rnn.weight_hh_l0" + ("[0]" if cell is not nn.RNN else "")].axes
    assert h[0] is not None and h[0] == h[1]
