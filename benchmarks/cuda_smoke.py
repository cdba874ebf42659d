"""Every CUDA kernel once, on small inputs, checked against the eager reference: what one GPU lease runs
under compute-sanitizer memcheck (benchmarks/gpu_check.sh, call 1), where a whole test suite would take
too long (memcheck slows each kernel 10-100×).

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_smoke.py cuda
    python benchmarks/cuda_smoke.py cpu      # the same calls on the CPU kernels (gpu_check.sh --dry-run)

The cases reach each kernel family and its main branches: the schedule kernels with vector and scalar
access (aligned, misaligned, per-sample sizes not a multiple of 4), noise given, made, and per-sample
streams, guidance, the coefficient pre-pass; group norm channels-first and channels-last, one group and
many, the split path of a large group, forward and backward; attention on the tensor-core path (fp16,
bf16; head dims 32 to 256) and the SIMT path (fp32, fp64), Lq ≠ Lk and L = 1, forward and backward;
dropout aligned, misaligned and channels_last, forward and backward.
Exit status 1 when a result is off (a loose check: this is about memory errors, the tests check accuracy).
"""
from __future__ import annotations

import sys
import time

import torch

import diffusion_ext as dx
from diffusion_ext import ops, reference

FAILED: list[str] = []


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
    ok = out.shape == ref.shape and err <= tol * scale
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max error {err:.3g}", flush=True)
    if not ok:
        FAILED.append(name)


TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def schedule_cases(device):
    g = torch.Generator().manual_seed(0)
    table = dx.NoiseSchedule(1000, "linear").alphas_cumprod.to(device)
    for dtype, shape, layout in ((torch.float32, (4, 3, 8, 8), "contiguous"), (torch.bfloat16, (4, 3, 8, 8), "channels_last"),
                                 (torch.float16, (3, 5, 7), "contiguous"), (torch.float64, (2, 9), "misaligned")):
        def rand():
            x = torch.randn((shape[0], *shape[1:]), generator=g, dtype=torch.float64)
            if layout == "misaligned":
                x = torch.cat([torch.zeros(1, dtype=torch.float64), x.flatten()])[1:].view(shape)
            x = x.to(device, dtype)
            return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        x0, noise, m, mu = rand(), rand(), rand(), rand()
        t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
        t[0] = 0
        name = f"{str(dtype)[6:]} {'x'.join(map(str, shape))} {layout}"
        check(f"q_sample {name}", ops.q_sample(x0, t, noise, table), reference.q_sample(x0, t, noise, table),
              TOL[dtype])
        for streams in (False, True):
            out, z = ops.q_sample_with_noise(x0, t, table, 11, 3, streams)
            check(f"q_sample_with_noise per_sample_streams={streams} {name}", out,
                  reference.q_sample(x0, t, z, table), TOL[dtype])
        check(f"ddpm_step noise given, guided {name}",
              ops.ddpm_step(m, t, x0, table, noise, guidance_scale=3.0, model_output_uncond=mu),
              reference.ddpm_step(m, t, x0, table, noise, guidance_scale=3.0, model_output_uncond=mu), TOL[dtype])
        check(f"ddpm_step noise made, v_prediction {name}",
              ops.ddpm_step(m, t, x0, table, None, 5, 2, prediction_type="v_prediction"),
              reference.ddpm_step(m, t, x0, table, None, 5, 2, prediction_type="v_prediction"), TOL[dtype])
        t_prev = (t - 20).clamp(min=-1)
        for eta in (0.0, 1.0):
            check(f"ddim_step eta={eta} {name}", ops.ddim_step(m, t, t_prev, x0, table, eta, None, 9, 4),
                  reference.ddim_step(m, t, t_prev, x0, table, eta, None, 9, 4), TOL[dtype])


def group_norm_cases(device):
    g = torch.Generator().manual_seed(1)
    for dtype, shape, G, layout, act in ((torch.float32, (2, 64, 16, 16), 32, "contiguous", "silu"),
                                         (torch.bfloat16, (2, 64, 16, 16), 32, "channels_last", "silu"),
                                         (torch.float16, (2, 32, 1, 1), 1, "contiguous", "relu"),
                                         (torch.float32, (1, 32, 96, 96), 1, "channels_last", "none"),
                                         (torch.float32, (1, 64, 128, 128), 8, "contiguous", "silu"),
                                         (torch.float64, (3, 12, 5, 7), 4, "channels_last", "silu")):
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(shape[1], generator=g, dtype=torch.float64).to(device, dtype)
        b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(device, dtype)
        gy = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = ops.group_norm_act(*leaves[:1], G, *leaves[1:], 1e-5, act)
        grads = torch.autograd.grad(y, leaves, gy)
        ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
        y_ref = reference.group_norm_act(ref_leaves[0], G, *ref_leaves[1:], 1e-5, act)
        ref_grads = torch.autograd.grad(y_ref, ref_leaves, gy.double())
        name = f"group_norm_act {str(dtype)[6:]} {'x'.join(map(str, shape))} G={G} {layout} {act}"
        check(name, y, y_ref, TOL[dtype])
        for what, a, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            check(f"{name} {what}", a, r, 20 * TOL[dtype])


def attention_cases(device):
    g = torch.Generator().manual_seed(2)
    for dtype, B, H, Lq, Lk, D in ((torch.float16, 2, 2, 77, 77, 64), (torch.bfloat16, 1, 2, 130, 64, 128),
                                   (torch.bfloat16, 1, 1, 33, 17, 32), (torch.float16, 1, 1, 40, 40, 256),
                                   (torch.float32, 2, 1, 50, 37, 40), (torch.float64, 1, 2, 1, 9, 32)):
        q = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        k, v = (torch.randn(B, H, Lk, D, generator=g).to(device, dtype) for _ in range(2))
        go = torch.randn(B, H, Lq, D, generator=g).to(device, dtype)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves)
        grads = torch.autograd.grad(out, leaves, go)
        ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*ref_leaves)
        ref_grads = torch.autograd.grad(ref, ref_leaves, go.double())
        name = f"attention {str(dtype)[6:]} B={B} H={H} Lq={Lq} Lk={Lk} D={D}"
        check(name, out, ref, TOL[dtype])
        for what, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            check(f"{name} {what}", a, r, 4 * TOL[dtype])


def dropout_cases(device):
    g = torch.Generator().manual_seed(3)
    for dtype, shape, layout in ((torch.float32, (4, 8, 9, 9), "contiguous"), (torch.bfloat16, (2, 8, 5, 5), "channels_last"),
                                 (torch.float16, (3, 7), "misaligned"), (torch.float64, (5, 3, 2), "contiguous")):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if layout == "misaligned":
            x = torch.cat([torch.zeros(1, dtype=torch.float64), x.flatten()])[1:].view(shape)
        x = x.to(device, dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        leaf = x.detach().requires_grad_()
        y = ops.dropout(leaf, 0.3, 17, 2)
        (gx,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        name = f"dropout {str(dtype)[6:]} {'x'.join(map(str, shape))} {layout}"
        check(name, y, reference.dropout(x.double(), 0.3, 17, 2), TOL[dtype])
        check(f"{name} backward", gx, reference.dropout(torch.ones_like(x, dtype=torch.float64), 0.3, 17, 2), TOL[dtype])


def main(argv) -> int:
    device = torch.device(argv[1] if len(argv) > 1 else "cuda")
    backend = "cuda" if device.type == "cuda" else "cpu"
    t0 = time.time()
    with dx.use_backend(backend):
        for cases in (schedule_cases, group_norm_cases, attention_cases, dropout_cases):
            cases(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_smoke: backend {backend}, {len(FAILED)} failed, {time.time() - t0:.1f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
