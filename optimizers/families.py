"""The learned function ``f``: per-element features (N, 19) -> one update direction per element (N,).

Families share one call signature, ``f(features, segments) -> (N,)``:

- :class:`PerParamMLP` — the same small MLP on every element independently (small_fc_lopt style).
- :class:`DeepSet` — per-element layers plus, in every layer, the mean over the element's segment (a tensor or a
  spec entry) as context: permutation invariant within a segment, the "standard choice" of the UNF paper.
- The UNF family (DeepSet layers, then an equivariant UNF layer across the whole spec) lives in ``optimizers.unf``.

Weights are shared across all segments, so any ``f`` works for any model ("by role" sharing: every element and
every segment plays the same role).

:class:`PerParamMLP` and :class:`DeepSet` also have ``forward_factored(tensor_features, step_features, segments)``:
the same function from the 8 tensor channels, channels first (8, N), and the 11 step channels (11,), which are the
same for every element. Their first layer then folds the step channels into one constant per output channel
instead of reading 11 constant columns of an (N, 19) matrix. :meth:`optimizers.rule.LearnedRule.update` uses it
when ``f`` has it. Internally the layers run channels first ((C, N): a segment is a contiguous run of columns),
which keeps segment reductions and matmuls efficient.

``forward_factored`` also takes leading batch axes, on its inputs and on the module's weights (substituted with
``torch.func.functional_call``): a population of P rules with weights (P, out, in) maps features (P, 8, N) and
(P, 11) to (P, N) in one batched pass. ES and PES run their populations that way (no ``vmap`` around the rule,
:func:`meta_train.estimators.unroll`); a family without ``forward_factored`` is vmapped instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .features import N_FEATURES, Segments, segment_add_, segment_mean

__all__ = ["PerParamMLP", "DeepSet", "DeepSetLayer", "FAMILIES"]


class PerParamMLP(nn.Module):
    """Per-element MLP ``19 -> hidden -> ... -> 1`` with ReLU (no interaction between elements)."""

    def __init__(self, hidden: int = 32, layers: int = 2, in_features: int = N_FEATURES):
        super().__init__()
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features}  # to save and rebuild
        dims = [in_features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        blocks.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*blocks)
        # the read-out starts random, as in the paper (beta = 0.001 keeps the learned term small at first): a zero
        # read-out would give ES/PES almost no signal, since the effect of perturbing either beta or the read-out is
        # proportional to the other

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.net(features).squeeze(-1)

    def forward_factored(self, tensor_features: torch.Tensor, step_features: torch.Tensor,
                         segments: Segments) -> torch.Tensor:
        """``forward`` on features ``[tensor_features.T, step_features]``, channels first: (..., 8, N) and
        (..., 11) -> (..., N) (module docstring)."""
        x, shared = tensor_features, step_features
        for module in self.net:
            if isinstance(module, nn.Linear):
                x = _linear_channels(module.weight, module.bias, x, shared)
                shared = None
            else:
                x = module(x)
        return x[..., 0, :]


def _fold_shared(weight: torch.Tensor, bias: torch.Tensor | None, k: int, shared: torch.Tensor) -> torch.Tensor:
    """The bias that folds in input channels ``k:`` of ``weight`` (..., out, in) at the values ``shared`` (..., in - k)
    that every element has."""
    const = (weight[..., k:] @ shared.unsqueeze(-1)).squeeze(-1)  # (..., out)
    return const if bias is None else bias + const


def _linear_channels(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer (``weight`` (..., out, in), ``bias`` (..., out)) on channels-first ``x`` (..., k, N);
    ``shared`` (..., in - k) holds the remaining input channels, equal for every element (folded into the bias)."""
    if shared is not None:
        bias, weight = _fold_shared(weight, bias, x.shape[-2], shared), weight[..., :x.shape[-2]]
    y = weight @ x
    return y if bias is None else y.add_(bias.unsqueeze(-1))  # in place: y is the matmul's fresh output


class DeepSetLayer(nn.Module):
    """``y = x A + mean_segment(x) B + b``: equivariant to permutations within each segment."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.elem = nn.Linear(in_features, out_features)
        self.pool = nn.Linear(in_features, out_features, bias=False)
        bound = 1 / math.sqrt(2 * in_features)  # fan-in counts both terms
        nn.init.uniform_(self.elem.weight, -bound, bound)
        nn.init.uniform_(self.pool.weight, -bound, bound)

    def forward(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """(..., N, in) -> (..., N, out)."""
        return self.forward_channels(x.transpose(-1, -2), segments).transpose(-1, -2)

    def forward_channels(self, x: torch.Tensor, segments: Segments, shared: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Channels first: (..., in, N) -> (..., out, N). ``shared`` (..., in - k) holds the last input channels
        when they are the same for every element and ``x`` has only the first ``k``: their element and pooled terms
        are then one constant per output channel.

        The pooled term and the bias make one (..., out, T) table, added run by run, in place, to the matmul's
        fresh output (no (out, N) gather of it; under ``vmap``, ``W @ x`` then an add is also faster than ``addmm``).
        """
        weight, pool, bias = self.elem.weight, self.pool.weight, self.elem.bias
        if shared is not None:
            k = x.shape[-2]
            # a constant channel's segment mean is itself: its element and pooled weights act together
            bias = _fold_shared(weight + pool, bias, k, shared)
            weight, pool = weight[..., :k], pool[..., :k]
        context = pool @ segment_mean(x, segments, dim=-1)  # (..., out, T)
        if bias is not None:
            context = context + bias.unsqueeze(-1)
        return segment_add_(weight @ x, context, segments, dim=-1)


class DeepSet(nn.Module):
    """DS[hidden] -> ReLU -> ... -> DS[1] (the UNF paper's DeepSet optimizer uses three DS[32] layers)."""

    def __init__(self, hidden: int = 32, layers: int = 3, in_features: int = N_FEATURES):
        super().__init__()
        self.config = {"hidden": hidden, "layers": layers, "in_features": in_features}  # to save and rebuild
        dims = [in_features] + [hidden] * layers
        self.layers = nn.ModuleList(DeepSetLayer(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = DeepSetLayer(dims[-1], 1)  # random, as in the paper (see PerParamMLP)

    def hidden(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        """(..., N, in) features -> (..., N, hidden) activations of the last hidden layer."""
        return self.hidden_channels(features.transpose(-1, -2), segments).transpose(-1, -2)

    def hidden_channels(self, x: torch.Tensor, segments: Segments, shared: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Channels first: (..., in, N) -> (..., hidden, N); ``shared`` as in :meth:`DeepSetLayer.forward_channels`."""
        for layer in self.layers:
            x = layer.forward_channels(x, segments, shared).relu_()  # in place: a fresh output nothing else reads
            shared = None
        return x

    def forward(self, features: torch.Tensor, segments: Segments) -> torch.Tensor:
        """(..., N, in) -> (..., N)."""
        hidden = self.hidden_channels(features.transpose(-1, -2), segments)
        return self.out.forward_channels(hidden, segments)[..., 0, :]

    def forward_factored(self, tensor_features: torch.Tensor, step_features: torch.Tensor,
                         segments: Segments) -> torch.Tensor:
        """``forward`` on features ``[tensor_features.T, step_features]``, channels first: (..., 8, N) and
        (..., 11) -> (..., N) (module docstring)."""
        if not self.layers:
            return self.out.forward_channels(tensor_features, segments, step_features)[..., 0, :]
        hidden = self.hidden_channels(tensor_features, segments, step_features)
        return self.out.forward_channels(hidden, segments)[..., 0, :]


FAMILIES: dict[str, type[nn.Module]] = {"mlp": PerParamMLP, "deepset": DeepSet}
