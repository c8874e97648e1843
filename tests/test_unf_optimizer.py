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


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gpt2"])
def test_unf_optimizer_commutes_with_the_models_permutations(name):
    model, x = build(name)
    model.train(False)  # BatchNorm statistics must not move during the steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = unf.derive_spec(model, x)
    perm = spec.random_permutation(torch.Generator().manual_seed(3))
    twin = copy.deepcopy(model)
    twin.load_state_dict(spec.permute_state_dict(model.state_dict(), perm))

    rule = randomize_rule(O.LearnedRule(O.UNFFamily(spec.parameters_only(), hidden=4, layers=2)))
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
    family = O.UNFFamily(spec)
    head = sum(p.numel() for p in family.head.parameters())
    assert head == 1028  # the UNF[1] read-out of the paper's MLP-task optimizer
