// ctest of the coefficient functors' contract for timesteps the host could not check (CMakeLists.txt): on a
// device a timestep tensor cannot be validated without a sync, so the CUDA pre-pass (cuda/per_sample_coef.cuh)
// and the Triton kernels give such a sample NaN — no device assert, which would poison the process's CUDA
// context (DESIGN.md section 4). The functors are host-device code, so their half of that contract is checked
// here, on the CPU: an out-of-range or misordered timestep makes x̂0 (after clipping) and x_prev NaN, a valid
// one in the same batch stays finite, and no table entry outside [0, T) is read (a read would give a finite
// value where NaN is required). Needs only the header: no LibTorch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "common/schedule_math.h"

namespace {

using namespace diffusion_ext;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

constexpr int64_t T = 10;

// ᾱ for t in [0, T), inside a buffer whose neighbours (t = −1, t = T) are finite: reading them would show.
struct Table {
  std::vector<float> buf;
  Table() : buf(T + 2, 0.5f) {
    for (int64_t t = 0; t < T; ++t) buf[t + 1] = 0.99f - 0.09f * static_cast<float>(t);
  }
  const float* data() const { return buf.data() + 1; }
};

// x̂0 (clipped to [−1, 1]) and x_prev of one element with a fixed x, m, x̂0_last and z, in acc_t.
template <typename acc_t, typename Fn>
void step_of(const Fn& fn, int64_t b, acc_t* x0, acc_t* prev) {
  const StepCoef<acc_t> c = round_coef<acc_t>(fn(b));
  const acc_t x = acc_t(0.3), m = acc_t(-0.2), x0_last = acc_t(0.1), z = acc_t(0.7);
  *x0 = predict_x0(c, x, m, acc_t(1));
  *prev = reverse_step<true>(c, x, m, *x0, x0_last, z);
}

template <typename acc_t, typename Fn>
void expect(const Fn& fn, int64_t b, bool valid, const std::string& what) {
  acc_t x0, prev;
  step_of<acc_t>(fn, b, &x0, &prev);
  check(fn.in_range(b) == valid, what + ": in_range is " + (valid ? "true" : "false"));
  if (valid) {
    check(std::isfinite(x0) && std::isfinite(prev), what + ": x̂0 and x_prev finite");
  } else {
    check(std::isnan(prev), what + ": x_prev NaN");
  }
}

template <typename acc_t>
void run(const char* dtype) {
  const Table table;
  const std::string d = std::string(" (") + dtype + ")";

  const int64_t tq[] = {3, T, -1};
  const QSampleCoefFn<float> q{tq, table.data(), T};
  for (int64_t b = 0; b < 3; ++b) {
    const QSampleCoef<acc_t> c = round_coef<acc_t>(q(b));
    const bool finite = std::isfinite(c.a) && std::isfinite(c.s);
    check(q.in_range(b) == (b == 0) && finite == (b == 0), "q_sample t = " + std::to_string(tq[b]) + d);
  }

  const int64_t td[] = {0, 5, T, -1};
  for (auto v : {VarianceType::kFixedSmall, VarianceType::kFixedLarge}) {
    const DdpmCoefFn<float> f{td, table.data(), T, v, PredictionType::kEpsilon};
    for (int64_t b = 0; b < 4; ++b) expect<acc_t>(f, b, b < 2, "ddpm t = " + std::to_string(td[b]) + d);
  }

  // DDIM: t_prev must be in [−1, t): equal, above, or below −1 is misordered or out of range
  const int64_t t[] = {5, 5, 5, 5, T, 5};
  const int64_t tp[] = {-1, 2, 5, 7, 2, -2};
  for (auto p : {PredictionType::kEpsilon, PredictionType::kSample, PredictionType::kVPrediction}) {
    const DdimCoefFn<float> f{t, tp, table.data(), T, 1.0, p};
    for (int64_t b = 0; b < 6; ++b) {
      expect<acc_t>(f, b, b < 2, "ddim " + std::to_string(t[b]) + " -> " + std::to_string(tp[b]) + d);
    }
  }

  // DPM-Solver++(2M): also t_last in (t, T); its x̂0 is NaN too
  const int64_t tl[] = {8, 8, 5, T, 8, 8};
  const int64_t t2[] = {5, 5, 5, 5, 5, 5};
  const int64_t tp2[] = {2, -1, 2, 2, 5, -2};
  for (bool sde : {false, true}) {
    const DpmSolverCoefFn<float> f{t2, tp2, tl, table.data(), T, sde, PredictionType::kEpsilon};
    for (int64_t b = 0; b < 6; ++b) {
      const std::string what = "dpm-solver++ " + std::to_string(t2[b]) + " -> " + std::to_string(tp2[b]) +
                               " after " + std::to_string(tl[b]) + (sde ? " sde" : "") + d;
      expect<acc_t>(f, b, b < 2, what);
      if (b >= 2) {
        acc_t x0, prev;
        step_of<acc_t>(f, b, &x0, &prev);
        check(std::isnan(x0), what + ": x̂0 NaN");
      }
    }
  }
}

}  // namespace

int main() {
  run<float>("float");
  run<double>("double");
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
