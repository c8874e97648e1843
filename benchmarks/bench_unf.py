"""Benchmark: 3-layer UNF (channels 1->16->16->1, ReLU), batch 8, forward+backward, on
(a) the MLP 64->32->10 spec (every axis permutable) and (b) a 2-block pre-LN transformer spec of 37 tensors;
fast path vs a per-term loop in the same run; and a 1-channel UNFLinear on the GPT-2-small spec.

    python benchmarks/bench_unf.py [--repeats 20] [--gpt2-small]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from unf import WeightSpaceSpec
from unf.nn.batch import random_features
from unf.nn.linear import UNFLinear
from unf.nn.models import UNF


def mlp_spec() -> WeightSpaceSpec:
    return WeightSpaceSpec.from_axes({"W1": [("h", 32), ("in", 64)], "b1": [("h", 32)],
                                      "W2": [("out", 10), ("h", 32)], "b2": [("out", 10)]})


def transformer_spec(d: int = 32, heads: int = 4, head_dim: int = 8, mlp: int = 64, vocab: int = 50,
                     context: int = 16, blocks: int = 2) -> WeightSpaceSpec:
    """The issue's 37-tensor spec: one residual group; q and k share a head-dim group; vocab/positions fixed."""
    axes: dict[str, list] = {"tok": [(None, vocab), ("d", d)], "pos": [(None, context), ("d", d)]}
    for b in range(blocks):
        h, qk, vo, m = f"heads{b}", f"qk{b}", f"vo{b}", f"mlp{b}"
        axes.update({
            f"{b}.ln1.g": [("d", d)], f"{b}.ln1.b": [("d", d)], f"{b}.ln2.g": [("d", d)], f"{b}.ln2.b": [("d", d)],
            f"{b}.q": [("d", d), (h, heads), (qk, head_dim)], f"{b}.k": [("d", d), (h, heads), (qk, head_dim)],
            f"{b}.v": [("d", d), (h, heads), (vo, head_dim)],
            f"{b}.bq": [(h, heads), (qk, head_dim)], f"{b}.bk": [(h, heads), (qk, head_dim)],
            f"{b}.bv": [(h, heads), (vo, head_dim)],
            f"{b}.o": [(h, heads), (vo, head_dim), ("d", d)], f"{b}.bo": [("d", d)],
            f"{b}.fc1": [("d", d), (m, mlp)], f"{b}.bfc1": [(m, mlp)], f"{b}.fc2": [(m, mlp), ("d", d)],
            f"{b}.bfc2": [("d", d)],
        })
    axes.update({"lnf.g": [("d", d)], "lnf.b": [("d", d)], "head": [("d", d), (None, vocab)]})
    return WeightSpaceSpec.from_axes(axes)


def per_term_forward(layer: UNFLinear, x: dict) -> dict:
    """The straightforward loop: every term reduces its input, mixes channels and writes, with no sharing."""
    x = layer.to_internal(x)
    ref = next(iter(x.values()))
    out = {e.name: torch.zeros(ref.shape[0], layer.out_channels, *e.shape, dtype=ref.dtype)
           for e in layer.entries}
    for term, w in layer.term_weights():
        r = layer.reduce(x[term.in_entry], term.in_letters, term.kept)
        layer.place(out[term.out_entry], term.out_letters, term.kept, torch.einsum("oc,bc...->bo...", w, r))
    return layer.from_internal(out)


def time_fwd_bwd(net, x, repeats: int, forward=None, warmup: int = 2) -> float:
    forward = forward if forward is not None else net
    times = []
    for i in range(repeats + warmup):
        start = time.perf_counter()
        out = forward(x)
        sum(v.square().mean() for v in out.values()).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
    return statistics.median(times)


def per_term_net(net: UNF):
    def forward(x):
        for i, layer in enumerate(net.layers):
            x = per_term_forward(layer, x)
            if i < len(net.layers) - 1:
                x = {k: torch.relu(v) for k, v in x.items()}
        return x
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpt2-small", action="store_true", help="also time a 1-channel UNFLinear on GPT-2-small")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, spec in (("MLP 64-32-10", mlp_spec()), ("2-block transformer (37 tensors)", transformer_spec())):
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        net = UNF(spec, [1, 16, 16, 1])
        x = random_features(spec, 8, 1, torch.Generator().manual_seed(args.seed))
        time_fwd_bwd(net, x, 1, warmup=0)
        setup = time.perf_counter() - start
        fast = time_fwd_bwd(net, x, args.repeats)
        slow = time_fwd_bwd(net, x, max(3, args.repeats // 4), per_term_net(net))
        terms = len(net.layers[0].terms)
        params = sum(p.numel() for p in net.parameters())
        print(f"\n{name}: {len(spec.entries)} tensors, {terms} terms per layer, {params:,} parameters")
        print(f"  construction + first call {setup:.2f} s")
        print(f"  fwd+bwd (batch 8): fast {fast * 1e3:.2f} ms, per-term loop {slow * 1e3:.2f} ms "
              f"(fast is {slow / fast:.1f}x faster)")
    if args.gpt2_small:
        from transformers import GPT2Config, GPT2LMHeadModel

        import unf

        model = GPT2LMHeadModel(GPT2Config())
        spec = unf.derive_spec(model, torch.randint(0, 50257, (1, 8))).parameters_only()
        start = time.perf_counter()
        layer = UNFLinear(spec, 1, 1)
        built = time.perf_counter() - start
        x = {e.name: v.unsqueeze(0).unsqueeze(0) for e, v in zip(spec.entries, spec.to_views(model.state_dict())
                                                                  .values())}
        with torch.no_grad():
            start = time.perf_counter()
            layer(x)
            fwd = time.perf_counter() - start
        print(f"\nGPT-2-small spec: {len(spec.entries)} entries, {len(layer.terms):,} terms, "
              f"{sum(p.numel() for p in layer.parameters()):,} parameters; built in {built:.1f} s; "
              f"1-channel forward (batch 1, no grad) {fwd:.1f} s")


if __name__ == "__main__":
    main()
