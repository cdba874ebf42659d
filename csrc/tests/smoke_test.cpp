// ctest smoke test of the LibTorch build (CMakeLists.txt): the ops are registered with the dispatcher,
// q_sample matches its formula, ddpm_step runs, and a bad timestep is rejected with the op's name.
// The thorough tests are in python_tests/; this one only proves that the C++ library links and works alone.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

using QSampleFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using DdpmStepFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, int64_t, int64_t, bool, double, c10::string_view,
                              c10::string_view, std::optional<double>, const std::optional<at::Tensor>&);

}  // namespace

int main() {
  try {
    auto q_sample = c10::Dispatcher::singleton().findSchemaOrThrow("diffusion_ext::q_sample", "").typed<QSampleFn>();
    auto ddpm_step =
        c10::Dispatcher::singleton().findSchemaOrThrow("diffusion_ext::ddpm_step", "").typed<DdpmStepFn>();

    at::manual_seed(0);
    const int64_t T = 1000;
    const auto betas = at::linspace(1e-4, 0.02, T, at::kDouble);
    const auto abar = at::cumprod(1 - betas, 0).to(at::kFloat);
    const auto x0 = at::randn({3, 4, 5, 6});
    const auto noise = at::randn_like(x0);
    const auto t = at::tensor(std::vector<int64_t>{0, 499, 999});

    // x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise, abar[t] broadcast over each sample.
    const auto a = abar.index_select(0, t).view({-1, 1, 1, 1});
    const auto expected = at::sqrt(a) * x0 + at::sqrt(1 - a) * noise;
    const auto got = q_sample.call(x0, t, noise, abar);
    const double err = (got - expected).abs().max().item<double>();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g", err);
    check(got.sizes() == x0.sizes() && err < 1e-5, std::string("q_sample through the dispatcher, max abs error ") + buf);

    // The direct call keeps the library linked (its static registrations are what the dispatcher sees).
    const double direct_err = (diffusion_ext::q_sample_cpu(x0, t, noise, abar) - got).abs().max().item<double>();
    check(direct_err == 0.0, "diffusion_ext::q_sample_cpu agrees with the dispatcher call");

    const auto model_output = at::randn_like(x0);
    const auto step = ddpm_step.call(model_output, t, got, abar, noise, 0, 0, true, 1.0, "fixed_small", "epsilon",
                                     std::nullopt, std::nullopt);
    check(step.sizes() == x0.sizes() && at::isfinite(step).all().item<bool>(), "ddpm_step output is finite");

    bool threw = false;
    std::string message;
    try {
      q_sample.call(x0, at::tensor(std::vector<int64_t>{0, 1, T}), noise, abar);
    } catch (const c10::Error& e) {
      threw = true;
      message = e.what_without_backtrace();
    }
    check(threw && message.find("diffusion_ext.q_sample") != std::string::npos,
          "out-of-range t rejected: " + (threw ? message : std::string("no exception")));
  } catch (const std::exception& e) {
    std::printf("FAIL: unexpected exception: %s\n", e.what());
    ++failures;
  }

  std::printf("smoke test: %s\n", failures == 0 ? "all checks passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
