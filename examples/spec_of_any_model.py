"""Derive, inspect, prove and use the permutation symmetries of a model you wrote yourself.

    python examples/spec_of_any_model.py
"""

import torch
from torch import nn

import unf


class GatedMixer(nn.Module):
    """A token mixer with a SwiGLU feed-forward, RMS-style norm and a residual stream."""

    def __init__(self, d: int = 16, hidden: int = 32, vocab: int = 40):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.gain = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        gate, value = self.up(h).chunk(2, dim=-1)
        x = x + self.down(nn.functional.silu(gate) * value)
        return self.out(x)


def main() -> None:
    torch.manual_seed(0)
    model = GatedMixer().double()
    unf.randomize_(model)  # random gains and biases make the check sensitive
    tokens = torch.randint(0, 40, (2, 8))

    spec = unf.derive_spec(model, tokens)
    print(spec)  # up.weight is cut into gate and value halves that share the hidden group
    print(unf.check_spec(model, spec, tokens, trials=20))

    # a permuted copy computes the same function with different weights
    perm = spec.random_permutation(torch.Generator().manual_seed(1))
    twin = GatedMixer().double()
    twin.load_state_dict(spec.permute_state_dict(model.state_dict(), perm))
    with torch.no_grad():
        print("max |model - permuted twin| =", float((model(tokens) - twin(tokens)).abs().max()))
    print(spec.to_json()[:200], "...")


if __name__ == "__main__":
    main()
