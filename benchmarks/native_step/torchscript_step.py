"""EXPERIMENT, not library code: the same step as ``step.cpp`` as a TorchScript function (``torch.jit.script``), to
compare the TorchScript interpreter's per-op overhead with Python's and C++'s (benchmarks/bench_native_step.py)."""

import math

import torch
from torch import Tensor


def unf_step(grad: Tensor, param: Tensor, momenta: Tensor, decays: Tensor, stats_in: Tensor, feats: Tensor,
             bufA: Tensor, bufB: Tensor, out: Tensor, new_param: Tensor, mean: Tensor, ids: Tensor, bias0: Tensor,
             wT: list[Tensor], pT: list[Tensor], b: list[Tensor], run_starts: list[int], c_id: list[Tensor],
             R: Tensor, sel: Tensor, c_pair: Tensor, slot: Tensor, u0: Tensor, expand: Tensor, beta_bound: Tensor,
             step_size: Tensor) -> bool:
    if not math.isfinite(float(grad.sum())):
        return False
    momenta.mul_(decays).add_(grad)
    k = 8
    raw = stats_in.narrow(1, 0, k)
    sq = stats_in.narrow(1, k, k)
    raw.copy_(torch.cat([param.unsqueeze(0), grad.unsqueeze(0), momenta.narrow(0, 1, 6)]).t())
    torch.mul(raw, raw, out=sq)
    stats = torch.mm(mean, stats_in)
    means = stats.narrow(1, 0, k)
    rms = stats.narrow(1, k, k)
    rms.add_(1e-24).rsqrt_()
    torch.index_select(rms, 0, ids, out=feats)
    torch.mul(raw, feats, out=feats)
    x = feats
    for d in range(len(wT)):
        y = bufA if d % 2 == 0 else bufB
        if d == 0:
            bias = bias0
            means.mul_(rms)
        else:
            bias = b[d]
            means = torch.mm(mean, x)
        ctx = torch.addmm(bias, means, pT[d])
        torch.index_select(ctx, 0, ids, out=y)
        y.addmm_(x, wT[d])
        y.relu_()
        x = y
    for r in range(len(run_starts) - 1):
        a = run_starts[r]
        n = run_starts[r + 1] - a
        torch.mv(x.narrow(0, a, n), c_id[r], out=out.narrow(0, a, n))
    z = torch.mm(R, x).index_select(0, sel)
    u = torch.index_add(u0, 0, slot, torch.linalg.vecdot(z, c_pair))
    torch.addmv(out, expand, u, out=out)
    out.tanh_()
    direction = torch.addcmul(momenta.select(0, 0), out, beta_bound)
    torch.addcmul(param, direction, step_size, out=new_param)
    return math.isfinite(float(new_param.sum()))
