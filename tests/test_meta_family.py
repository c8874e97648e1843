"""Meta-training over task families: config validation, deterministic task draws, shared UNF key tables
(``RoleUNFLinear(keys=...)``, :func:`meta_train.build.bind_rule`), tiny family runs of every kind of rule, saving
and loading a family-trained UNF rule, and exact resume across task switches."""

from __future__ import annotations

import csv
import functools
import shutil
import warnings

import pytest
import torch
from torch.func import functional_call

import optimizers as O
import unf
from meta_train.build import bind_rule, build_rule, copy_rule, union_role_keys
from meta_train.loop import FAMILY_KEY_TASKS, MetaTrainConfig, _family_role_keys, load_config, meta_train
from meta_train.tasks import MLPFamily, get_family, mlp_task, register_family
from unf.nn import WeightFeatures, assert_equivariant
from unf.nn.roles import RoleUNFLinear

# small MLPs on mnist1d (40 inputs): widths 8/16, depth 1-2, so a handful of meta-steps take well under a second
TINY_FAMILY = "test-tiny-mlp"
register_family(TINY_FAMILY, functools.partial(MLPFamily, datasets=("mnist1d",), depths=(1, 2), widths=(8, 16),
                                               activations=("relu", "tanh"), batch_sizes=(16, 32)), overwrite=True)
# horizon / truncation = 2: the inner runs restart, and a new task is drawn, every 2 meta-steps
TINY = dict(task_family=TINY_FAMILY, meta_steps=6, truncation=2, particles=2, horizon=4, checkpoint_every=1,
            meta_lr=1e-2, hidden=4)


def _rule_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tasks(run_dir) -> list[str]:
    return [r["task"] for r in csv.DictReader(open(run_dir / "metrics.csv"))]


def _spec(task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unf.derive_spec(task.model, task.example_inputs).parameters_only()


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, message", [
    ({"task_family": "nope"}, "field 'task_family' must be a registered task family"),
    ({"task_family": 3}, "field 'task_family' must be str"),
    ({"task_family": "mlp-mnist1d", "task": "mlp-mnist1d"}, "fields 'task' and 'task_family' are exclusive"),
])
def test_bad_family_config_names_the_field(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        MetaTrainConfig(run_dir=str(tmp_path), **fields)
    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path}"\n' + "".join(
        f"{k} = {v!r}\n".replace("'", '"') for k, v in fields.items()))
    with pytest.raises(ValueError, match=f"c.toml: {message}"):
        load_config(config)


def test_family_config_from_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'run_dir = "{tmp_path}"\ntask_family = "mlp-mnist1d"\nfamily = "unf"\n')
    cfg = load_config(config)
    assert cfg.task_family == "mlp-mnist1d" and cfg.task == "mlp-digits"
    for seed in range(4):  # the registered family's ranges
        c = get_family("mlp-mnist1d").sample(torch.Generator().manual_seed(seed)).config
        assert c["dataset"] == "mnist1d" and 1 <= len(c["hidden"]) <= 2 and set(c["hidden"]) <= {16, 32, 64, 128}
        assert c["activation"] in ("relu", "tanh") and 64 <= c["batch_size"] <= 256


# ---------------------------------------------------------------------------------------------------- sampling


def test_task_draws_and_key_tables_are_deterministic():
    family = get_family(TINY_FAMILY)
    names = [family.sample(torch.Generator().manual_seed(s)).name for s in range(6)]
    assert names == [family.sample(torch.Generator().manual_seed(s)).name for s in range(6)]
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    first = family.sample(g).name
    assert family.sample(torch.Generator().set_state(state)).name == first  # what resume relies on
    keys = _family_role_keys(family, 0)
    assert keys == _family_role_keys(family, 0) and len(set(keys)) == len(keys)
    assert all(k.startswith(("term:", "bias:")) for k in keys)
    # the table covers both depths: every key of a 1- and a 2-hidden-layer MLP of the family
    for hidden in ((8,), (16, 8)):
        own = RoleUNFLinear(_spec(mlp_task("mnist1d", hidden, batch_size=16)), 1, 1).own_role_keys
        assert set(own) <= set(keys)
    assert FAMILY_KEY_TASKS >= 4


# ---------------------------------------------------------------------------------------------------- keys=


def _mlp_spec(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model, x = torch.nn.Sequential(*layers[:-1]), torch.randn(2, sizes[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return unf.derive_spec(model, x).parameters_only()


def _features(spec, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return WeightFeatures.randn(spec, 2, channels, generator=g, dtype=torch.float64).as_dict()


def _randomized(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def test_role_layer_with_its_own_keys_equals_the_default_layer():
    spec = _mlp_spec([10, 6, 6, 4])
    torch.manual_seed(0)
    plain = _randomized(RoleUNFLinear(spec, 3, 2).double())
    assert plain.role_keys == plain.own_role_keys and plain.coverage == 1.0
    same = RoleUNFLinear(spec, 3, 2, keys=plain.role_keys).double()
    same.load_state_dict(plain.state_dict())
    reordered = RoleUNFLinear(spec, 3, 2, keys=list(reversed(plain.role_keys))).double()
    assert reordered.load_role_state(plain.role_state()) == 1.0
    xs = _features(spec, 3)
    want = plain(xs)
    for layer in (same, reordered):
        got = layer(xs)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)


def test_terms_whose_key_is_absent_contribute_zero():
    spec = _mlp_spec([10, 6, 6, 4])
    torch.manual_seed(0)
    full = _randomized(RoleUNFLinear(spec, 3, 2).double())
    dropped_term, dropped_bias = full.role_keys[0], next(k for k in full.role_keys if k.startswith("bias:"))
    part = RoleUNFLinear(spec, 3, 2, keys=[k for k in full.role_keys if k not in (dropped_term, dropped_bias)])
    part = part.double()
    part.load_role_state(full.role_state())
    # the same as the full layer with those coefficients zeroed
    with torch.no_grad():
        full.coef[0].zero_()
        full.bias_coef[full.bias_keys.index(dropped_bias[5:])].zero_()
    xs = _features(spec, 3)
    want, got = full(xs), part(xs)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)
    n_absent = sum(full.term_coefficient(t).abs().sum() == 0 for t in range(full.num_terms))
    assert part.coverage == pytest.approx(1 - n_absent / part.num_terms) and part.coverage < 1
    assert torch.equal(part.term_coefficient(next(t for t in range(part.num_terms)
                                                   if full.term_coefficient(t).abs().sum() == 0)),
                       torch.zeros(2, 3, dtype=torch.float64))
    # gradients reach the table through the zero rows' neighbours, and none is NaN
    out = part(xs)
    sum(v.sum() for v in out.values()).backward()
    assert torch.isfinite(part.coef.grad).all() and part.coef.grad.abs().sum() > 0


def test_shared_keys_fix_the_shapes_whatever_the_spec():
    small, deep = _mlp_spec([12, 5, 3]), _mlp_spec([7, 6, 6, 6, 4])
    keys = list(dict.fromkeys(RoleUNFLinear(small, 1, 1).own_role_keys + RoleUNFLinear(deep, 1, 1).own_role_keys))
    torch.manual_seed(0)
    a = _randomized(RoleUNFLinear(small, 3, 2, keys=keys).double())
    b = RoleUNFLinear(deep, 3, 2, keys=keys).double()
    shapes = {k: v.shape for k, v in a.named_parameters()}
    assert shapes == {k: v.shape for k, v in b.named_parameters()} and a.coverage == b.coverage == 1.0
    # one set of weights drives both layers, and the deep one stays equivariant
    state = dict(a.named_parameters())
    out = functional_call(b, state, (_features(deep, 3),))
    assert set(out) == set(b.names) and all(torch.isfinite(v).all() for v in out.values())
    b.load_state_dict(a.state_dict())
    assert assert_equivariant(b, deep, _features(deep, 3), trials=3, rtol=1e-10) <= 1e-10
    with pytest.raises(ValueError, match="keys: every key must start with 'term:' or 'bias:'"):
        RoleUNFLinear(small, 1, 1, keys=["p|p g=0|1 cross P=0|1"])
    with pytest.raises(ValueError, match="given twice"):
        RoleUNFLinear(small, 1, 1, keys=[keys[0], keys[0]])
    with pytest.raises(ValueError, match="bias=False"):
        RoleUNFLinear(small, 1, 1, keys=keys, bias=False)


def test_bound_unf_rule_runs_the_masters_parameters_like_a_role_transfer():
    a, b = mlp_task("mnist1d", (8,), batch_size=16), mlp_task("mnist1d", (16, 8), "tanh", batch_size=16)
    keys = union_role_keys([a, b])
    pa, pb = a.init(torch.Generator().manual_seed(0)), b.init(torch.Generator().manual_seed(1))
    master, _ = build_rule("unf", a, pa, hidden=4, role_keys=keys)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in master.parameters():
            p.normal_(0, 0.3)
    bound, problem = bind_rule(master, "unf", b, pb)
    assert bound is not master and bound.f.spec != master.f.spec
    assert {k: v.shape for k, v in bound.named_parameters()} == {k: v.shape for k, v in master.named_parameters()}
    # the same update as the master transferred by role onto b's own keys
    own, own_problem = build_rule("unf", b, pb, hidden=4)
    copy_rule(own, master)
    w = torch.cat([p.reshape(-1) for p in pb.values()])
    g = torch.func.grad(problem.loss)(w, b.sample_batch(torch.Generator().manual_seed(2)))
    theta = {k: v.detach() for k, v in master.named_parameters()}
    new = functional_call(bound, theta, (w, g, O.init(w.numel()), problem.segments))[0]
    ref = functional_call(own, dict(own.named_parameters()), (w, g, O.init(w.numel()), own_problem.segments))[0]
    torch.testing.assert_close(new, ref)
    ds, _ = build_rule("deepset", a, pa, hidden=4)  # per-element masters are returned as they are
    assert bind_rule(ds, "deepset", b, pb)[0] is ds


# ---------------------------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("family", ["deepset", "unf"])
def test_tiny_family_run_trains_the_master_and_saves_it(tmp_path, family):
    cfg = MetaTrainConfig(run_dir=str(tmp_path), family=family, **TINY)
    torch.manual_seed(cfg.seed)
    rule = meta_train(cfg, progress=False)
    tasks = _tasks(tmp_path)
    assert len(tasks) == 6 and tasks[0] == tasks[1] and tasks[2] == tasks[3] and len(set(tasks)) >= 2
    assert all(t.startswith("mlp-mnist1d-h") for t in tasks)
    back = O.load_rule(tmp_path / "rule.safetensors")
    assert _rule_equal(rule, back)
    info = O.weights_info(tmp_path / "rule.safetensors")
    assert info["info"]["task_family"] == TINY_FAMILY
    if family == "unf":
        keys = _family_role_keys(get_family(TINY_FAMILY), cfg.seed)
        assert list(rule.f.head.role_keys) == keys == info["config"]["role_keys"]
        assert rule.f.head.coef.abs().sum() > 0  # the read-out started at zero: the meta-gradient reached it
        # the saved rule drives a model of another spec (transferred by role)
        model = mlp_task("mnist1d", (16, 16), batch_size=16)
        opt = O.load(str(tmp_path / "rule.safetensors"), model.model, example_inputs=model.example_inputs)
        assert opt.rule.f.head.coverage == 1.0
    else:
        torch.manual_seed(cfg.seed)
        fresh = O.make_rule("deepset", hidden=4)
        assert not _rule_equal(rule, fresh)


def test_unf_family_task_with_unknown_keys_warns_once(tmp_path, monkeypatch):
    import meta_train.loop as loop

    shallow = mlp_task("mnist1d", (8,), batch_size=16)
    monkeypatch.setattr(loop, "_family_role_keys", lambda family, seed: union_role_keys([shallow]))
    register_family("test-deep-mlp", functools.partial(MLPFamily, datasets=("mnist1d",), depths=(2,),
                                                       widths=(8,), batch_sizes=(16,)), overwrite=True)
    cfg = MetaTrainConfig(run_dir=str(tmp_path), family="unf", **dict(TINY, task_family="test-deep-mlp"))
    with pytest.warns(UserWarning, match="role keys outside the shared table") as record:
        rule = meta_train(cfg, progress=False)
    assert len([w for w in record if "shared table" in str(w.message)]) == 1
    assert all(torch.isfinite(p).all() for p in rule.parameters())


@pytest.mark.parametrize("family, estimator", [("unf", "pes"), ("deepset", "es")])
def test_family_run_resumes_exactly_across_task_switches(tmp_path, family, estimator):
    cfg = dict(TINY, family=family, estimator=estimator)
    straight = tmp_path / "straight"
    reference = meta_train(MetaTrainConfig(run_dir=str(straight), **cfg), progress=False)
    run = tmp_path / "resumed"
    resumed_cfg = MetaTrainConfig(run_dir=str(run), **cfg)
    meta_train(resumed_cfg, progress=False, stop_after=3)  # mid-way through the second task
    shutil.copy(run / "checkpoint.pt", tmp_path / "step3.pt")
    meta_train(resumed_cfg, progress=False, stop_after=5)  # runs on past a task switch, then "dies"
    shutil.copy(tmp_path / "step3.pt", run / "checkpoint.pt")
    resumed = meta_train(resumed_cfg, progress=False)
    assert _rule_equal(reference, resumed)
    assert (run / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert len(set(_tasks(run))) >= 2
