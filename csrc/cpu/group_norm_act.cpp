// group_norm_act on the CPU: y = act(GroupNorm(x)) (Wu & He 2018) in one read for the statistics and one
// read + write for the output, and its backward, which recomputes the activation from x, mean and rstd.
//
// channels_first: one task per (n, g); the group's rows are one contiguous run, summed in one pass, and stay
// in cache between the statistics and the output pass. channels_last: tasks over (n, chunk of spatial rows),
// per-channel partial sums in double (bf16/fp16: fp32 lanes over 64 rows at a time, then added into them),
// combined per group (Chan et al.), then a second pass over the rows.
// Backward (per group, M = C/G·HW elements): dz = dy·act'(z), x̂ = (x − μ)·rstd,
//   dβ_c = Σ dz, dγ_c = Σ dz·x̂, dx = rstd·(dz·γ − mean(dz·γ) − x̂·mean(dz·γ·x̂)).
// Its sums run in acc_t lanes over bounded runs (a channel's vectors, or 64 channels_last rows) added into double.
// FiLM (scale, shift) only changes the per-channel coefficients: γ', β' per (n, c) (common/film.h, F1-F3),
// prepared before the loops, which stay the same.
#include "group_norm_kernels.h"  // first: it selects at::vec's capability

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/film.h"
#include "../group_norm_args.h"
#include "../ops.h"

namespace diffusion_ext {
namespace {

constexpr int64_t kRowsTarget = 16384;  // elements per channels_last task

template <typename acc_t>
std::vector<acc_t> channel_param(const at::Tensor& p, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (!p.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "channel_param", [&] {
    const scalar_t* q = p.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(q[c]);
  });
  return out;
}

// p[n, c] for n < N, c < C of an (N, C) FiLM input, (n, c) at n·stride(0) + c; `fill` where p is undefined.
template <typename acc_t>
std::vector<acc_t> sample_channel_param(const at::Tensor& p, int64_t N, int64_t C, acc_t fill) {
  std::vector<acc_t> out(N * C, fill);
  if (!p.defined()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "sample_channel_param", [&] {
    const scalar_t* q = p.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) out[n * C + c] = static_cast<acc_t>(q[n * p.stride(0) + c]);
    }
  });
  return out;
}

// The affine coefficients the loops apply to sample n: γ, β of each channel, or with FiLM γ', β' of each
// (n, c) (F1). `stride` is 0 without FiLM and C with it, so sample n's are at [n·stride, n·stride + C) either way.
template <typename acc_t>
struct ChannelAffine {
  std::vector<acc_t> gamma, beta;
  int64_t stride = 0;
  const acc_t* gamma_of(int64_t n) const { return gamma.data() + n * stride; }
  const acc_t* beta_of(int64_t n) const { return beta.data() + n * stride; }
};

template <typename acc_t, typename Args>
ChannelAffine<acc_t> channel_affine(const Args& a) {
  const int64_t N = a.shape.N, C = a.shape.C;
  ChannelAffine<acc_t> k{channel_param<acc_t>(a.weight, C, acc_t(1)), channel_param<acc_t>(a.bias, C, acc_t(0)), 0};
  if (!a.film()) return k;
  const auto s = sample_channel_param<acc_t>(a.scale, N, C, acc_t(0));
  const auto t = sample_channel_param<acc_t>(a.shift, N, C, acc_t(0));
  ChannelAffine<acc_t> f{std::vector<acc_t>(N * C), std::vector<acc_t>(N * C), C};
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const auto g = film_affine(k.gamma[c], k.beta[c], s[n * C + c], t[n * C + c]);
      f.gamma[n * C + c] = g.gamma;
      f.beta[n * C + c] = g.beta;
    }
  }
  return f;
}

// μ and rstd of group (n, g) from the moments m[c] of its Cg channels, each over the same count (HW, or the
// group's Cg·HW as one run); returns μ in double. With equal counts Chan et al.'s pairwise update reduces to
// μ = mean of the channel means and M2 = Σ M2_c + count·Σ(μ_c − μ)², two passes with one division per group:
// the pairwise form's two dependent divisions per channel were 23% of the channels_last forward at
// (8, 512, 4, 4) (perf, one thread, AMD EPYC).
template <typename acc_t>
double finish_group(const Moments* m, int64_t Cg, double eps, acc_t* mean, acc_t* rstd) {
  double mu = 0, var = 0;
  if (Cg > 0 && m[0].count > 0) {  // an empty group (C = 0 or HW = 0): μ = 0, σ² = 0
    double m2 = 0, spread = 0;
    for (int64_t c = 0; c < Cg; ++c) mu += m[c].mean;
    mu /= static_cast<double>(Cg);
    for (int64_t c = 0; c < Cg; ++c) {
      const double d = m[c].mean - mu;
      m2 += m[c].m2;
      spread += d * d;
    }
    var = (m2 + m[0].count * spread) / (m[0].count * static_cast<double>(Cg));
  }
  *mean = static_cast<acc_t>(mu);
  *rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
  return mu;
}

struct RowChunks {
  int64_t rows_per_chunk, chunks;
};

RowChunks row_chunks(const GroupNormShape& s) {
  const int64_t rows = std::max<int64_t>(1, kRowsTarget / std::max<int64_t>(1, s.C));
  return {rows, s.HW > 0 ? (s.HW + rows - 1) / rows : 0};
}

template <Activation kAct, typename scalar_t>
void forward(const GroupNormArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& s = a.shape;
  const int64_t C = s.C, HW = s.HW, G = s.G, Cg = s.channels_per_group();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = a.rstd.mutable_data_ptr<acc_t>();
  const auto aff = channel_affine<acc_t>(a);
  if (!s.channels_last) {
    at::parallel_for(0, s.N * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t c0 = (ng % G) * Cg;
        const acc_t* gamma = aff.gamma_of(ng / G);
        const acc_t* beta = aff.beta_of(ng / G);
        const scalar_t* xg = x + (ng / G * C + c0) * HW;
        // 1. the group's moments: its Cg·HW elements are one contiguous run, summed in one pass shifted by its
        // first element. (Not per channel: at 4×4 and 8×8 maps reducing and combining each channel's sums cost
        // more than the sums. One shift serves in double: the group's variance σ² includes the spread of its channel
        // means, so (K − μ)² ≤ L·σ² for any element K, and a few σ² unless K is an outlier.)
        const int64_t L = Cg * HW;
        const double K = L ? static_cast<double>(xg[0]) : 0.0;
        ShiftedSums sums;
        add_shifted_sums(xg, L, K, sums);
        const Moments m = moments_of(sums, K, static_cast<double>(L));
        const SplitMean<acc_t> mu(finish_group(&m, 1, a.eps, mean + ng, rstd + ng));  // 2. μ, rstd
        for (int64_t c = 0; c < Cg; ++c) {  // 3. y = act((x − μ)·rstd·γ + β), rows still in cache
          normalize_activate<kAct>(xg + c * HW, y + (xg - x) + c * HW, HW, mu, rstd[ng] * gamma[c0 + c], beta[c0 + c]);
        }
      }
    });
    return;
  }
  // channels_last: element (n, s, c) at (n·HW + s)·C + c. Three steps: 1. per-channel partial sums of each
  // chunk of rows, 2. per group μ, rstd and per channel the coefficients, 3. the output rows.
  const auto [rows, chunks] = row_chunks(s);
  std::vector<double> K(s.N * C, 0.0), s1(s.N * chunks * C, 0.0), s2(s.N * chunks * C, 0.0);
  for (int64_t n = 0; n < s.N && HW > 0; ++n) {
    for (int64_t c = 0; c < C; ++c) K[n * C + c] = static_cast<double>(x[n * HW * C + c]);
  }
  std::vector<acc_t> mu_c(s.N * C), mu_lo(s.N * C), scale(s.N * C);
  // 1. chunk nk's sums. fp32/bf16/fp16: in fp32 lanes (kf, f1, f2: C floats of the caller's), added into the
  // double sums every kRowRun rows; fp64 in double (the caller's lanes are empty then).
  const auto chunk_sums = [&](int64_t nk, float* kf, float* f1, float* f2) {
    const int64_t n = nk / chunks, first = nk % chunks * rows, last = std::min(HW, first + rows);
    if constexpr (std::is_same_v<acc_t, float>) {
      for (int64_t c = 0; c < C; ++c) kf[c] = static_cast<float>(K[n * C + c]);
      for (int64_t r0 = first; r0 < last; r0 += kRowRun) {
        for (int64_t r = r0; r < std::min(last, r0 + kRowRun); ++r) {
          add_row_sums_lanes(x + (n * HW + r) * C, C, kf, f1, f2);
        }
        for (int64_t c = 0; c < C; ++c) {
          s1[nk * C + c] += f1[c];
          s2[nk * C + c] += f2[c];
          f1[c] = f2[c] = 0.f;
        }
      }
    } else {
      for (int64_t r = first; r < last; ++r) {
        add_row_sums(x + (n * HW + r) * C, C, K.data() + n * C, s1.data() + nk * C, s2.data() + nk * C);
      }
    }
  };
  // 2. group ng's μ and rstd from its channels' sums over all chunks; its channels' coefficients.
  const auto group_coefs = [&](int64_t ng, Moments* m) {
    const int64_t n = ng / G, c0 = ng % G * Cg;
    for (int64_t c = 0; c < Cg; ++c) {
      ShiftedSums t;
      for (int64_t k = 0; k < chunks; ++k) {
        t.s1 += s1[(n * chunks + k) * C + c0 + c];
        t.s2 += s2[(n * chunks + k) * C + c0 + c];
      }
      m[c] = moments_of(t, K[n * C + c0 + c], static_cast<double>(HW));
    }
    const SplitMean<acc_t> mu(finish_group(m, Cg, a.eps, mean + ng, rstd + ng));
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      mu_c[n * C + c] = mu.hi;
      mu_lo[n * C + c] = mu.lo;
      scale[n * C + c] = rstd[ng] * aff.gamma_of(n)[c];
    }
  };
  // 3. chunk nk's output rows.
  const auto chunk_output = [&](int64_t nk) {
    const int64_t n = nk / chunks, first = nk % chunks * rows, last = std::min(HW, first + rows);
    for (int64_t r = first; r < last; ++r) {
      const int64_t off = (n * HW + r) * C;
      normalize_activate_row<kAct>(x + off, y + off, C, mu_c.data() + n * C, mu_lo.data() + n * C,
                                   scale.data() + n * C, aff.beta_of(n));
    }
  };
  if (chunks == 1) {
    // A sample is one chunk (small maps): all three steps per sample in one parallel region, the sample still
    // in cache for step 3. Three regions (two fork-joins more) made the (8, 512, 4, 4) forward slower than
    // PyTorch's channels_last group norm + SiLU on an AMD EPYC.
    at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> lanes(std::is_same_v<acc_t, float> ? 3 * C : 0, 0.f);
      std::vector<Moments> m(Cg);
      for (int64_t n = begin; n < end; ++n) {
        chunk_sums(n, lanes.data(), lanes.data() + C, lanes.data() + 2 * C);
        for (int64_t g = 0; g < G; ++g) group_coefs(n * G + g, m.data());
        chunk_output(n);
      }
    });
    return;
  }
  at::parallel_for(0, s.N * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> lanes(std::is_same_v<acc_t, float> ? 3 * C : 0, 0.f);
    for (int64_t nk = begin; nk < end; ++nk) chunk_sums(nk, lanes.data(), lanes.data() + C, lanes.data() + 2 * C);
  });
  at::parallel_for(0, s.N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<Moments> m(Cg);
    for (int64_t ng = begin; ng < end; ++ng) group_coefs(ng, m.data());
  });
  at::parallel_for(0, s.N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nk = begin; nk < end; ++nk) chunk_output(nk);
  });
}

// FiLM's share of the backward, from S1 = ds and S2 = db per (n, c): ∂s, ∂t (F2), then (1 + s) folded into the
// sums (F3) for the plain reduction over the batch.
template <typename scalar_t>
void film_backward(const GroupNormBackwardArgs& a, std::vector<double>& ds, std::vector<double>& db) {
  const int64_t N = a.shape.N, C = a.shape.C;
  const auto gamma = channel_param<double>(a.weight, C, 1.0);
  const auto beta = channel_param<double>(a.bias, C, 0.0);
  scalar_t* g_scale = a.grad_scale.defined() ? a.grad_scale.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* g_shift = a.grad_shift.defined() ? a.grad_shift.mutable_data_ptr<scalar_t>() : nullptr;
  const auto s = sample_channel_param<double>(a.scale, N, C, 0.0);
  for (int64_t i = 0; i < N * C; ++i) {
    const auto g = film_grads(gamma[i % C], beta[i % C], ds[i], db[i]);
    if (g_scale != nullptr) g_scale[i] = static_cast<scalar_t>(g.scale);
    if (g_shift != nullptr) g_shift[i] = static_cast<scalar_t>(g.shift);
    ds[i] *= 1.0 + s[i];
    db[i] *= 1.0 + s[i];
  }
}

template <Activation kAct, typename scalar_t>
void backward(const GroupNormBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& s = a.shape;
  const int64_t N = s.N, C = s.C, HW = s.HW, G = s.G, Cg = s.channels_per_group();
  const double M = static_cast<double>(Cg * HW);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.grad_y.const_data_ptr<scalar_t>();
  const acc_t* mean = a.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = a.rstd.const_data_ptr<acc_t>();
  scalar_t* gx = a.grad_x.defined() ? a.grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  const auto aff = channel_affine<acc_t>(a);
  std::vector<double> ds(N * C, 0.0), db(N * C, 0.0);  // Σdz and Σdz·x̂ per (n, c)
  // a_c, b_c of each channel's group: mean(dz·γ) and mean(dz·γ·x̂) over the group (γ' with FiLM)
  auto group_terms = [&](int64_t ng, acc_t* a_out, acc_t* b_out) {
    const int64_t n = ng / G, c0 = ng % G * Cg;
    const acc_t* gamma = aff.gamma_of(n);
    double sa = 0, sb = 0;
    for (int64_t c = c0; c < c0 + Cg; ++c) {
      sa += gamma[c] * ds[n * C + c];
      sb += gamma[c] * db[n * C + c];
    }
    *a_out = M > 0 ? static_cast<acc_t>(sa / M) : acc_t(0);
    *b_out = M > 0 ? static_cast<acc_t>(sb / M) : acc_t(0);
  };
  if (!s.channels_last) {
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dz(gx != nullptr ? Cg * HW : 0);  // the group's dz, from pass 1 to pass 2
      for (int64_t ng = begin; ng < end; ++ng) {
        // (the group's indices once: G, a captured variable, would be reloaded and divided by per channel)
        const int64_t n = ng / G, c0 = ng % G * Cg, base = (n * C + c0) * HW;
        const acc_t* gamma = aff.gamma_of(n) + c0;
        const acc_t* beta = aff.beta_of(n) + c0;
        double* ds_g = ds.data() + n * C + c0;
        double* db_g = db.data() + n * C + c0;
        const acc_t mu = mean[ng], rs = rstd[ng];
        for (int64_t c = 0; c < Cg; ++c) {  // 1. Σdz, Σdz·x̂ of each channel
          ShiftedSums sums;
          backward_run<kAct>(dy + base + c * HW, x + base + c * HW, HW, mu, rs, gamma[c], beta[c],
                             &sums, static_cast<scalar_t*>(nullptr), acc_t(0), acc_t(0),
                             dz.empty() ? nullptr : dz.data() + c * HW);
          ds_g[c] = sums.s1;
          db_g[c] = sums.s2;
        }
        if (gx == nullptr) continue;
        acc_t ga, gb;
        group_terms(ng, &ga, &gb);
        for (int64_t c = 0; c < Cg; ++c) {  // 2. dx, the rows still in cache
          backward_run<kAct>(dy + base + c * HW, x + base + c * HW, HW, mu, rs, gamma[c], beta[c],
                             static_cast<ShiftedSums*>(nullptr), gx + base + c * HW, ga, gb, dz.data() + c * HW);
        }
      }
    });
  } else {
    const auto [rows, chunks] = row_chunks(s);
    std::vector<acc_t> mu_c(N * C), rstd_c(N * C), a_c(N * C, acc_t(0)), b_c(N * C, acc_t(0));
    for (int64_t ng = 0; ng < N * G; ++ng) {  // per group, not c / Cg per channel (an idiv each)
      std::fill_n(mu_c.begin() + ng * Cg, Cg, mean[ng]);
      std::fill_n(rstd_c.begin() + ng * Cg, Cg, rstd[ng]);
    }
    std::vector<double> pds(N * chunks * C, 0.0), pdb(N * chunks * C, 0.0);
    // fp32, fp64: grad_x holds each element's dz exactly between the two passes (then dz is overwritten by
    // grad_x in place), so the second pass does not evaluate the activation's derivative again (fp32, SiLU:
    // the backward 1.36-1.41x faster at 1×512×32×32, 8×320×32×32 and 8×128×64×64 in an A/B of the two builds,
    // benchmarks/results/cpu-2026-12-01-group_norm_act.md). Half precision would round dz there, so it
    // evaluates it again.
    acc_t* dz_cache = nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) dz_cache = gx;
    auto rows_pass = [&](bool write_grad_x) {
      at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
        // tmp: the grad_x pass's row of x̂ and dz; ls, lb: the summing pass's lanes
        std::vector<acc_t> tmp(write_grad_x ? 2 * C : 0), ls(write_grad_x ? 0 : C), lb(write_grad_x ? 0 : C);
        for (int64_t nk = begin; nk < end; ++nk) {
          const int64_t n = nk / chunks, first = nk % chunks * rows, last = std::min(HW, first + rows);
          const ChannelCoefs<acc_t> k{mu_c.data() + n * C, rstd_c.data() + n * C, aff.gamma_of(n), aff.beta_of(n),
                                      a_c.data() + n * C, b_c.data() + n * C};
          for (int64_t r0 = first; r0 < last; r0 += kRowRun) {
            for (int64_t r = r0; r < std::min(last, r0 + kRowRun); ++r) {
              const int64_t off = (n * HW + r) * C;
              acc_t* dz = dz_cache != nullptr ? dz_cache + off : nullptr;
              backward_row<kAct>(dy + off, x + off, C, k, ls.data(), lb.data(),
                                 write_grad_x ? gx + off : static_cast<scalar_t*>(nullptr), tmp.data(),
                                 write_grad_x ? nullptr : dz, write_grad_x ? dz : nullptr);
            }
            if (write_grad_x) continue;
            for (int64_t c = 0; c < C; ++c) {  // the lanes into the chunk's double partials
              pds[nk * C + c] += ls[c];
              pdb[nk * C + c] += lb[c];
              ls[c] = lb[c] = acc_t(0);
            }
          }
        }
      });
    };
    rows_pass(false);  // 1. per-channel partial sums
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < chunks; ++k) {
        for (int64_t c = 0; c < C; ++c) {
          ds[n * C + c] += pds[(n * chunks + k) * C + c];
          db[n * C + c] += pdb[(n * chunks + k) * C + c];
        }
      }
    }
    if (gx != nullptr) {
      for (int64_t ng = 0; ng < N * G; ++ng) {
        acc_t ga, gb;
        group_terms(ng, &ga, &gb);
        for (int64_t c = ng % G * Cg; c < (ng % G + 1) * Cg; ++c) {
          a_c[ng / G * C + c] = ga;
          b_c[ng / G * C + c] = gb;
        }
      }
      rows_pass(true);  // 2. dx
    }
  }
  if (a.film()) film_backward<scalar_t>(a, ds, db);
  // dγ_c = Σ_n Σdz·x̂, dβ_c = Σ_n Σdz (with FiLM, the sums now carry (1 + s) of F3)
  auto reduce_over_batch = [&](const at::Tensor& out, const std::vector<double>& sums) {
    if (!out.defined()) return;
    // Row by row, all channels at once: the same additions in the same order per channel as a loop over n per
    // channel, which read with stride C and waited on one chain of N dependent additions per channel (a sixth of
    // the fp32 backward at 64×256×4×4 channels_last, one thread).
    std::vector<double> t(sums.begin(), sums.begin() + (N > 0 ? C : 0));
    for (int64_t n = 1; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) t[c] += sums[n * C + c];
    }
    auto write = [&](auto* o) {
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<std::remove_pointer_t<decltype(o)>>(N > 0 ? t[c] : 0.0);
    };
    // the parameters' dtype: x's, or float32 with a half x (mixed precision, group_norm_args.cpp)
    if (out.scalar_type() == a.x.scalar_type()) {
      write(out.mutable_data_ptr<scalar_t>());
    } else {
      write(out.mutable_data_ptr<float>());
    }
  };
  reduce_over_batch(a.grad_weight, db);
  reduce_over_batch(a.grad_bias, ds);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(const at::Tensor& x, int64_t num_groups,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias, double eps,
                                                                  std::string_view activation,
                                                                  const std::optional<at::Tensor>& scale,
                                                                  const std::optional<at::Tensor>& shift) {
  auto a = prepare_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_act_cpu", [&] {
    switch (a.activation) {
      case Activation::kSilu: forward<Activation::kSilu, scalar_t>(a); break;
      case Activation::kRelu: forward<Activation::kRelu, scalar_t>(a); break;
      default: forward<Activation::kNone, scalar_t>(a); break;
    }
  });
  return {a.y, a.mean, a.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
    std::string_view activation, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, std::array<bool, 2> scale_shift_mask) {
  auto a = prepare_group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask,
                                           scale, shift, scale_shift_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_act_backward_cpu", [&] {
    switch (a.activation) {
      case Activation::kSilu: backward<Activation::kSilu, scalar_t>(a); break;
      case Activation::kRelu: backward<Activation::kRelu, scalar_t>(a); break;
      default: backward<Activation::kNone, scalar_t>(a); break;
    }
  });
  return {a.grad_x, a.grad_weight, a.grad_bias, a.grad_scale, a.grad_shift};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CPU, m) {
  m.impl("group_norm_act", &group_norm_act_cpu);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cpu);
}

}  // namespace diffusion_ext
