"""NoiseSchedule.timesteps: the spacings of diffusers' schedulers in both of its conventions (DDPM and DDIM:
the n timesteps spaced down to t = 0; DPM-Solver: n + 1 points with the clean end last, clean_end=True), and
Karras et al.'s noise levels rounded to the table's timesteps, each against diffusers' own set_timesteps."""
import pytest

import diffusion_ext as dx

STEPS = [1, 5, 10, 20, 50]


def _ours(scheduler):
    return dx.NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod.double())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_convention_is_diffusers_ddim_scheduler(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ddim.set_timesteps(steps)
    assert _ours(ddim).timesteps(steps, spacing).tolist() == ddim.timesteps.tolist()


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras"])
@pytest.mark.parametrize("steps", STEPS)
def test_clean_end_convention_is_diffusers_dpm_solver(beta_schedule, spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    kw = dict(use_karras_sigmas=True) if spacing == "karras" else dict(timestep_spacing=spacing)
    dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                                beta_start=0.00085 if beta_schedule == "scaled_linear" else 1e-4,
                                                beta_end=0.012 if beta_schedule == "scaled_linear" else 0.02, **kw)
    dpm.set_timesteps(steps)
    theirs = dpm.timesteps.tolist()
    if len(set(theirs)) < len(theirs):
        # karras with many steps: diffusers keeps two unrounded σ at one timestep; the ops take the table's σ(t),
        # so one of our steps would have h = 0: refused
        with pytest.raises(ValueError, match=f"NoiseSchedule.timesteps: {steps} karras steps round two noise"):
            _ours(dpm).timesteps(steps, spacing, clean_end=True)
        return
    ours = _ours(dpm).timesteps(steps, spacing, clean_end=True).tolist()
    assert ours == theirs
    assert 0 not in ours or spacing == "karras"  # no model call at t = 0 (karras ends at σ_min = σ(0))
