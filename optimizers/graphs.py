"""The whole-buffer rule step on a GPU, recorded once as a CUDA graph and replayed on every later step.

On a GPU a learned optimizer's step is bound by kernel launches, not arithmetic: :meth:`LearnedRule.update` is
hundreds of small kernels, each launched from Python, so the step costs milliseconds even for a 2,410-parameter
MLP. A CUDA graph records that sequence once and replays it with one launch. The step then is:

1. copy the gradients and parameters into two static flat buffers (two multi-tensor ``torch._foreach_copy_``);
2. replay the graph: the rule's update (eager or compiled, :mod:`optimizers.compiled`), reading those buffers,
   the group's learning rate (a 0-d device tensor, so schedulers work) and the group's flat state, writing the
   new momenta, step and skip counts in place;
3. copy the new parameters back (one ``torch._foreach_copy_``), as the eager step does.

The replay runs the same kernels on the same inputs as the eager step: the results are the eager step's, bit for
bit (``tests/test_cuda.py``).

Rules for when a graph is used (:meth:`GraphedStep.usable`), otherwise the eager step runs, which is always right:

- every parameter of the group has a gradient (a step with missing gradients runs eagerly; the graph stays);
- the rule's tensors are where they were at capture (moving or replacing a rule's weights re-captures; changing
  them in place, e.g. ``rule.load_state_dict`` or a meta-training update, is seen by the replay);
- the group's flat state is the one captured (``load_state_dict`` makes new state and a new graph).

Memory: the graph keeps its own pool with the step's intermediates (the eager step frees them after each step):
for the UNF optimizer several ``hidden x N`` float buffers (estimated, not measured: ~10, i.e. ~1.2 GB for a
1M-parameter model). So by default (``cuda_graph=None``) only groups of up to :data:`AUTO_MAX_ELEMENTS` elements
are graphed; ``cuda_graph=True`` graphs any size, ``False`` none. If a rule cannot be captured (an op that needs
the host mid-step), the optimizer warns once and steps eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .compiled import StepFn, summary
from .rule import LearnedRule

__all__ = ["GraphedStep", "rule_key", "wants_graph", "AUTO_MAX_ELEMENTS"]

#: the largest group (in elements) graphed by default (4.2M): its UNF step would keep an estimated ~5 GB of
#: intermediates in the graph's pool; beyond it memory is the scarcer resource, and the kernels' own time outgrows
#: the launches a graph saves
AUTO_MAX_ELEMENTS = 1 << 22


def wants_graph(setting: bool | None, n: int) -> bool:
    """Whether a group of ``n`` elements steps by graph replay, for the optimizer's ``cuda_graph`` ``setting``."""
    return n <= AUTO_MAX_ELEMENTS if setting is None else bool(setting)


def rule_key(rule: LearnedRule) -> tuple:
    """What a captured graph depends on besides the state: the rule's ``f`` and where its parameters live (its
    buffers are constants that move only with the parameters; checking them too would cost ~90 us a step)."""
    return (id(rule), id(rule.f), *(t.data_ptr() for t in rule.parameters()))


class GraphedStep:
    """One param group's rule step as a CUDA graph (module docstring). Build with :meth:`capture`."""

    def __init__(self, update: StepFn, key: tuple, momenta: torch.Tensor, step: torch.Tensor, lr: torch.Tensor,
                 count_skips: Callable[[torch.Tensor], None], shapes: list[torch.Size]):
        device = momenta.device
        n = momenta.shape[1]
        numels = [s.numel() for s in shapes]
        self.key = key
        self.state = (momenta, step)
        self.grad = torch.zeros(n, device=device)
        self.param = torch.zeros(n, device=device)
        self.grad_views = [v.view(s) for v, s in zip(self.grad.split(numels), shapes)]
        self.param_views = [v.view(s) for v, s in zip(self.param.split(numels), shapes)]
        self.graph = torch.cuda.CUDAGraph()
        # on the state's device; "thread_local": CUDA calls of the user's other threads (a data loader pinning
        # memory, say) do not break the capture
        with torch.cuda.device(device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            new_param, new_momenta, new_step, skipped = update(self.param, self.grad, lr)
            momenta.copy_(new_momenta)
            step.copy_(new_step)
            count_skips(skipped)
        self.out_views = [v.view(s) for v, s in zip(new_param.split(numels), shapes)]

    @classmethod
    def capture(cls, update: StepFn, key: tuple, momenta: torch.Tensor, step: torch.Tensor, lr: torch.Tensor,
                count_skips: Callable[[torch.Tensor], None], shapes: list[torch.Size]) -> GraphedStep | None:
        """The captured step (``update`` as :func:`optimizers.compiled.reference_step` gives it, ``key`` what it
        depends on: :func:`rule_key`; ``lr`` the 0-d tensor it reads the learning rate from), or None (with a
        warning) if it cannot be captured. Capturing runs nothing: the state is unchanged either way."""
        try:
            return cls(update, key, momenta, step, lr, count_skips, shapes)
        except Exception as err:  # any op the graph cannot hold: fall back, never fail the user's step
            warnings.warn(f"the learned optimizer's step could not be captured as a CUDA graph ({summary(err)}); "
                          "stepping eagerly. Pass cuda_graph=False to skip the attempt.", RuntimeWarning, stacklevel=3)
            return None

    def usable(self, key: tuple, momenta: torch.Tensor, step: torch.Tensor) -> bool:
        return self.state[0] is momenta and self.state[1] is step and self.key == key

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """One step (the learning rate set in the captured ``lr`` tensor first): gradients and parameters in,
        replay, new parameters written back."""
        torch._foreach_copy_(self.grad_views, grads)
        torch._foreach_copy_(self.param_views, params)
        self.graph.replay()
        torch._foreach_copy_(params, self.out_views)
