"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` over the pure rule in :mod:`optimizers.rule`.

Drop-in for ``torch.optim`` code: ``step(closure=None)`` returns the closure's loss, parameters whose ``grad`` is
None are skipped, ``zero_grad``, ``add_param_group``, step hooks, LR schedulers and ``GradScaler`` all work, and
``state_dict()`` / ``load_state_dict()`` round-trip exactly (optimizer state is fp32 whatever the parameter dtype).

Speed: each param group keeps its state in one flat fp32 buffer; a step concatenates parameters and gradients
once, runs the rule as whole-buffer kernels (no per-tensor loops with host syncs), and writes back with one
``torch._foreach_copy_``. Per-parameter ``state[p]`` entries are views into the flat buffers. Three kernels
compute the same rule (to rounding), chosen once per group: on a CPU, :mod:`optimizers.small` for models below
:data:`optimizers.fast.CHUNK` elements (few, precompiled ops: small models are bound by op count) and
:mod:`optimizers.fast` above (cache-sized chunks); elsewhere (GPUs, custom families) :meth:`LearnedRule.update`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .compiled import StepFn, reference_step
from .fast import fast_update, supports_fast_path
from .features import Segments
from .fused import HAS_TRITON, fused_forward
from .fused import available as fused_available
from .graphs import GraphedStep, rule_key, wants_graph
from .rule import N_MOMENTA, LearnedRule, RuleState
from .small import small_update, supports_small_path

__all__ = ["LearnedOptimizer"]


def _flat32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype == torch.float32 else t.float()


def counts_by_running_sum(mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Number of True elements of ``mask`` (N,) in each of the consecutive runs ending at ``ends`` (cumulative
    sizes; empty runs allowed): a running sum differenced at the run ends (no atomics)."""
    running = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.cumsum(0)])
    at_ends = running[ends]
    return torch.diff(at_ends, prepend=running[:1])


class _Flat:
    """One param group's flat state: params, their segments, momenta (7, N), step, skipped counts per tensor."""

    def __init__(self, params: list[torch.Tensor], segments: Segments, momenta: torch.Tensor, step: torch.Tensor,
                 skipped: torch.Tensor):
        self.params = params
        self.numels = [p.numel() for p in params]
        self.segments = segments
        self.momenta = momenta
        self.step = step
        self.skipped = skipped
        self.tensor_ids = Segments.from_sizes(self.numels, momenta.device).ids
        self.tensor_ends = torch.tensor(self.numels, device=momenta.device).cumsum(0)
        self.workspace: dict = {}  # reusable activation buffers of the fast path
        self._lr: torch.Tensor | None = None

    def lr_tensor(self, lr: float | torch.Tensor) -> torch.Tensor:
        """The group's learning rate as a 0-d fp32 tensor on the state's device (one, updated in place)."""
        if self._lr is None:
            self._lr = torch.ones((), device=self.momenta.device)
        if isinstance(lr, torch.Tensor):
            self._lr.copy_(lr)
        else:
            self._lr.fill_(lr)
        return self._lr

    def count_skips(self, skipped: torch.Tensor) -> None:
        """Add each tensor's number of skipped elements (``skipped`` (N,) bool) to its count.

        On a GPU as differences of a running sum at the tensors' ends: an ``index_add`` onto a few counters from a
        million elements serialises on atomics (0.7 ms for a 1M-parameter CNN on an H200)."""
        if skipped.is_cuda:
            self.skipped.add_(counts_by_running_sum(skipped, self.tensor_ends))
        else:
            self.skipped.index_add_(0, self.tensor_ids, skipped.to(torch.int64))


class LearnedOptimizer(Optimizer):
    """A learned optimizer (see :mod:`optimizers.rule` for the update).

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        rule: the meta-parameters (``f`` and the scalars); a fresh :class:`LearnedRule` is fine to start from.
        lr: multiplier on the learned step size ``alpha`` (schedulers change it).
        segments_for: optional ``params -> list of segment sizes`` hook; by default each parameter tensor is one
            segment (the unit DeepSet layers pool over).
        cuda_graph: on a GPU, record the step once as a CUDA graph and replay it (the same results, without the
            launch cost of hundreds of small kernels; see :mod:`optimizers.graphs` for when it applies and its memory).
            ``None`` (default): for groups of up to :data:`optimizers.graphs.AUTO_MAX_ELEMENTS` (4.2M) elements;
            a graph keeps the step's intermediates allocated between steps (an estimated ~1.2 GB per million
            parameters for the UNF rule), which for larger models costs more than the launches it saves.
        compile: run the whole-buffer step through ``torch.compile`` (fused kernels: the fastest choice on a GPU,
            after a one-time compilation; see :mod:`optimizers.compiled`).
        fused: on a GPU, run ``f``'s per-element layers as fused Triton kernels (:mod:`optimizers.fused`; the same
            results to float rounding). ``None`` (default): where Triton and a CUDA device are present and ``f``
            is a family they cover; ``False``: never; ``True``: as ``None``, with a warning where it cannot apply.
    """

    def __init__(self, params: Iterable[Any], rule: LearnedRule, lr: float = 1.0,
                 segments_for: Callable[[list[torch.Tensor]], Segments] | None = None, cuda_graph: bool | None = None,
                 compile: bool = False, fused: bool | None = None):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not isinstance(rule, LearnedRule):
            raise TypeError(f"rule must be an optimizers.LearnedRule, got {type(rule).__name__}")
        super().__init__(params, dict(lr=lr))
        self.rule = rule
        self._segments_for = segments_for
        self.cuda_graph = cuda_graph
        self.compile = bool(compile)
        self.fused = fused
        self._flat: dict[int, _Flat] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError("LearnedOptimizer does not support sparse parameters")

    # ------------------------------------------------------------------ state layout
    def _segments(self, params: list[torch.Tensor], device: torch.device) -> Segments:
        if self._segments_for is not None:
            return self._segments_for(params).to(device)
        return Segments.from_sizes([p.numel() for p in params], device)

    def _flat_for(self, index: int, group: dict) -> _Flat:
        flat = self._flat.get(index)
        params = group["params"]
        if flat is not None and len(flat.params) == len(params):
            return flat
        device = params[0].device
        existing = [self.state.get(p, {}) for p in params]
        if all("momenta" in s for s in existing):  # after load_state_dict: adopt the loaded state
            momenta = torch.cat([s["momenta"].reshape(N_MOMENTA, -1).to(device, torch.float32) for s in existing], 1)
            step = existing[0]["step"].detach().to(device, torch.float32).clone()
            skipped = torch.stack([s.get("nonfinite_skipped", torch.zeros((), dtype=torch.int64)).to(device)
                                   for s in existing]).to(torch.int64)
        else:
            n = sum(p.numel() for p in params)
            momenta = torch.zeros(N_MOMENTA, n, device=device)
            step = torch.zeros((), device=device)
            skipped = torch.zeros(len(params), dtype=torch.int64, device=device)
        flat = _Flat(list(params), self._segments(list(params), device), momenta, step, skipped)
        offset = 0
        for i, p in enumerate(params):  # per-parameter state: views into the flat buffers
            n = p.numel()
            self.state[p] = {"momenta": momenta[:, offset : offset + n].view(N_MOMENTA, *p.shape), "step": step,
                             "nonfinite_skipped": skipped[i]}
            offset += n
        self._flat[index] = flat
        return flat

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if not params or all(p.grad is None for p in params):
                continue
            flat = self._flat_for(index, group)
            path = flat.workspace.get("path")
            if path is None or path[0] is not self.rule.f or path[2] != self.compile:  # once per group and rule
                device = flat.momenta.device
                if next(self.rule.parameters()).device != device:
                    self.rule.to(device)
                n = flat.momenta.shape[1]
                kind = ("reference" if self.compile else "small" if supports_small_path(self.rule, n, device) else
                        "chunked" if supports_fast_path(self.rule, n, device) else "reference")
                path = flat.workspace["path"] = (self.rule.f, kind, self.compile)
            missing = False
            for p in params:
                if p.grad is None:
                    missing = True
                elif p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
            reference = self._reference_fn(flat) if path[1] == "reference" and not missing else None
            if reference is not None and flat.momenta.is_cuda and wants_graph(self.cuda_graph, flat.momenta.shape[1]):
                if self._graphed_step(flat, params, group["lr"], *reference):
                    continue
            # (no-op casts and detaches cost a dispatch each: skipped; the step runs under no_grad)
            grad = torch.cat([_flat32(p.grad if p.grad is not None else torch.zeros_like(p)) for p in params])
            active = None
            if missing:
                active = torch.cat([torch.full((p.numel(),), p.grad is not None, device=grad.device)
                                    for p in params])
            param = torch.cat([_flat32(p) for p in params])
            state = RuleState(flat.momenta, flat.step)
            if path[1] == "small":
                new_param, new, skipped = small_update(self.rule, param, grad, state, flat.segments, lr=group["lr"],
                                                       active=active, workspace=flat.workspace)
            elif path[1] == "chunked":
                new_param, new, skipped = fast_update(self.rule, param, grad, state, flat.segments, lr=group["lr"],
                                                      active=active, workspace=flat.workspace)
            elif reference is not None:
                lr = flat.lr_tensor(group["lr"]) if self.compile else group["lr"]  # (compiled: no recompile per lr)
                new_param, momenta, step, skipped = reference[0](param, grad, lr)
                new = RuleState(momenta, step)
            else:
                new_param, new, skipped = self.rule.update(param, grad, state, flat.segments, lr=group["lr"],
                                                           active=active)
            if new.momenta is not flat.momenta:  # the fast path updates in place
                flat.momenta.copy_(new.momenta)
            if new.step is not flat.step:
                flat.step.copy_(new.step)
            if skipped is not None:  # (None: nothing skipped)
                flat.count_skips(skipped)
            reused = new_param is flat.workspace.get("small_out")  # a buffer the small path reuses: views made once
            views = flat.workspace.get("small_out_views") if reused else None
            if views is None or views[0] is not new_param:
                views = (new_param, [v.view_as(p) for v, p in zip(new_param.split(flat.numels), params)])
                if reused:
                    flat.workspace["small_out_views"] = views
            torch._foreach_copy_(params, views[1])
        return loss

    def _reference_fn(self, flat: _Flat) -> tuple[StepFn, tuple]:
        """The group's whole-buffer step (compiled if ``compile``) and what it depends on; made once per rule."""
        key = (rule_key(self.rule), self.compile, self.fused)
        hit = flat.workspace.get("reference")
        if hit is None or hit[1] != key:
            factored = None
            if self.fused is not False:
                factored = fused_forward(self.rule.f) if fused_available(flat.momenta.device) else None
                if factored is None and self.fused:
                    warnings.warn(f"fused=True: the fused kernels do not apply here (device "
                                  f"{flat.momenta.device}, Triton {'present' if HAS_TRITON else 'missing'}"
                                  f", f a {type(self.rule.f).__name__}); stepping unfused", RuntimeWarning,
                                  stacklevel=3)
            fn = reference_step(self.rule, flat.momenta, flat.step, flat.segments, compile=self.compile,
                                factored=factored)
            flat.workspace["fused"] = factored is not None
            hit = flat.workspace["reference"] = (fn, key)
        return hit

    def _graphed_step(self, flat: _Flat, params: list[torch.Tensor], lr: float | torch.Tensor, update: StepFn,
                      key: tuple) -> bool:
        """The step as a CUDA graph replay of ``update`` (:mod:`optimizers.graphs`); False: step eagerly this time.

        The first step after (re)building runs eagerly: it fills the caches the rule builds lazily (device
        copies of index maps and constants, which a capture cannot make), compiles if asked to, and warms the CUDA
        libraries up. The next step captures, then every step replays."""
        ws = flat.workspace
        graphed = ws.get("graph")
        if graphed is not None and not graphed.usable(key, flat.momenta, flat.step):
            graphed = ws["graph"] = None  # the rule moved or was replaced: warm up again, then re-capture
            ws["graph_warm"] = False
        if graphed is None:
            if ws.get("graph_failed") or not ws.get("graph_warm"):
                ws["graph_warm"] = True
                return False
            graphed = GraphedStep.capture(update, key, flat.momenta, flat.step, flat.lr_tensor(lr),
                                          flat.count_skips, [p.shape for p in params])
            if graphed is None:
                ws["graph_failed"] = True
                return False
            ws["graph"] = graphed
        flat.lr_tensor(lr)
        graphed(params, [p.grad for p in params])
        return True

    # ------------------------------------------------------------------ param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # groups are indexed by position; a new group gets fresh flat buffers on its first step

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["rule"] = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rule_state = state_dict.pop("rule", None)
        super().load_state_dict(state_dict)
        # torch.optim casts state to each parameter's dtype; our state is fp32 whatever the parameter dtype
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            saved = state_dict["state"].get(pid)
            if saved is not None and "momenta" in saved:
                # copies: the saved tensors may be another optimizer's live state, which it updates in place
                self.state[p]["momenta"] = saved["momenta"].to(device=p.device, dtype=torch.float32, copy=True)
                self.state[p]["step"] = saved["step"].to(device=p.device, dtype=torch.float32, copy=True)
                if "nonfinite_skipped" in saved:
                    self.state[p]["nonfinite_skipped"] = saved["nonfinite_skipped"].to(p.device, copy=True)
        if rule_state is not None:
            self.rule.load_state_dict(rule_state)
        self._flat = {}

    @property
    def nonfinite_skipped(self) -> int:
        """Total number of element updates skipped because of NaN/Inf gradients (a host sync; for logging)."""
        return int(sum(int(f.skipped.sum()) for f in self._flat.values()))

    def meta_parameters(self) -> Iterable[nn.Parameter]:
        return self.rule.parameters()
