"""Learned optimizers: the torch.optim contract, SGD equivalence, safety, and the functional rule."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
from torch import nn

import optimizers as O
from optimizers.features import Segments, compute_features

FAMILIES = {"mlp": lambda: O.PerParamMLP(hidden=16), "deepset": lambda: O.DeepSet(hidden=16)}


def small_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


def batch(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def active_rule(family: str, seed: int = 0, **kw) -> O.LearnedRule:
    """A rule whose learned term is non-zero (random f weights), to exercise the whole path."""
    torch.manual_seed(seed)
    rule = O.LearnedRule(FAMILIES[family](), **kw)
    for p in rule.f.parameters():
        nn.init.normal_(p, std=0.5)
    return rule


def train(model, opt, steps, seed=0, closure=False):
    x, y = batch(seed, next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        def step_closure():
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss

        if closure:
            losses.append(float(opt.step(step_closure).detach()))
        else:
            losses.append(float(step_closure().detach()))
            opt.step()
    return losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_beta_zero_reproduces_sgd_momentum(family):
    a, b = small_model(), small_model()
    opt = O.LearnedOptimizer(a.parameters(), active_rule(family, beta=0.0, alpha=0.1, gamma0=0.9))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train(a, opt, 100)
    train(b, sgd, 100)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        assert torch.equal(p, q)  # in fact bit for bit (same fused multiply-add)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_step_with_closure_returns_loss_and_trains(family):
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule(family))
    losses = train(model, opt, 30, closure=True)
    assert losses[-1] < losses[0]


def test_parameter_without_grad_is_skipped():
    model = small_model()
    frozen = model[2].weight
    opt = O.LearnedOptimizer(model.parameters(), active_rule("deepset"))
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        frozen.grad = None
        before = frozen.detach().clone()
        opt.step()
        assert torch.equal(frozen, before)
    assert torch.count_nonzero(opt.state[frozen]["momenta"]) == 0
    assert torch.count_nonzero(opt.state[model[0].weight]["momenta"]) > 0
    # nothing has a gradient: step is a no-op
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_add_param_group(family):
    model = small_model()
    opt = O.LearnedOptimizer(model[0].parameters(), active_rule(family))
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5
    before = model[2].weight.detach().clone()
    train(model, opt, 2)
    assert not torch.equal(model[2].weight, before)
    assert opt.state[model[2].weight]["momenta"].shape == (7, 3, 12)


def test_state_dict_round_trip_continues_bit_identically():
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule("deepset"))
    train(model, opt, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 5)

    clone = small_model(seed=123)
    clone.load_state_dict(saved_model)
    opt2 = O.LearnedOptimizer(clone.parameters(), O.LearnedRule(O.DeepSet(hidden=16)))  # rule comes from the dict
    opt2.load_state_dict(saved_opt)
    train(clone, opt2, 5)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(opt.state[p]["momenta"], opt2.state[q]["momenta"])


def test_loaded_state_does_not_alias_the_source_optimizer():
    """Loading another optimizer's live ``state_dict()`` (no deepcopy) and training both gives the same result as
    training each alone: the loaded state is a copy, not a view of the source's buffers."""
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule("deepset"))
    train(model, opt, 3)
    clone = small_model(seed=123)
    clone.load_state_dict(model.state_dict())
    opt2 = O.LearnedOptimizer(clone.parameters(), O.LearnedRule(O.DeepSet(hidden=16)))
    opt2.load_state_dict(opt.state_dict())
    train(model, opt, 2)  # the source moves on first, updating its state in place
    train(clone, opt2, 2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_state_dict_keeps_fp32_state_across_dtype_casts():
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule("mlp"))
    train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    half = small_model(dtype=torch.bfloat16)
    opt_half = O.LearnedOptimizer(half.parameters(), O.LearnedRule(O.PerParamMLP(hidden=16)))
    opt_half.load_state_dict(sd)
    for p, q in zip(model.parameters(), half.parameters()):
        assert opt_half.state[q]["momenta"].dtype == torch.float32  # torch.optim would have cast to bf16
        assert torch.equal(opt_half.state[q]["momenta"], opt.state[p]["momenta"])
    train(half, opt_half, 3)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in half.parameters())


def test_step_hooks_fire():
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule("mlp"))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    train(model, opt, 2)
    assert calls == ["pre", "post", "pre", "post"]


def test_lr_scheduler_scales_the_step():
    a, b = small_model(), small_model()
    opt = O.LearnedOptimizer(a.parameters(), active_rule("mlp", beta=0.0, alpha=0.1))
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    # lr multiplies alpha: lr=1.0 here is SGD's 0.1; both schedules halve every 3 steps
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(sgd, step_size=3, gamma=0.5)
    for _ in range(10):
        train(a, opt, 1)
        train(b, sgd, 1)
        s1.step()
        s2.step()
    assert opt.param_groups[0]["lr"] == 1.0 * 0.5 ** 3
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_grad_scaler_skips_steps_with_infs():
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule("deepset"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch()
    for i in range(6):
        opt.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        if i % 2 == 1:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert changed == (i % 2 == 0)
        if i % 2 == 1:
            assert scaler.get_scale() < scale
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nan_inf_gradients_never_reach_parameters(family):
    model = small_model()
    opt = O.LearnedOptimizer(model.parameters(), active_rule(family))
    gen = torch.Generator().manual_seed(0)
    x, y = batch()
    for _ in range(1000):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        for p in model.parameters():
            bad = torch.rand(p.shape, generator=gen) < 0.05
            values = torch.tensor([float("nan"), float("inf"), -float("inf")])[
                torch.randint(0, 3, p.shape, generator=gen)]
            p.grad = torch.where(bad, values, p.grad)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(s["momenta"]).all() for s in opt.state.values())
    skipped = opt.nonfinite_skipped
    total = sum(p.numel() for p in model.parameters()) * 1000
    assert 0.03 * total < skipped < 0.07 * total


def test_learned_term_is_bounded():
    model = small_model()
    rule = active_rule("mlp", beta=1.0, alpha=0.1)
    for p in rule.f.parameters():
        nn.init.constant_(p, 1e6)  # a wildly bad f
    opt = O.LearnedOptimizer(model.parameters(), rule)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    grads = [p.grad for p in model.parameters()]
    for p, q, g in zip(model.parameters(), before, grads):
        step = (p - q).abs()
        assert (step <= 0.1 * (g.abs() + rule.bound) + 1e-6).all()


def test_features_are_scale_invariant_and_shaped():
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    m = torch.randn(6, 10, generator=gen)
    seg = Segments.from_sizes([4, 6])
    f1 = compute_features(p, g, m, torch.tensor(5.0), seg)
    f2 = compute_features(p * 1000, g * 1e-3, m * 7, torch.tensor(5.0), seg)
    assert f1.shape == (10, O.N_FEATURES) == (10, 19)
    torch.testing.assert_close(f1, f2)
    # each tensor channel has unit RMS over each segment
    torch.testing.assert_close((f1[:4, :8] ** 2).mean(0), torch.ones(8))


def test_deepset_is_equivariant_within_segments():
    torch.manual_seed(0)
    f = O.DeepSet(hidden=8)
    for p in f.parameters():
        nn.init.normal_(p)
    seg = Segments.from_sizes([5, 7])
    x = torch.randn(12, O.N_FEATURES)
    perm = torch.cat([torch.randperm(5), 5 + torch.randperm(7)])
    torch.testing.assert_close(f(x[perm], seg), f(x, seg)[perm])
    # ... but not across segments (pooling is per tensor): swapping one element between segments matters
    swap = torch.arange(12)
    swap[0], swap[5] = 5, 0
    assert not torch.allclose(f(x[swap], seg), f(x, seg)[swap])


def test_functional_rule_is_differentiable_through_an_unroll():
    """Meta-gradients flow through rule.update (what meta-training relies on)."""
    rule = active_rule("deepset")
    torch.manual_seed(0)
    w = torch.randn(8)
    seg = Segments.from_sizes([8])
    state = O.init(8)
    target = torch.randn(8)
    for _ in range(3):
        w_ = w.detach().requires_grad_(True) if not w.requires_grad else w
        loss = ((w_ - target) ** 2).sum()
        (g,) = torch.autograd.grad(loss, w_, create_graph=True)
        w, state, _ = rule.update(w_, g, state, seg)
    final = ((w - target) ** 2).sum()
    grads = torch.autograd.grad(final, list(rule.parameters()), allow_unused=True)
    assert grads[0] is not None or any(g is not None and g.abs().sum() > 0 for g in grads)
    assert rule.raw_alpha in dict(rule.named_parameters()).values()


def test_constructor_errors():
    with pytest.raises(TypeError, match="LearnedRule"):
        O.LearnedOptimizer(small_model().parameters(), rule=O.DeepSet())
    with pytest.raises(ValueError, match="invalid learning rate"):
        O.LearnedOptimizer(small_model().parameters(), O.LearnedRule(O.DeepSet()), lr=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sizes", [[5], [3, 7, 1, 20000], [16384, 16385]])
@pytest.mark.parametrize("scale_floor", [None, 0.5])
def test_fast_path_equals_reference(family, sizes, scale_floor):
    from optimizers.fast import fast_update

    rule = active_rule(family, beta=0.3)
    rule.scale_floor = scale_floor
    gen = torch.Generator().manual_seed(1)
    n = sum(sizes)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    param[: n // 2] *= 0.1  # some segments below the floor, some above (when there are several)
    grad[::97] = float("nan")
    state = O.RuleState(torch.randn(7, n, generator=gen), torch.tensor(12.0))
    seg = Segments.from_sizes(sizes)
    active = torch.rand(n, generator=gen) > 0.1
    with torch.no_grad():
        ref = rule.update(param, grad, state, seg, lr=0.7, active=active)
        fast = fast_update(rule, param, grad, state, seg, lr=0.7, active=active)
    # summation order differs (per-run sums vs scatter), amplified by the random f: rounding-level only
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1].momenta, ref[1].momenta)
    assert torch.equal(fast[2], ref[2]) and float(fast[1].step) == 13.0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_and_load_rule_round_trip(tmp_path, family):
    rule = active_rule(family, beta=0.02, alpha=0.05)
    path = tmp_path / "w" / "rule.safetensors"
    O.save_rule(rule, path, task="test")
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file
    again = O.load_rule(path)
    assert type(again.f) is type(rule.f) and again.f.config == rule.f.config
    for (k, a), (_, b) in zip(rule.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    model = small_model()
    opt = O.load(str(path), model)
    assert isinstance(opt, O.LearnedOptimizer)
    train(model, opt, 2)


def test_saving_a_rule_twice_writes_the_same_bytes(tmp_path):
    """The safetensors writer orders metadata keys at random (six orders of three keys within one process), so
    equal rules wrote different files; ``save_rule`` sorts them, so a fit's re-run can be checked with ``cmp``."""
    rule = active_rule("deepset", beta=0.02, alpha=0.05)
    files = []
    for i in range(8):
        O.save_rule(rule, tmp_path / f"{i}.safetensors", task="test", seed=0)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(files)) == 1
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    again = O.load_rule(tmp_path / "0.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(rule.state_dict().values(), again.state_dict().values()))


def test_shipped_weights_files_are_in_the_canonical_layout():
    """Every shipped file is byte for byte what ``save_rule`` writes for its contents (so re-running its config
    reproduces the file exactly, not only its tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from optimizers.registry import WEIGHTS_DIR, canonical_safetensors

    for name in O.available():
        path = WEIGHTS_DIR / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        assert path.read_bytes() == canonical_safetensors(load_file(str(path)), metadata), name


def test_relative_steps_round_trip_and_scale(tmp_path):
    """``scale_floor`` is saved with the weights, and it multiplies the learned term by each tensor's
    ``max(std, floor)`` (so a model at 10x the scale moves 10x as far, and a constant tensor by the floor)."""
    rule = active_rule("deepset", beta=0.3)
    rule.scale_floor = 0.01
    path = tmp_path / "rule.safetensors"
    O.save_rule(rule, path, task="test")
    assert O.load_rule(path).scale_floor == 0.01
    assert O.load_rule(path).with_f(O.DeepSet()).scale_floor == 0.01
    with pytest.raises(ValueError, match="scale_floor must be positive"):
        O.LearnedRule(O.DeepSet(), scale_floor=0.0)
    seg = Segments.from_sizes([50, 30])
    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(80, generator=gen), torch.randn(80, generator=gen)
    param[50:] = 2.0  # std 0: the floor
    with torch.no_grad():
        rule.raw_gamma0.fill_(0.0)
        steps = []
        for scale in (1.0, 10.0):
            state = O.rule.init(80)
            # the base term alpha * grad scales with the gradient; the learned term with the parameters
            new, _, _ = rule.update(param * scale, grad, state, seg)
            steps.append(new - param * scale + rule.alpha * grad)
    torch.testing.assert_close(steps[1][:50], 10 * steps[0][:50], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(steps[1][50:], steps[0][50:], rtol=1e-4, atol=5e-6)  # (rounding of 20 + step)
    std = param[:50].std(unbiased=False)
    assert steps[0][:50].abs().max() <= rule.alpha * rule.beta * rule.bound * std * (1 + 1e-5)
    assert steps[0][50:].abs().max() <= rule.alpha * rule.beta * rule.bound * 0.01 * (1 + 1e-5)


def test_registry_errors(tmp_path):
    with pytest.raises(KeyError, match="no shipped optimizer weights named 'nope'"):
        O.load("nope", small_model())
    with pytest.raises(FileNotFoundError):
        O.load_rule(tmp_path / "missing.safetensors")
    with pytest.raises(KeyError, match="unknown family"):
        O.make_rule("transformer")
    assert isinstance(O.available(), list)


def test_higher_integration_matches_the_optimizer_and_gives_meta_gradients():
    import higher  # the optional extra is part of [dev]

    import optimizers.integrations.higher  # noqa: F401  (registers the differentiable optimizer)

    model, reference = small_model(), small_model()
    rule = active_rule("deepset", beta=0.05)
    opt = O.LearnedOptimizer(model.parameters(), rule)
    ref_opt = O.LearnedOptimizer(reference.parameters(), copy.deepcopy(rule))
    x, y = batch()
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(loss_fn(fmodel, x, y))
        meta_loss = loss_fn(fmodel, x, y)
        final = [p.detach().clone() for p in fmodel.parameters()]
    train(reference, ref_opt, 3)
    for p, q in zip(final, reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(meta_loss, [rule.raw_alpha, rule.beta])
    assert all(torch.isfinite(g) and g != 0 for g in grads)


def test_step_size_never_gets_stuck_at_zero():
    # a meta-gradient step that pushes raw_alpha below 0 must leave a nonzero gradient to come back with
    rule = O.LearnedRule(O.DeepSet(hidden=4, layers=1), alpha=-0.05)
    assert float(rule.alpha.detach()) == pytest.approx(0.05)
    n = 6
    w, g = torch.randn(n), torch.randn(n)
    new, _, _ = rule.update(w, g, O.init(n), Segments.from_sizes([n]))
    (grad,) = torch.autograd.grad(new.sum(), [rule.raw_alpha])
    assert float(grad.abs()) > 0


def test_shipped_weights_load_and_train():
    names = O.available()
    assert {"perparam-mnist1d", "deepset-mnist1d", "unf-mnist1d", "unf-mnist1d-imitation", "unf-mnist1d-snr",
            "unf-mnist1d-rel", "unf-transformer-shakespeare"} <= set(names)
    torch.manual_seed(0)
    for name in names:
        model = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        x, y = torch.randn(64, 7), torch.randint(0, 3, (64,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # UNF weights on another spec warn about their coverage
            opt = O.load(name, model, example_inputs=x)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        # weights meta-trained on an MLP task train this MLP well; the LM weights (smaller steps) still train it
        assert losses[-1] < (0.8 if "mnist1d" in name else 0.95) * losses[0], (name, losses[0], losses[-1])
        info = O.registry.weights_info(name)
        assert info["config"]["family"] in ("mlp", "deepset", "unf") and "task" in info["info"]


def test_every_shipped_weights_file_has_a_valid_config():
    from meta_train.loop import load_config

    for name in O.available():
        cfg = load_config(O.registry.WEIGHTS_DIR / "configs" / f"{name}.toml")  # validated: errors name the field
        assert cfg.run_dir == f"runs/{name}", name
        rule = O.load_rule(O.registry.WEIGHTS_DIR / f"{name}.safetensors")
        assert rule.scale_floor == (cfg.scale_floor or None), name
        trained_on = f"family:{cfg.task_family}" if cfg.task_family else cfg.task
        assert O.registry.weights_info(name)["info"]["task"] == trained_on, name
    configs = {p.stem for p in (O.registry.WEIGHTS_DIR / "configs").glob("*.toml")}
    assert configs == set(O.available())


def compiled_and_eager(make_opt, steps: int = 6):
    """Train two copies, one optimizer with ``compile=True``; return both models and optimizers."""
    x, y = batch()
    runs = []
    for compile_ in (True, False):
        model = small_model()
        opt = make_opt(model, compile_)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for i in range(steps):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            if i == 3:
                model[0].weight.grad[0, 0] = float("nan")
            if i == 4:
                model[2].bias.grad = None  # a step with a missing gradient runs eagerly
            opt.step()
            sched.step()
        runs.append((model, opt))
    return runs


def assert_compiled_matches(runs) -> None:
    (mc, oc), (me, oe) = runs
    for p, q in zip(mc.parameters(), me.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # generated kernels may sum in another order
        torch.testing.assert_close(oc.state[p]["momenta"], oe.state[q]["momenta"], rtol=1e-5, atol=1e-6)
    assert oc.nonfinite_skipped == oe.nonfinite_skipped == 1
    assert oc._flat[0].workspace["path"][1] == "reference"  # compile=True takes the whole-buffer step


needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="torch.compile's CPU backend needs a C++ compiler")


@needs_compiler
def test_compiled_step_equals_the_eager_step():
    """``compile=True`` (torch.compile of the whole-buffer step; C++ kernels on a CPU) steps as the default path
    does, through an LR schedule, a NaN gradient and a step with a missing gradient; a changed lr is no recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = compiled_and_eager(lambda m, c: O.LearnedOptimizer(m.parameters(), active_rule("deepset", beta=0.3),
                                                              compile=c))
    assert_compiled_matches(runs)
    fn = runs[0][1]._flat[0].workspace["reference"][0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "lr changes must not recompile"
    assert callable(fn)


@needs_compiler
@pytest.mark.parametrize("scale_floor", [None, 0.05])
def test_compiled_unf_step_equals_the_eager_step(scale_floor):
    def make(model, compile_):
        x, _ = batch()
        opt = O.UNFOptimizer(model, x, hidden=8, layers=2, compile=compile_)
        for p in opt.rule.f.parameters():
            nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(p.numel()))
        opt.rule.beta.data.fill_(0.3)
        opt.rule.scale_floor = scale_floor  # relative steps, as unf-mnist1d-rel (the path a GPU compiles)
        return opt

    assert_compiled_matches(compiled_and_eager(make))


def test_skip_counts_by_running_sum_match_index_add():
    """The GPU's atomics-free per-tensor count of skipped elements equals the CPU's ``index_add``, empty tensors
    included."""
    from optimizers.optimizer import counts_by_running_sum

    gen = torch.Generator().manual_seed(0)
    for sizes in ([3, 0, 5, 2], [0, 0, 7], [1], [4, 0]):
        mask = torch.rand(sum(sizes), generator=gen) > 0.5
        ids = Segments.from_sizes(sizes).ids
        expected = torch.zeros(len(sizes), dtype=torch.int64).index_add_(0, ids, mask.to(torch.int64))
        ends = torch.tensor(sizes).cumsum(0)
        assert torch.equal(counts_by_running_sum(mask, ends), expected)


def test_failed_compilation_falls_back_to_the_eager_step(monkeypatch):
    """If torch.compile cannot compile the step, ``compile=True`` warns and steps as without it."""

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    x, y = batch()
    models = [small_model(), small_model()]
    opts = [O.LearnedOptimizer(m.parameters(), active_rule("deepset", beta=0.3), compile=c)
            for m, c in zip(models, (True, False))]
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        for _ in range(3):
            for m, opt in zip(models, opts):
                opt.zero_grad()
                loss_fn(m, x, y).backward()
                opt.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
