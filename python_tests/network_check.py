"""Comparing a whole network with its eager twin: output and every gradient, against an fp64 oracle.

Shared by the tests of our own models (test_models.py) and of patched diffusers models
(test_diffusers_integration.py): the fused network in a dtype against the eager one in fp64, with
tolerances.py's rule lifted to a network (assert_fused_matches_eager).
"""
import math

import torch
from tolerances import FLOOR, max_err


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight ~ N(0, 1/fan_in), every bias and norm parameter perturbed by N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * r.to(p.dtype))
    return model


def out_and_grads(model, fn, x, g_out):
    """fn(model, x) and the gradients of <fn(model, x), g_out> w.r.t. x and every named parameter."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = fn(model, x)
    out.backward(g_out.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def rel_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    return max_err(a, ref64) / max(ref64.abs().max().item(), 1e-300)


def _is_zero_grad(name: str, zero_grads: tuple[str, ...]) -> bool:
    return any(name == z or name.endswith("." + z) for z in zero_grads)


def rel_errs(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], zero_grads: tuple[str, ...] = ()) -> dict[str, float]:
    """name -> the error of pairs[name][0] against the oracle pairs[name][1], relative to the oracle's largest
    entry. Names ending in one of zero_grads are gradients that vanish in exact arithmetic (a key bias:
    softmax(q·(k + b)ᵀ) = softmax(q·kᵀ), the shift q·b being the same for every key): their oracle is
    rounding noise, so their error is measured against the largest gradient entry of all instead."""
    scale = max(r64.abs().max().item() for n, (_, r64) in pairs.items() if n != "out")
    out = {}
    for n, (a, r64) in pairs.items():
        if _is_zero_grad(n, zero_grads):
            assert r64.abs().max().item() <= 1e-9 * scale, f"{n}: its gradient is not zero after all"
            out[n] = max_err(a, r64) / scale
        else:
            out[n] = rel_err(a, r64)
    return out


def worst_rel_err(out, grads, out64, grads64, zero_grads: tuple[str, ...] = ()) -> float:
    """The largest relative error over the output and every gradient of the oracle's."""
    pairs = {"out": (out, out64), **{n: (grads[n], grads64[n]) for n in grads64}}
    return max(rel_errs(pairs, zero_grads).values())


def assert_fused_matches_eager(model, eager, fn, x, device, dtype, memory_format=torch.contiguous_format,
                               zero_grads: tuple[str, ...] = (), factor: float = 2.0):
    """`model` (the fused one, usually) in `dtype` and `memory_format` against the eager model in fp64, for
    the output and the gradients w.r.t. x and every parameter.

    The tolerance is tolerances.py's rule lifted to a whole network: every tensor's error, relative to its
    largest entry, is at most twice the eager model's worst relative error in the same dtype over all these
    tensors, plus FLOOR[dtype]. Tensor by tensor the per-op rule does not hold for a network (which
    gradient rounds worst depends on summation orders), while the worst case does: over 16 seeds × both
    models × both layouts the fused fp32 model used at most 0.66 of this bound. In fp64 the eager model is
    the oracle itself, so the bound is FLOOR[float64] relative. zero_grads: see rel_errs. factor: the "twice"
    of the rule, for networks whose worst case has a longer tail (see its callers)."""
    g = torch.Generator().manual_seed(7)
    eager64 = eager.to(device, torch.float64)
    x64 = x.to(device, torch.float64)
    with torch.no_grad():
        shape = fn(eager64, x64).shape
    g_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    out64, grads64 = out_and_grads(eager64, fn, x64, g_out)
    if dtype == torch.float64:
        ref, ref_grads = out64, grads64
    else:
        eager_d = eager.to(device, dtype)
        ref, ref_grads = out_and_grads(eager_d, fn, x.to(device, dtype), g_out)
    model_d = model.to(device, dtype).to(memory_format=memory_format)
    xd = x.to(device, dtype).contiguous(memory_format=memory_format)
    out, grads = out_and_grads(model_d, fn, xd, g_out)
    assert out.abs().max() > 0.1, "the comparison is vacuous: the output is ~0"
    assert out.dtype == dtype and set(grads) == set(grads64)
    triples = {"out": (out, ref, out64), **{n: (grads[n], ref_grads[n], grads64[n]) for n in grads64}}
    for n, (o, r, r64) in triples.items():
        assert o is not None and r64 is not None and o.shape == r64.shape, n
    bound = factor * max(rel_errs({n: (r, r64) for n, (_, r, r64) in triples.items()}, zero_grads).values()) + \
        FLOOR[dtype]
    errs = rel_errs({n: (o, r64) for n, (o, _, r64) in triples.items()}, zero_grads)
    bad = {n: f"{e:.3g}" for n, e in errs.items() if not e <= bound}
    assert not bad, f"relative errors above {bound:.3g} (dtype {dtype}): {bad}"


def assert_autocast_matches_eager(fused, eager, eager64, fn, x, g_out, dtype=torch.bfloat16,
                                  zero_grads: tuple[str, ...] = (), factor: float = 2.0) -> None:
    """Mixed precision as a trainer runs it (fp32 parameters, `dtype` activations from autocast): against
    eager64 (the eager network in fp64), the fused network's worst relative error over the output and every
    gradient is at most twice (factor) the eager network's under the same autocast, plus FLOOR[dtype];
    parameters' gradients stay fp32."""
    out64, grads64 = out_and_grads(eager64, fn, x.double(), g_out.double())
    worst = {}
    for name, model in (("fused", fused), ("eager", eager)):
        with torch.autocast(x.device.type, dtype=dtype):
            out, grads = out_and_grads(model, fn, x.float(), g_out.float())
        assert all(grads[n].dtype == torch.float32 for n in grads64 if n != "x"), "parameters stay fp32"
        worst[name] = worst_rel_err(out, grads, out64, grads64, zero_grads)
    assert worst["fused"] <= factor * worst["eager"] + FLOOR[dtype], worst
