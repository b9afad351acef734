#!/usr/bin/env python3
"""Reference runs of every sampler for crates/pipeline/tests/sampler_parity.rs.

No UNet: an analytic stand-in "network" that Rust computes identically,

    f(x_in, t) = tanh(0.5 * x_in + 0.001 * t) + 0.1 * x_in

read as an epsilon prediction ("eps") or as a v prediction ("v"). x_in is what the UNet
would see (x / sqrt(sigma^2 + 1) in k-diffusion terms, the VP latent in diffusers terms).

References (A1111 runs these):
  * k-diffusion (PyPI `k-diffusion`): sample_euler, sample_euler_ancestral, sample_heun,
    sample_dpm_2, sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_2m,
    sample_lms, get_sigmas_karras, and CompVisDenoiser / CompVisVDenoiser around the
    stand-in (non-quantised sigma -> t, as A1111 uses it);
  * diffusers: DDIMScheduler (A1111's DDIM = diffusers' "leading" DDIM without its final
    step), PNDMScheduler with skip_prk_steps (A1111's PLMS, CompVis's: the same first
    "pseudo improved Euler" step and Adams-Bashforth steps, without diffusers' final step),
    UniPCMultistepScheduler (bh1/bh2, order 3, lower_order_final), LCMScheduler.

`--only plms` writes fixtures/samplers/plms.safetensors alone (it needs diffusers and torch,
not k-diffusion).

Only `k_diffusion.sampling` and `k_diffusion.external` are imported (the package root
pulls in image/eval dependencies). Set-up:

    pip install --no-deps k-diffusion==0.1.1.post1 && pip install scipy torchsde torchdiffeq
    python3 scripts/make_sampler_fixtures.py   # writes fixtures/samplers/*.safetensors

Every tensor is float32 except the sigma lists, stored as float64.
"""
import importlib.util
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fixtures", "samplers")
SHAPE = (1, 4, 8, 8)


def import_k_diffusion():
    """k_diffusion.sampling/external without the package __init__ (and its heavy deps)."""
    spec = importlib.util.find_spec("k_diffusion")
    pkg_dir = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [pkg_dir]
    sys.modules["k_diffusion"] = pkg
    # sampling/external only need utils.append_dims; the real utils imports torchvision.
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    sys.modules["k_diffusion.utils"] = utils
    pkg.utils = utils
    import k_diffusion.sampling as sampling  # noqa: E402
    import k_diffusion.external as external  # noqa: E402

    return sampling, external


ONLY_PLMS = sys.argv[1:] == ["--only", "plms"]
SAMPLING, EXTERNAL = (None, None) if ONLY_PLMS else import_k_diffusion()


def stand_in(x_in, t):
    t = torch.as_tensor(t, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    return torch.tanh(0.5 * x_in + 0.001 * t) + 0.1 * x_in


def ldm_alphas_cumprod():
    """LDM's make_beta_schedule('linear') as SD checkpoints register it: float64 maths,
    stored as float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class StandInLdm(torch.nn.Module):
    """What k-diffusion's CompVis wrappers expect of an LDM: alphas_cumprod, apply_model."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())

    def apply_model(self, x, t, cond=None, **_):
        return stand_in(x, t)


MODEL = StandInLdm()
WRAPPED = {} if ONLY_PLMS else {
    "eps": EXTERNAL.CompVisDenoiser(MODEL),
    "v": EXTERNAL.CompVisVDenoiser(MODEL),
}


class Recorder:
    """A k-diffusion noise_sampler that hands out (and keeps) seeded draws."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, sigma, sigma_next):
        n = torch.randn(SHAPE, generator=self.gen)
        self.drawn.append(n)
        return n


def noise_stack(drawn):
    return torch.stack(drawn) if drawn else torch.zeros((0, *SHAPE))


def f64(values):
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def a1111_sigmas(denoiser, steps, scheduler, discard_penultimate=False):
    """A1111's KDiffusionSampler.get_sigmas for 'Automatic'/'karras'."""
    n = steps + 1 if discard_penultimate else steps
    if scheduler == "karras":
        sigmas = SAMPLING.get_sigmas_karras(
            n, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
        )
    elif scheduler == "exponential":
        sigmas = SAMPLING.get_sigmas_exponential(
            n, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
        )
    else:
        sigmas = denoiser.get_sigmas(n)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


K_SAMPLERS = {
    "euler": ("sample_euler", False, False),
    "euler_a": ("sample_euler_ancestral", True, False),
    "heun": ("sample_heun", False, False),
    "dpm2": ("sample_dpm_2", False, True),
    "dpm2_a": ("sample_dpm_2_ancestral", True, True),
    "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", True, False),
    "dpmpp_2m": ("sample_dpmpp_2m", False, False),
    "lms": ("sample_lms", False, False),
}


def k_cases(out):
    steps = 6
    for pred, denoiser in WRAPPED.items():
        for name, (func, ancestral, discard) in K_SAMPLERS.items():
            for sched in ["normal", "karras"] if name == "dpmpp_2m" else ["normal"]:
                seed = len(out)
                gen = torch.Generator().manual_seed(1000 + seed)
                sigmas = a1111_sigmas(denoiser, steps, sched, discard)
                x = torch.randn(SHAPE, generator=gen) * sigmas[0]
                kwargs = {}
                rec = Recorder(2000 + seed)
                if ancestral:
                    kwargs["noise_sampler"] = rec
                result = getattr(SAMPLING, func)(
                    denoiser, x.clone(), sigmas, extra_args={"cond": None}, disable=True, **kwargs
                )
                case = f"{name}.{sched}.{pred}"
                out[f"{case}.sigmas"] = f64(sigmas.numpy())
                out[f"{case}.x"] = x
                out[f"{case}.noise"] = noise_stack(rec.drawn)
                out[f"{case}.out"] = result


def diffusers_model_output(sample_vp, t, pred):
    """The stand-in on the diffusers side (its model input is the VP latent itself)."""
    return stand_in(sample_vp, float(t))


def ddim_cases(out):
    from diffusers import DDIMScheduler

    for steps in (5, 8):
        for pred in ("eps", "v"):
            sched = DDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
                timestep_spacing="leading",
                prediction_type="epsilon" if pred == "eps" else "v_prediction",
            )
            sched.set_timesteps(steps)
            gen = torch.Generator().manual_seed(3000 + steps)
            x = torch.randn(SHAPE, generator=gen)
            sample = x.clone()
            # A1111's DDIM stops one step early: it ends at alphas_cumprod[1], not [0].
            for t in sched.timesteps[:-1]:
                model_out = diffusers_model_output(sample, t, pred)
                sample = sched.step(model_out, t, sample, eta=0.0).prev_sample
            case = f"ddim.{steps}.{pred}"
            out[f"{case}.timesteps"] = f64(sched.timesteps.numpy())
            out[f"{case}.x"] = x
            out[f"{case}.out"] = sample


def plms_cases(out):
    """eps only: for a v-prediction model diffusers combines the v outputs of several steps
    and converts the combination to eps at the current step, where A1111 (and sdkube)
    combine each step's eps; the two agree only for eps models."""
    from diffusers import PNDMScheduler

    for steps in (5, 8):
        for pred in ("eps",):
            sched = PNDMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                skip_prk_steps=True,
                set_alpha_to_one=False,
                steps_offset=1,
                timestep_spacing="leading",
                prediction_type="epsilon" if pred == "eps" else "v_prediction",
            )
            sched.set_timesteps(steps)
            gen = torch.Generator().manual_seed(3100 + steps)
            x = torch.randn(SHAPE, generator=gen)
            sample = x.clone()
            # The first timestep comes twice (the second model call of the first step); like
            # A1111's DDIM, A1111's PLMS ends at t = 1: diffusers' last step is left out.
            for t in sched.timesteps[:-1]:
                model_out = diffusers_model_output(sample, t, pred)
                sample = sched.step(model_out, t, sample).prev_sample
            case = f"plms.{steps}.{pred}"
            out[f"{case}.timesteps"] = f64(sched.timesteps.numpy())
            out[f"{case}.x"] = x
            out[f"{case}.out"] = sample


def unipc_cases(out):
    from diffusers import UniPCMultistepScheduler

    steps = 6
    # bh1 cannot step to sigma = 0 (B(h) = h is infinite there; diffusers returns NaN),
    # and A1111's UniPC never does: it stops at timestep 0.
    for variant, final in (("bh1", "sigma_min"), ("bh2", "sigma_min"), ("bh2", "zero")):
        for pred in ("eps", "v"):
            sched = UniPCMultistepScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                solver_order=3,
                solver_type=variant,
                lower_order_final=True,
                predict_x0=True,
                final_sigmas_type=final,
                prediction_type="epsilon" if pred == "eps" else "v_prediction",
            )
            sched.set_timesteps(steps)
            gen = torch.Generator().manual_seed(4000 + len(out))
            x = torch.randn(SHAPE, generator=gen)
            sample = x.clone()
            for t in sched.timesteps:
                model_out = diffusers_model_output(sample, t, pred)
                sample = sched.step(model_out, t, sample).prev_sample
            case = f"unipc.{variant}.{final}.{pred}"
            out[f"{case}.sigmas"] = f64(sched.sigmas.numpy())
            out[f"{case}.x"] = x
            out[f"{case}.out"] = sample


def lcm_cases(out):
    from diffusers import LCMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    steps = 4
    for pred in ("eps", "v"):
        sched = LCMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            set_alpha_to_one=False,
            original_inference_steps=50,
            timestep_scaling=10.0,
            prediction_type="epsilon" if pred == "eps" else "v_prediction",
        )
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(5000 + len(out))
        x = torch.randn(SHAPE, generator=gen)
        sample = x.clone()
        step_gen = torch.Generator().manual_seed(6000)
        for t in sched.timesteps:
            model_out = diffusers_model_output(sample, t, pred)
            res = sched.step(model_out, t, sample, generator=step_gen)
            sample = res.prev_sample
        final = res.denoised
        # Replay the generator to record the noise LCMScheduler drew between steps.
        replay = torch.Generator().manual_seed(6000)
        drawn = [
            randn_tensor(SHAPE, generator=replay) for _ in range(len(sched.timesteps) - 1)
        ]
        case = f"lcm.{pred}"
        out[f"{case}.timesteps"] = f64(sched.timesteps.numpy())
        out[f"{case}.x"] = x
        out[f"{case}.noise"] = noise_stack(drawn)
        out[f"{case}.out"] = final


def schedule_cases(out):
    """Sigma lists as A1111 builds them, for Rust's Plan constructors."""
    den = WRAPPED["eps"]
    for steps in (1, 2, 7, 20, 50):
        out[f"sched.normal.{steps}"] = f64(a1111_sigmas(den, steps, "normal").numpy())
        out[f"sched.karras.{steps}"] = f64(a1111_sigmas(den, steps, "karras").numpy())
        out[f"sched.exponential.{steps}"] = f64(
            a1111_sigmas(den, steps, "exponential").numpy()
        )
        out[f"sched.dpm2.{steps}"] = f64(a1111_sigmas(den, steps, "normal", True).numpy())
        # A1111 sd_schedulers.sgm_uniform.
        start = den.sigma_to_t(den.sigmas[-1])
        end = den.sigma_to_t(den.sigmas[0])
        ts = torch.linspace(float(start), float(end), steps + 1)[:-1]
        sgm = [den.t_to_sigma(t).item() for t in ts] + [0.0]
        out[f"sched.sgm_uniform.{steps}"] = f64(sgm)
        # A1111 LCMCompVisDenoiser.get_sigmas on its 50 valid levels.
        valid = MODEL.alphas_cumprod[19::20]
        lcm = EXTERNAL.DiscreteSchedule(((1 - valid) / valid) ** 0.5, quantize=False)
        u = torch.clamp((torch.linspace(999, 19, steps) - 19) / 20, 0, 49)
        out[f"sched.lcm.{steps}"] = f64(SAMPLING.append_zero(lcm.t_to_sigma(u)).numpy())
    # img2img: A1111 sample_img2img slices sigmas[steps - t_enc - 1:].
    for steps, strength in ((20, 0.75), (10, 0.3), (8, 1.0), (6, 0.0)):
        t_enc = int(min(strength, 0.999) * steps)
        full = a1111_sigmas(den, steps, "normal")
        key = f"img2img.normal.{steps}.{int(strength * 100)}"
        out[key] = f64(full[steps - t_enc - 1 :].numpy())
    # The denoiser's sigma -> t at a few points (non-quantised, log-sigma interpolation).
    probe = torch.tensor([0.03, 0.1, 0.5, 1.0, 3.3, 9.9, 14.6], dtype=torch.float32)
    out["sigma_to_t.sigma"] = f64(probe.numpy())
    out["sigma_to_t.t"] = f64(den.sigma_to_t(probe).numpy())


def main():
    os.makedirs(OUT, exist_ok=True)
    if ONLY_PLMS:
        plms = {}
        plms_cases(plms)
        save_file({k: v.contiguous() for k, v in plms.items()}, os.path.join(OUT, "plms.safetensors"))
        print(f"wrote {len(plms)} PLMS tensors to {OUT}")
        return
    runs = {}
    k_cases(runs)
    ddim_cases(runs)
    unipc_cases(runs)
    lcm_cases(runs)
    for k, v in runs.items():
        if not torch.isfinite(v).all():
            raise SystemExit(f"reference {k} is not finite")
    save_file({k: v.contiguous() for k, v in runs.items()}, os.path.join(OUT, "runs.safetensors"))
    sched = {}
    schedule_cases(sched)
    save_file({k: v.contiguous() for k, v in sched.items()}, os.path.join(OUT, "schedules.safetensors"))
    print(f"wrote {len(runs)} run tensors and {len(sched)} schedule tensors to {OUT}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
