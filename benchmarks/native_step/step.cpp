// EXPERIMENT, not library code: optimizers/small.py's UNF step (the common case: every gradient finite) written
// as the same ATen calls from C++, to measure how much of the small-model step is Python overhead.
// benchmarks/bench_native_step.py compiles it (torch.utils.cpp_extension, needs ninja and a C++ compiler),
// checks it against the Python step and times both against Adam. Returns false if a non-finite value was met.
#include <torch/extension.h>
#include <cmath>
using torch::Tensor;

bool unf_step(Tensor grad, Tensor param, Tensor momenta, Tensor decays, Tensor stats_in, Tensor feats,
              Tensor bufA, Tensor bufB, Tensor out, Tensor new_param, Tensor mean, Tensor ids, Tensor bias0,
              std::vector<Tensor> wT, std::vector<Tensor> pT, std::vector<Tensor> b,
              std::vector<int64_t> run_starts, std::vector<Tensor> c_id, Tensor R, Tensor sel, Tensor c_pair,
              Tensor slot, Tensor u0, Tensor expand, Tensor beta_bound, Tensor step_size) {
  torch::NoGradGuard g;
  if (!std::isfinite(grad.sum().item<float>())) return false;
  momenta.mul_(decays).add_(grad);
  int64_t k = 8;
  auto raw = stats_in.narrow(1, 0, k);
  auto sq = stats_in.narrow(1, k, k);
  raw.copy_(torch::cat({param.unsqueeze(0), grad.unsqueeze(0), momenta.narrow(0, 1, 6)}).t());
  at::mul_out(sq, raw, raw);
  auto stats = torch::mm(mean, stats_in);
  auto means = stats.narrow(1, 0, k);
  auto rms = stats.narrow(1, k, k);
  rms.add_(1e-24).rsqrt_();
  at::index_select_out(feats, rms, 0, ids);
  at::mul_out(feats, raw, feats);
  Tensor x = feats;
  for (size_t d = 0; d < wT.size(); d++) {
    Tensor y = (d % 2 == 0) ? bufA : bufB;
    Tensor bias = d == 0 ? bias0 : b[d];
    if (d == 0) means.mul_(rms); else means = torch::mm(mean, x);
    auto ctx = torch::addmm(bias, means, pT[d]);
    at::index_select_out(y, ctx, 0, ids);
    y.addmm_(x, wT[d]);
    y.relu_();
    x = y;
  }
  for (size_t r = 0; r + 1 < run_starts.size(); r++) {
    auto o = out.narrow(0, run_starts[r], run_starts[r + 1] - run_starts[r]);
    at::mv_out(o, x.narrow(0, run_starts[r], run_starts[r + 1] - run_starts[r]), c_id[r]);
  }
  auto z = torch::mm(R, x).index_select(0, sel);
  auto u = torch::index_add(u0, 0, slot, at::linalg_vecdot(z, c_pair));
  at::addmv_out(out, out, expand, u);
  out.tanh_();
  auto direction = torch::addcmul(momenta.select(0, 0), out, beta_bound);
  at::addcmul_out(new_param, param, direction, step_size);
  return std::isfinite(new_param.sum().item<float>());
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("unf_step", &unf_step); }
