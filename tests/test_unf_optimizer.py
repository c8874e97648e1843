"""The UNF learned optimizer: equivariant to the model's symmetries, trains, and keeps the optimizer contract."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import optimizers as O
import unf

from .zoo import build


def randomize_rule(rule: O.LearnedRule, seed: int = 0) -> O.LearnedRule:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in rule.f.parameters():
            p.normal_(0, 0.3)
        rule.beta.fill_(0.05)
    return rule


def loss_of(model, x):
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return out.double().square().mean()


@pytest.mark.parametrize("scale_floor", [None, 0.05])  # relative steps: a per-entry std, invariant too
@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gpt2"])
def test_unf_optimizer_commutes_with_the_models_permutations(name, scale_floor):
    model, x = build(name)
    model.train(False)  # BatchNorm statistics must not move during the steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = unf.derive_spec(model, x)
    perm = spec.random_permutation(torch.Generator().manual_seed(3))
    twin = copy.deepcopy(model)
    twin.load_state_dict(spec.permute_state_dict(model.state_dict(), perm))

    rule = randomize_rule(O.LearnedRule(O.UNFFamily(spec.parameters_only(), hidden=4, layers=2),
                                        scale_floor=scale_floor))
    opt = O.UNFOptimizer(model, x, rule=rule, spec=spec)
    opt_twin = O.UNFOptimizer(twin, x, rule=copy.deepcopy(rule), spec=spec)
    for _ in range(3):
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
    back = spec.permute_state_dict(twin.state_dict(), spec.inverse_permutation(perm))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=1e-5, atol=1e-5)
    # the learned term really contributed (otherwise this would be plain momentum SGD)
    assert float(sum(p.detach().abs().sum() for p in rule.f.head.parameters())) > 0


def test_unf_optimizer_trains_and_refuses_new_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    opt = O.UNFOptimizer(model, x, hidden=8, layers=2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    with pytest.raises(RuntimeError, match="re-derived"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    sd = copy.deepcopy(opt.state_dict())
    opt2 = O.UNFOptimizer(model, x, hidden=8, layers=2)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momenta"], opt2.state[p]["momenta"])


def test_unf_family_counts_match_the_paper_shape():
    spec = unf.WeightSpaceSpec.from_axes({"W1": [("h", 32), ("in", 64)], "b1": [("h", 32)],
                                          "W2": [("out", 10), ("h", 32)], "b2": [("out", 10)]})
    family = O.UNFFamily(spec, tie="none")
    head = sum(p.numel() for p in family.head.parameters())
    assert head == 1028  # the UNF[1] read-out of the paper's MLP-task optimizer
    role = O.UNFFamily(spec)  # role keys tie W1 <- W1 to W2 <- W2 etc. (all axes permuted here): fewer
    assert family.head.num_terms == role.head.num_terms == 32
    assert len(role.head.term_keys) < 32


def _digits_mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]), torch.randn(4, sizes[0])


def test_unf_weights_save_load_and_transfer_by_role(tmp_path):
    small, xs = _digits_mlp([16, 8, 3])
    opt = O.UNFOptimizer(small, xs, hidden=4, layers=2)
    randomize_rule(opt.rule)
    path = tmp_path / "unf.safetensors"
    O.save_rule(opt.rule, path, note="test")
    back = O.load_rule(path)
    assert isinstance(back.f, O.UNFFamily) and back.f.spec == opt.spec
    for k, v in opt.rule.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    # the same model: identical updates from the loaded weights
    twin = copy.deepcopy(small)
    opt_twin = O.load(str(path), twin, example_inputs=xs)
    for m, o in ((small, opt), (twin, opt_twin)):
        o.zero_grad()
        m(xs).square().mean().backward()
        o.step()
    for a, b in zip(small.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # another model (deeper, wider): trained keys carried over, others zero, a warning says how many
    big, xb = _digits_mlp([20, 12, 12, 5])
    with pytest.warns(UserWarning, match="trained coefficients"):
        opt_big = O.load(str(path), big, example_inputs=xb)
    head = opt_big.rule.f.head
    assert 0 < head.coverage < 1
    src = opt.rule.f.head
    for i, k in enumerate(head.term_keys):
        want = src.coef[src.term_keys.index(k)] if k in src.term_keys else torch.zeros_like(head.coef[i])
        assert torch.equal(head.coef[i], want)
    assert torch.equal(opt_big.rule.beta, opt.rule.beta)
    for _ in range(3):
        opt_big.zero_grad()
        big(xb).square().mean().backward()
        opt_big.step()
    assert all(torch.isfinite(p).all() for p in big.parameters())
    with pytest.raises(ValueError, match="example_inputs"):
        O.load(str(path), big)


def test_unf_family_runs_under_vmap_over_meta_parameters():
    from torch.func import functional_call, vmap

    model, x = _digits_mlp([6, 5, 3])
    opt = O.UNFOptimizer(model, x, hidden=4, layers=2)
    rule = randomize_rule(opt.rule)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    w = torch.randn(n)
    g = torch.randn(n)
    state = O.init(n)
    seg = rule.f.segments(params)
    theta = {k: v.detach() for k, v in rule.named_parameters()}
    noise = {k: 0.01 * torch.randn(3, *v.shape) for k, v in theta.items()}

    def step(e):
        return functional_call(rule, {k: theta[k] + e[k] for k in theta}, (w, g, state, seg))[0]

    batched = vmap(step)(noise)
    for i in range(3):
        torch.testing.assert_close(batched[i], step({k: v[i] for k, v in noise.items()}))


@pytest.mark.parametrize("tie", ["role", "none"])
def test_unf_fast_path_equals_reference(tie):
    from optimizers.fast import fast_update, supports_fast_path

    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 96, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(96 * 16, 50))
    x = torch.randn(2, 3, 8, 8)
    spec = unf.derive_spec(model, x).parameters_only()
    rule = randomize_rule(O.LearnedRule(O.UNFFamily(spec, hidden=4, layers=2, tie=tie)))
    params = [dict(model.named_parameters())[n] for n in spec.sources]
    seg = rule.f.bind(params)
    n = sum(p.numel() for p in params)
    assert supports_fast_path(rule, n)  # > one chunk: the chunked DeepSet pass runs over several chunks
    gen = torch.Generator().manual_seed(1)
    param, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    grad[::97] = float("nan")
    state = O.RuleState(torch.randn(7, n, generator=gen), torch.tensor(12.0))
    with torch.no_grad():
        ref = rule.update(param, grad, state, seg, lr=0.7)
        fast = fast_update(rule, param, grad, state, seg, lr=0.7)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1].momenta, ref[1].momenta)
    assert torch.equal(fast[2], ref[2])
