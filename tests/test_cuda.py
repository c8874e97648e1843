"""The CUDA paths: learned optimizers, their state across devices, AMP, meta-training and comparisons on a GPU.

Skipped without CUDA (CI and the project's machine are CPU-only); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``. Results on the GPU must match the CPU's to float tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import optimizers as O
import unf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def randomized(rule: O.LearnedRule, seed: int = 0) -> O.LearnedRule:
    """A rule with every meta-parameter random and beta large enough that ``f`` moves the parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.f.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        rule.beta.fill_(0.05)
    return rule


def make(family: str, model: nn.Module, x: torch.Tensor) -> O.LearnedOptimizer:
    if family == "unf":
        spec = unf.derive_spec(model, x).parameters_only()
        return O.UNFOptimizer(model, x, rule=randomized(O.LearnedRule(O.UNFFamily(spec, hidden=8, layers=2))))
    f = O.PerParamMLP(hidden=8) if family == "mlp" else O.DeepSet(hidden=8)
    return O.LearnedOptimizer(model.parameters(), randomized(O.LearnedRule(f)))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("family", ["mlp", "deepset", "unf"])
def test_gpu_steps_match_cpu(family):
    x, y = data()
    cpu_model = cnn()
    gpu_model = cnn().to(CUDA)
    cpu_opt = make(family, cpu_model, x)
    gpu_opt = make(family, gpu_model, x.to(CUDA))
    train(cpu_model, cpu_opt, x, y, 5)
    train(gpu_model, gpu_opt, x.to(CUDA), y.to(CUDA), 5)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_state_dict_moves_between_devices(family):
    """Optimizer state saved on the GPU loads into a CPU optimizer (and back) and training continues the same."""
    x, y = data()
    gpu_model = cnn().to(CUDA)
    gpu_opt = make(family, gpu_model, x.to(CUDA))
    train(gpu_model, gpu_opt, x.to(CUDA), y.to(CUDA), 3)
    cpu_model = cnn()
    cpu_model.load_state_dict({k: v.cpu() for k, v in gpu_model.state_dict().items()})
    cpu_opt = make(family, cpu_model, x)
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    for state in cpu_opt.state.values():
        assert state["momenta"].device.type == "cpu" and state["momenta"].dtype == torch.float32
    train(gpu_model, gpu_opt, x.to(CUDA), y.to(CUDA), 3)
    train(cpu_model, cpu_opt, x, y, 3)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
    back = cnn().to(CUDA)
    back_opt = make(family, back, x.to(CUDA))
    back_opt.load_state_dict(cpu_opt.state_dict())
    assert all(s["momenta"].is_cuda for s in back_opt.state.values())


def test_grad_scaler_and_bf16_on_gpu():
    x, y = data()
    model = cnn().to(CUDA)
    opt = make("deepset", model, x.to(CUDA))
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    for i in range(4):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x.to(CUDA)), y.to(CUDA))
        scaler.scale(loss).backward()
        if i % 2 == 1:
            model[0].weight.grad[0, 0, 0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert changed == (i % 2 == 0)
    bf16 = cnn().to(CUDA, torch.bfloat16)
    opt = make("unf", bf16, x.to(CUDA, torch.bfloat16))
    train(bf16, opt, x.to(CUDA, torch.bfloat16), y.to(CUDA), 3)
    assert all(s["momenta"].dtype == torch.float32 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in bf16.parameters())


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_meta_training_on_gpu_matches_cpu(tmp_path, family):
    from meta_train.loop import MetaTrainConfig, meta_train

    common = dict(meta_steps=3, truncation=3, particles=2, horizon=6, family=family, hidden=8, seed=0,
                  eval_every=0)
    cpu = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "cpu"), **common), progress=False)
    gpu = meta_train(MetaTrainConfig(run_dir=str(tmp_path / "gpu"), device="cuda", **common), progress=False)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-5, msg=name)


def test_compare_on_gpu_matches_cpu():
    from meta_train.compare import compare

    kw = dict(steps=(60,), seeds=(0, 1), grids={"adam": (1e-3, 1e-2), "sgdm": (1e-2, 1e-1)}, progress=False)
    learned = {"deepset": randomized(O.LearnedRule(O.DeepSet(hidden=8)))}
    cpu = compare("mlp-digits", learned, **kw)
    gpu = compare("mlp-digits", learned, device="cuda", **kw)
    for a, b in zip(cpu.rows, gpu.rows):
        assert a["optimizer"] == b["optimizer"] and a["lr"] == b["lr"]
        assert abs(a["mean"] - b["mean"]) <= 1e-3 * max(1.0, abs(a["mean"]))


# ---------------------------------------------------------------------- CUDA graphs (optimizers.graphs)
def graphed_and_eager(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Two copies of the CNN with the same optimizer, one replaying a CUDA graph, one stepping eagerly."""
    x, y = data(seed)
    x, y = x.to(CUDA, dtype), y.to(CUDA)
    pair = []
    for graph in (True, False):
        model = cnn(seed).to(CUDA, dtype)
        pair.append((model, make(family, model, x)))
        pair[-1][1].cuda_graph = graph
    return x, y, pair


def backward_both(pair, x, y, edit=None, scale: float = 1.0) -> None:
    """Gradients computed once, on the first model, and given to both: the two optimizers then see the very same
    gradients (a second backward pass on the GPU need not be bitwise the same)."""
    (ma, oa), (mb, ob) = pair
    oa.zero_grad()
    ob.zero_grad()
    (nn.functional.cross_entropy(ma(x).float(), y) * scale).backward()
    if edit is not None:
        edit(ma)
    for p, q in zip(ma.parameters(), mb.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()


def assert_same_state(pair) -> None:
    (ma, oa), (mb, ob) = pair
    for p, q in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(p, q)
        sa, sb = oa.state[p], ob.state[q]
        assert torch.equal(sa["momenta"], sb["momenta"]) and torch.equal(sa["step"], sb["step"])
        assert torch.equal(sa["nonfinite_skipped"], sb["nonfinite_skipped"])


def poison_nan_and_inf(model: nn.Module) -> None:
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    model[2].weight.grad[1, 1] = float("inf")  # a 3x3 slice: 9 elements


def poison_nan(model: nn.Module) -> None:
    model[0].weight.grad[0, 0, 0, 0] = float("nan")


def poison_inf(model: nn.Module) -> None:
    model[0].weight.grad[0, 0, 0, 0] = float("inf")


def drop_bias_grad(model: nn.Module) -> None:
    model[-1].bias.grad = None


def graph_of(opt: O.LearnedOptimizer):
    return opt._flat[0].workspace.get("graph")


def train_both(pair, x, y, steps: int) -> None:
    for _ in range(steps):
        backward_both(pair, x, y)
        for _, opt in pair:
            opt.step()


@pytest.mark.parametrize("family", ["mlp", "deepset", "unf"])
def test_cuda_graph_replays_the_eager_step(family):
    """Bit-identical to the eager step over 8 steps with an LR schedule, NaN/Inf gradients and a step where one
    parameter has no gradient (that step runs eagerly; the graph is kept)."""
    x, y, pair = graphed_and_eager(family)
    scheds = [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3) for _, opt in pair]

    for i in range(8):
        backward_both(pair, x, y, edit={4: poison_nan_and_inf, 5: drop_bias_grad}.get(i))
        for (_, opt), sched in zip(pair, scheds):
            opt.step()
            sched.step()
        assert_same_state(pair)
    assert isinstance(graph_of(pair[0][1]), O.graphs.GraphedStep) and graph_of(pair[1][1]) is None
    assert pair[0][1].nonfinite_skipped == pair[1][1].nonfinite_skipped == 1 + 9  # one element, one 3x3 slice
    assert all(torch.isfinite(p).all() for p in pair[0][0].parameters())


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_cuda_graph_sees_rule_and_state_changes(family):
    """A rule changed in place is read by the replay; loaded optimizer state and a new rule re-capture."""
    x, y, pair = graphed_and_eager(family)
    train_both(pair, x, y, 3)
    before = graph_of(pair[0][1])
    assert before is not None
    randomized(pair[0][1].rule, seed=1)  # in place: the same tensors, new values
    pair[1][1].rule.load_state_dict(pair[0][1].rule.state_dict())
    train_both(pair, x, y, 2)
    assert graph_of(pair[0][1]) is before
    assert_same_state(pair)
    # state_dict round trip mid-training: new flat state, so a new graph; continues bit-identically
    for _, opt in pair:
        opt.load_state_dict(opt.state_dict())
    train_both(pair, x, y, 3)
    loaded = graph_of(pair[0][1])
    assert loaded not in (None, before)
    assert_same_state(pair)
    # a new rule (new tensors): warm up and re-capture, same results
    for _, opt in pair:
        opt.rule = randomized(copy.deepcopy(opt.rule), seed=2)
    train_both(pair, x, y, 3)
    assert graph_of(pair[0][1]) not in (None, loaded)
    assert_same_state(pair)


def test_cuda_graph_with_bf16_parameters():
    """bf16 parameters (fp32 state), with an injected inf: the graph replays the eager step."""
    x, y, pair = graphed_and_eager("unf", torch.bfloat16)

    for i in range(5):
        backward_both(pair, x, y, edit=poison_inf if i == 3 else None)
        for _, opt in pair:
            opt.step()
        assert_same_state(pair)
    assert graph_of(pair[0][1]) is not None
    assert all(s["momenta"].dtype == torch.float32 for s in pair[0][1].state.values())


def test_cuda_graph_under_grad_scaler():
    """GradScaler (bf16 autocast, fp32 parameters) skipping a step with an inf: the graph replays the eager step."""
    x, y, pair = graphed_and_eager("deepset")
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**8) for _ in pair]
    for scaler in scalers:
        scaler.scale(torch.ones((), device=CUDA))  # (the scale tensor is made lazily, by the first scale())

    for i in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            backward_both(pair, x, y, edit=poison_inf if i == 3 else None, scale=scalers[0].get_scale())
        for (_, opt), scaler in zip(pair, scalers):
            scaler.step(opt)
            scaler.update()
        assert_same_state(pair)
    assert graph_of(pair[0][1]) is not None
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**8


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_compiled_graph_matches_the_eager_step(family):
    """``compile=True`` (Triton kernels from torch.compile, replayed as a CUDA graph) steps as the eager path does,
    to float rounding, through an LR schedule, NaN/Inf gradients and a step with a missing gradient."""
    x, y, pair = graphed_and_eager(family)
    pair[0][1].compile = True
    scheds = [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3) for _, opt in pair]

    (mc, oc), (me, oe) = pair
    for i in range(8):
        backward_both(pair, x, y, edit={4: poison_nan, 5: drop_bias_grad}.get(i))
        for (_, opt), sched in zip(pair, scheds):
            opt.step()
            sched.step()
        for p, q in zip(mc.parameters(), me.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(oc.state[p]["momenta"], oe.state[q]["momenta"], rtol=1e-4, atol=1e-5)
        for p, q in zip(mc.parameters(), me.parameters()):  # the next gradients are the compiled model's
            q.data.copy_(p.data)
    assert isinstance(graph_of(oc), O.graphs.GraphedStep) and oc.nonfinite_skipped == oe.nonfinite_skipped == 1


# ---------------------------------------------------------------------- fused Triton layers (optimizers.fused)
def test_fused_checks_on_gpu():
    """``tests/fused_checks.py`` (run on a CPU under Triton's interpreter by test_fused.py), compiled on the GPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "fused_checks.py"
    module_spec = importlib.util.spec_from_file_location("fused_checks", path)
    checks = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(checks)
    checks.run_all("cuda")


def fused_optimizers(family: str, settings: list[dict], seed: int = 0):
    """Copies of the CNN, each with the optimizer (hidden width 32: the fused kernels apply) under ``settings``."""
    x, y = data(seed)
    x, y = x.to(CUDA), y.to(CUDA)
    out = []
    for kw in settings:
        model = cnn(seed).to(CUDA)
        if family == "unf":
            spec = unf.derive_spec(model, x).parameters_only()
            rule = randomized(O.LearnedRule(O.UNFFamily(spec, hidden=32)))
            opt = O.UNFOptimizer(model, x, rule=rule, **kw)
        else:
            f = O.PerParamMLP(hidden=32) if family == "mlp" else O.DeepSet(hidden=32)
            opt = O.LearnedOptimizer(model.parameters(), randomized(O.LearnedRule(f)), **kw)
        out.append((model, opt))
    return x, y, out


@pytest.mark.parametrize("family", ["mlp", "deepset", "unf"])
def test_fused_step_is_the_default_and_replays_bit_identically(family):
    """The fused layers are used by default on a GPU; the graph replays the fused eager step bit for bit (LR
    schedule, NaN/Inf gradients, a missing gradient), and both equal the unfused step to float rounding."""
    x, y, runs = fused_optimizers(family, [{}, {"cuda_graph": False}, {"fused": False}])
    scheds = [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3) for _, opt in runs]
    for i in range(8):
        backward_both(runs[:2], x, y, edit={4: poison_nan_and_inf, 5: drop_bias_grad}.get(i))
        for p, q in zip(runs[0][0].parameters(), runs[2][0].parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        for (_, opt), sched in zip(runs, scheds):
            opt.step()
            sched.step()
        assert_same_state(runs[:2])
        for p, q in zip(runs[0][0].parameters(), runs[2][0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert runs[0][1]._flat[0].workspace["fused"] and runs[1][1]._flat[0].workspace["fused"]
    assert not runs[2][1]._flat[0].workspace["fused"]
    assert isinstance(graph_of(runs[0][1]), O.graphs.GraphedStep)


@pytest.mark.parametrize("family,combo", [("deepset", False), ("unf", False), ("unf", True)])
def test_fused_and_compiled_step_matches_the_unfused_step(family, combo):
    """``compile=True`` with the fused layers (user Triton kernels inside the compiled step) steps as the unfused
    eager step does, to float rounding. ``combo``: also with Inductor's ``combo_kernels``, a lead for the CNN speed
    goal and not a default (BENCHMARKS.md: it launches the read-out's many small reductions together; the compiled
    UNF step measured 1.07x Adam's with it in one run)."""
    from torch._inductor import config

    with config.patch(combo_kernels=combo):
        x, y, runs = fused_optimizers(family, [{"compile": True}, {"fused": False, "cuda_graph": False}])
        for i in range(6):
            backward_both(runs, x, y, edit={3: poison_nan}.get(i))
            for _, opt in runs:
                opt.step()
            for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert runs[0][1]._flat[0].workspace["fused"]
