"""Diffusion (training objective, samplers, classifier-free guidance), LatentDiffusion and the CUDA-graph
sampler, each against a loop written here from the schedule's ops and the papers' equations."""
import math

import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import reference
from diffusion_ext.diffusion import Diffusion, LatentDiffusion, measure_scale_factor
from diffusion_ext.sampling import GraphedSampler

T = 20
SHAPE = (3, 2, 4, 4)


class Toy(torch.nn.Module):
    """A fixed, smooth predictor that depends on x, t and (when num_classes is set) the class y, with the
    null class num_classes giving a different output than every real class."""

    def __init__(self, num_classes=None, out_channels=None):
        super().__init__()
        self.num_classes, self.out_channels = num_classes, out_channels
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape, None if y is None else y.clone()))
        s = t.float().view(-1, *([1] * (x.dim() - 1))) / T
        out = 0.5 * torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x + s)
        if self.num_classes is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            out = out + 0.2 * (y.to(x.dtype).view_as(s) + 1) * torch.cos(x)
        return out if self.out_channels is None else out[:, :self.out_channels]


def make(prediction_type="epsilon", schedule="linear"):
    return Diffusion(dx.NoiseSchedule(T, schedule), prediction_type)


def x_T(shape=SHAPE, seed=0):
    return reference.philox_normal(math.prod(shape), seed, 0).view(shape)


# ----------------------------------------------------------------------------------------------------
# training objective
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_loss_is_the_mse_to_the_parameterisations_target(prediction_type):
    diff, model = make(prediction_type), Toy()
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = diff.training_loss(model, x0, seed=7)
    # Ho et al. 2020, Alg. 1: t ~ U{0..T-1}, ε ~ N(0, I) (here Philox stream (7, 0)), x_t of eq. 4
    t = torch.randint(0, T, (SHAPE[0],), generator=torch.Generator().manual_seed(7))
    eps = reference.noise_like(x0, 7, 0)
    a = diff.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    expected = ((Toy()(x_t, t) - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_loss_is_min_snr_times_the_x0_error(prediction_type, gamma):
    # Hang et al. 2023: the weighted loss of every parameterisation is E_t[min(SNR_t, γ)·‖x0 − x̂0‖²], x̂0 the
    # model's estimate of x0 recovered from its output; derived here from x_t and the output, in float64
    diff = Diffusion(dx.NoiseSchedule(T, "cosine"), prediction_type, snr_gamma=gamma)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    loss = diff.training_loss(Toy(), x0.float(), seed=7)
    t = torch.randint(0, T, (SHAPE[0],), generator=torch.Generator().manual_seed(7))
    eps = reference.noise_like(x0.float(), 7, 0).double()
    a = diff.schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = Toy()(x_t.float(), t).double()
    x0_hat = {"epsilon": (x_t - (1 - a).sqrt() * out) / a.sqrt(), "sample": out,
              "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * out}[prediction_type]
    snr = (a / (1 - a)).flatten()
    expected = (torch.clamp(snr, max=gamma) * (x0 - x0_hat).square().flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-6)


def test_min_snr_weight_of_zero_snr_is_finite_and_gamma_is_checked():
    # ε-prediction at SNR 0 (a zero-terminal-SNR schedule's last step): min(SNR, γ)/SNR → 1, not 0/0
    w = Diffusion(dx.NoiseSchedule(T), "epsilon", snr_gamma=5.0).min_snr_weight(torch.tensor([0.0, 0.5, 1 - 1e-3]))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 5.0 / 999.0]), rtol=1e-4, atol=0)
    for bad in (0, -1.0, float("inf"), True, "5"):
        with pytest.raises(ValueError, match="Diffusion: snr_gamma"):
            Diffusion(dx.NoiseSchedule(T), snr_gamma=bad)


def test_training_loss_drops_labels_to_the_null_class():
    diff, model = make(), Toy(num_classes=3)
    y = torch.tensor([0, 1, 2])
    diff.training_loss(model, torch.zeros(SHAPE), y=y, seed=0, p_uncond=1.0)
    assert model.calls[-1][1].tolist() == [3, 3, 3]
    diff.training_loss(model, torch.zeros(SHAPE), y=y, seed=0, p_uncond=0.0)
    assert model.calls[-1][1].tolist() == [0, 1, 2]


def test_training_loss_concatenates_the_condition_on_channels():
    diff, model = make(), Toy(out_channels=2)
    cond = torch.ones(SHAPE[0], 1, 4, 4)
    diff.training_loss(model, torch.zeros(SHAPE), cond=cond, seed=0)
    assert model.calls[-1][0] == (SHAPE[0], 3, 4, 4)


@pytest.mark.parametrize("kw, match", [
    (dict(p_uncond=1.5), "p_uncond"),
    (dict(p_uncond=0.5), "class-conditional"),  # label dropping with an unconditional model
])
def test_training_loss_rejects(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        make().training_loss(Toy(), torch.zeros(SHAPE), seed=0, **kw)
    assert "Diffusion.training_loss" in str(e.value)


def test_training_loss_rejects_a_model_of_the_wrong_shape():
    with pytest.raises(ValueError, match="Diffusion.training_loss: the model returned shape"):
        make().training_loss(Toy(out_channels=1), torch.zeros(SHAPE), seed=0)


# ----------------------------------------------------------------------------------------------------
# samplers: Diffusion.sample against loops over the schedule's ops
# ----------------------------------------------------------------------------------------------------
def _pairs(plan):
    return [(s.t, s.t_prev) for s in plan]


def test_plan_visits_every_timestep_for_ddpm_and_respaces_ddim_and_dpm_solver():
    diff = make()
    assert _pairs(diff.sampler("ddpm").plan()) == [(t, t - 1) for t in range(T - 1, -1, -1)]
    ts = diff.schedule.timesteps(5).tolist()
    assert _pairs(diff.sampler("ddim").plan(5)) == list(zip(ts, ts[1:] + [-1]))
    # DPM-Solver++: diffusers' spacing (no model call at t = 0), first order at the first and the last step,
    # each step knowing the timestep of the one before
    plan = diff.sampler("dpmpp_2m").plan(5)
    ts = diff.schedule.timesteps(5, "linspace", clean_end=True).tolist()
    assert _pairs(plan) == list(zip(ts, ts[1:] + [-1])) and 0 not in ts
    assert [s.kind for s in plan] == ["first_order"] + ["second_order"] * 3 + ["first_order"]
    assert [s.t_last for s in plan[1:]] == ts[:-1]
    with pytest.raises(ValueError, match="steps"):
        diff.sampler("ddim").plan(T + 1)


def test_ddpm_sample_is_the_ancestral_chain():
    diff, model = make(), Toy()
    x = x_T(seed=5)
    for i, t in enumerate(range(T - 1, -1, -1)):  # Ho et al. 2020, Alg. 2, step i's noise from (seed, i + 1)
        tt = torch.full((SHAPE[0],), t)
        x = diff.schedule.ddpm_step(model(x, tt), tt, x, seed=5, offset=i + 1)
    out = diff.sample(model, SHAPE, sampler="ddpm", seed=5)
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=0, atol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_with_guidance_is_eq_6_then_eq_12(eta):
    """Classifier-free guidance ε̃ = ε_∅ + w·(ε_y − ε_∅) (Ho & Salimans 2022, eq. 6) combined in the fused
    step equals the combination done here and an unguided step on ε̃."""
    diff, model, w = make(), Toy(num_classes=3), 2.5
    y = torch.tensor([0, 2, 1])
    x = x_T(seed=9)
    plan = _pairs(diff.sampler("ddim").plan(6))
    for i, (t, t_prev) in enumerate(plan):
        tt = torch.full((SHAPE[0],), t)
        eps = model(x, tt, y)
        eps_null = model(x, tt, torch.full_like(y, 3))
        guided = eps_null + w * (eps - eps_null)
        x = diff.schedule.ddim_step(guided, tt, t_prev, x, eta, seed=9, offset=i + 1, clip_sample=True)
    out = diff.sample(model, SHAPE, sampler="ddim", steps=6, eta=eta, guidance_scale=w, y=y, seed=9)
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_sample_is_the_multistep_chain(sampler, prediction_type):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as a loop over the schedule's op: the first step first
    order, then each step given the x̂0 and timestep of the one before, the last step to the clean end;
    guidance combined in the op; step i's noise (SDE) from stream (seed, i + 1)."""
    diff, model, w = make(prediction_type), Toy(num_classes=3), 2.0
    y = torch.tensor([1, 0, 2])
    sde = sampler.endswith("sde")
    ts = diff.schedule.timesteps(7, "linspace", clean_end=True).tolist()
    x, x0, t_last = x_T(seed=4), None, None
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((SHAPE[0],), t)
        out, uncond = model(x, tt, y), model(x, tt, torch.full_like(y, 3))
        x, x0 = diff.schedule.dpmpp_2m_step(out, t, t_prev, x, x0 if t_prev >= 0 else None,
                                            t_last if t_prev >= 0 else None, sde=sde, seed=4, offset=i + 1,
                                            clip_sample=True, prediction_type=prediction_type, guidance_scale=w,
                                            model_output_uncond=uncond)
        t_last = t
    out = diff.sample(model, SHAPE, sampler=sampler, steps=7, guidance_scale=w, y=y, seed=4)
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-5, atol=1e-6)


def test_dpm_solver_sample_step_is_its_first_order_step_which_is_ddim():
    # The first-order DPM-Solver++ is DDIM with η = 0 (Lu et al. 2022, §4.1), unclipped (clipped, DDIM takes
    # ε̂ from the unclipped x̂0, as diffusers does, and DPM-Solver++ the clipped x̂0 itself)
    diff, model = make(), Toy()
    x = x_T(seed=1)
    a = diff.sample_step(model, x, 15, 9, sampler="dpmpp_2m", clip_range=None)
    torch.testing.assert_close(a, diff.sample_step(model, x, 15, 9, sampler="ddim", clip_range=None), rtol=1e-5,
                               atol=1e-5)


def test_sample_passes_the_condition_and_respects_clip_range_none():
    diff, model = make(), Toy(out_channels=2)
    cond = torch.full((SHAPE[0], 1, 4, 4), 0.5)
    out = diff.sample(model, SHAPE, steps=3, cond=cond, seed=1, clip_range=None)
    assert all(shape == (SHAPE[0], 3, 4, 4) for shape, _ in model.calls)
    assert out.shape == SHAPE and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, match", [
    (dict(guidance_scale=2.0), "needs class labels y"),
    (dict(y=torch.tensor([0, 1])), r"y must have shape \(3,\)"),
    (dict(cond=torch.zeros(2, 1, 4, 4)), "cond must be"),
    (dict(eta=-1.0), "eta"),
    (dict(sampler="euler"), "sampler"),
    (dict(sampler="dpmpp_2m", eta=0.5), "eta = 0.5 applies to the ddim sampler only"),
])
def test_sample_rejects(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        make().sample(Toy(num_classes=3), SHAPE, **kw)
    assert "Diffusion.sample" in str(e.value)


@pytest.mark.parametrize("t, t_prev", [(5, 5), (5, 7), (T, 3), (4, -2)])
def test_sample_step_rejects_an_impossible_step(t, t_prev):
    with pytest.raises(ValueError, match=r"Diffusion.sample_step: \(t, t_prev\)"):
        make().sample_step(Toy(), torch.zeros(SHAPE), t, t_prev)


def test_guidance_needs_a_class_conditional_model():
    with pytest.raises(ValueError, match="class-conditional"):
        make().sample(Toy(), SHAPE, guidance_scale=2.0, y=torch.zeros(3, dtype=torch.long))


def test_cuda_graph_sampling_needs_cuda():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        make().sample(Toy(), SHAPE, cuda_graph=True, device="cpu")


# ----------------------------------------------------------------------------------------------------
# GraphedSampler: the same step on static buffers (capture=False runs it eagerly, on any device)
# ----------------------------------------------------------------------------------------------------
def randn_chain(diff, model, sampler, plan, x, *, seed):
    """The chain as GraphedSampler runs it: noise from torch.randn before each step's model call, written
    here with the schedule's ops."""
    torch.manual_seed(seed)
    x0 = None
    for s in plan:
        noise = torch.randn(x.shape) if sampler != "ddim" else None
        tt = torch.full((x.shape[0],), s.t)
        out = model(x, tt)
        if s.kind == "ddpm":
            x = diff.schedule.ddpm_step(out, tt, x, noise)
        elif s.kind == "ddim":
            x = diff.schedule.ddim_step(out, tt, s.t_prev, x, 1.0, noise, clip_sample=True)
        else:
            second = s.kind == "second_order"
            x, x0 = diff.schedule.dpmpp_2m_step(out, tt, s.t_prev, x, x0 if second else None,
                                                s.t_last if second else None, sde=True, noise=noise, clip_sample=True)
    return x.clamp(-1, 1)


def test_graphed_ddim_eta0_equals_diffusion_sample():
    diff, model = make(), Toy()
    sampler = GraphedSampler(diff, model, SHAPE, sampler="ddim", steps=7, device="cpu")
    assert not sampler.capture
    torch.testing.assert_close(sampler(seed=3), diff.sample(model, SHAPE, steps=7, seed=3), rtol=0, atol=0)


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 15), ("dpmpp_2m_sde", 6)])
def test_graphed_noisy_chains_are_the_chain_with_torch_noise(sampler, steps):
    # steps=15 of T=20 ("linspace"): a respaced ddpm chain mixes DDPM steps (t_prev = t − 1) with DDIM η = 1;
    # the SDE DPM-Solver++ carries x̂0 from step to step in a static buffer
    diff, model = make(), Toy()
    plan = diff.sampler(sampler).plan(steps, "linspace")
    graphed = GraphedSampler(diff, model, SHAPE, sampler=sampler, steps=steps, spacing="linspace", device="cpu")
    if steps is not None:
        assert set(graphed.kinds) == ({"ddpm", "ddim"} if sampler == "ddpm" else {"first_order", "second_order"})
    torch.manual_seed(11)
    out = graphed(seed=2)
    expected = randn_chain(diff, model, sampler, plan, x_T(seed=2), seed=11)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_graphed_dpm_solver_equals_diffusion_sample():
    diff, model = make(), Toy()
    graphed = GraphedSampler(diff, model, SHAPE, sampler="dpmpp_2m", steps=8, device="cpu")
    torch.testing.assert_close(graphed(seed=3), diff.sample(model, SHAPE, sampler="dpmpp_2m", steps=8, seed=3),
                               rtol=0, atol=0)


def test_graphed_guidance_and_new_labels_per_call():
    diff, model, w = make(), Toy(num_classes=3), 3.0
    y1, y2 = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])
    sampler = GraphedSampler(diff, model, SHAPE, sampler="ddim", steps=5, guidance_scale=w, y=y1, device="cpu")
    first = sampler(seed=4)
    second = sampler(seed=4, y=y2)
    torch.testing.assert_close(first, diff.sample(model, SHAPE, steps=5, guidance_scale=w, y=y1, seed=4))
    torch.testing.assert_close(second, diff.sample(model, SHAPE, steps=5, guidance_scale=w, y=y2, seed=4))
    assert not torch.equal(first, second)


def test_graphed_sampler_rejects():
    diff, model = make(), Toy()
    with pytest.raises(ValueError, match="GraphedSampler: capture=True needs a CUDA device"):
        GraphedSampler(diff, model, SHAPE, device="cpu", capture=True)
    sampler = GraphedSampler(diff, model, SHAPE, steps=2, device="cpu")
    with pytest.raises(ValueError, match=r"GraphedSampler: x_T must have shape \(3, 2, 4, 4\)"):
        sampler(x_T=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="GraphedSampler: y must have the shape given at construction"):
        sampler(y=torch.zeros(3, dtype=torch.long))
    labelled = GraphedSampler(diff, Toy(num_classes=3), SHAPE, steps=2, guidance_scale=2.0,
                              y=torch.tensor([0, 1, 2]), device="cpu")
    with pytest.raises(ValueError, match=r"GraphedSampler: y holds labels outside 0..num_classes = 3"):
        labelled(y=torch.tensor([0, 4, 1]))  # a replay would hit a device assert: refused on the host
    with pytest.raises(ValueError, match="GraphedSampler: guidance_scale needs class labels"):
        GraphedSampler(diff, model, SHAPE, guidance_scale=2.0, device="cpu")
    with pytest.raises(TypeError, match="GraphedSampler: diffusion must be a Diffusion"):
        GraphedSampler(diff.schedule, model, SHAPE, device="cpu")
    with pytest.raises(ValueError, match="GraphedSampler: sampler 'euler' is unknown"):
        GraphedSampler(diff, model, SHAPE, sampler="euler", device="cpu")


def _tiny_unet(device, num_classes=None):
    from diffusion_ext.models import UNet

    torch.manual_seed(0)
    return UNet(in_channels=3, out_channels=3, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), image_size=16, dropout=0.1, head_dim=16, num_groups=8,
                num_classes=num_classes, fused=True).to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_replay_equals_the_eager_step_on_cuda():
    """DDIM η = 0 draws no noise: the replayed graph must reproduce the uncaptured chain, with guidance."""
    diff = Diffusion(dx.NoiseSchedule(1000))
    model = _tiny_unet("cuda", num_classes=4)
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    kw = dict(sampler="ddim", steps=20, guidance_scale=2.0, y=y, device="cuda")
    graphed = GraphedSampler(diff, model, (4, 3, 16, 16), capture=True, **kw)
    eager = GraphedSampler(diff, model, (4, 3, 16, 16), capture=False, **kw)
    assert model.training  # capture put it in eval mode and back
    torch.testing.assert_close(graphed(seed=1), eager(seed=1), rtol=1e-4, atol=1e-4)
    diff.schedule.to("cpu").to("cuda")  # drops the schedule's cached ᾱ table: the graph must not read it freed
    torch.cuda.empty_cache()
    torch.testing.assert_close(graphed(seed=1), eager(seed=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed(seed=1), diff.sample(model, (4, 3, 16, 16), steps=20, guidance_scale=2.0, y=y,
                                                             seed=1, device="cuda"), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graphed_dpm_solver_replays_both_orders_and_carries_x0_on_cuda():
    """DPM-Solver++(2M) draws no noise: its two graphs (first and second order), with the last x̂0 in a static
    buffer, reproduce the eager chain."""
    diff = Diffusion(dx.NoiseSchedule(1000))
    model = _tiny_unet("cuda", num_classes=4)
    y = torch.tensor([3, 2, 1, 0], device="cuda")
    kw = dict(sampler="dpmpp_2m", steps=10, guidance_scale=2.0, y=y, device="cuda")
    graphed = GraphedSampler(diff, model, (4, 3, 16, 16), capture=True, **kw)
    assert set(graphed.graphs) == {"first_order", "second_order"}
    eager = diff.sample(model, (4, 3, 16, 16), seed=1, **kw)
    torch.testing.assert_close(graphed(seed=1), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(graphed(seed=1), eager, rtol=1e-4, atol=1e-4)  # the state is reset per call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graphed_ddpm_draws_fresh_noise_per_replay_and_follows_the_seed():
    diff = Diffusion(dx.NoiseSchedule(100))
    sampler = GraphedSampler(diff, _tiny_unet("cuda"), (2, 3, 16, 16), sampler="ddpm", device="cuda")
    assert len(sampler.kinds) == 100 and set(sampler.graphs) == {"ddpm"}
    torch.cuda.manual_seed(5)
    a = sampler(seed=0)
    b = sampler(seed=0)
    torch.cuda.manual_seed(5)
    c = sampler(seed=0)
    assert torch.isfinite(a).all() and a.abs().max() <= 1
    assert not torch.equal(a, b)  # the steps' noise is drawn afresh by every replay
    torch.testing.assert_close(a, c, rtol=0, atol=0)  # ... from torch's CUDA generator
    d = diff.sample(sampler.model, (2, 3, 16, 16), sampler="ddpm", seed=0, device="cuda", cuda_graph=True)
    assert d.shape == a.shape and torch.isfinite(d).all() and d.abs().max() <= 1


# ----------------------------------------------------------------------------------------------------
# latent diffusion
# ----------------------------------------------------------------------------------------------------
class LinearVAE(torch.nn.Module):
    """μ = 2x (channels kept), log σ² = log 0.25: z = μ + 0.5·ε; decode divides by 2."""
    latent_channels, downsample_factor = 2, 1

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where measure_scale_factor looks for the device

    def encode(self, x):
        return 2 * x, torch.full_like(x, math.log(0.25))

    def reparameterize(self, mu, logvar):
        return mu + (0.5 * logvar).exp() * torch.randn_like(mu)

    def decode(self, z):
        return z / 2


def test_measure_scale_factor_is_one_over_the_latent_std():
    torch.manual_seed(0)
    batches = [torch.rand(64, 2, 8, 8) * 2 - 1 for _ in range(4)]  # U(−1, 1): var 1/3
    f = measure_scale_factor(LinearVAE(), batches)
    # z = 2x + 0.5ε: var = 4/3 + 1/4
    assert f == pytest.approx(1 / math.sqrt(4 / 3 + 0.25), rel=0.02)
    with pytest.raises(ValueError, match="measure_scale_factor: batches held no images"):
        measure_scale_factor(LinearVAE(), [])


def test_latent_diffusion_scales_then_decodes():
    vae, diff, model = LinearVAE(), make(), Toy()
    ld = LatentDiffusion(vae, diff, 0.5)
    x = torch.rand(2, 2, 4, 4)
    torch.manual_seed(0)
    z = ld.encode(x)
    torch.manual_seed(0)
    torch.testing.assert_close(z, 0.5 * (2 * x + 0.5 * torch.randn_like(x)))
    torch.testing.assert_close(ld.decode(z), z / 0.5 / 2)
    images = ld.sample(model, 2, image_size=4, steps=3, seed=0)
    latents = diff.sample(model, (2, 2, 4, 4), steps=3, seed=0, clip_range=None)
    torch.testing.assert_close(images, latents / 0.5 / 2)
    for bad in (0.0, float("nan"), True):
        with pytest.raises(ValueError, match="LatentDiffusion: scale_factor"):
            LatentDiffusion(vae, diff, bad)
