//! Sampler names, bad input, cancellation, and convergence on a problem with a known
//! answer (Gaussian data, whose denoiser and probability-flow ODE are closed-form).

use candle_core::{DType, Device, Tensor};
use sdkube_pipeline::sampler::{
    seeded_normal, Flow, ModelScalings, NoiseSchedule, Plan, Prediction, RecordedNoise, Sampler,
    SamplerError, SamplerSpec, Scheduler, SeededNoise, StepInfo,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const EVERY_SAMPLER: [Sampler; 11] = [
    Sampler::Euler,
    Sampler::EulerA,
    Sampler::Heun,
    Sampler::Dpm2,
    Sampler::Dpm2A,
    Sampler::DpmPp2SA,
    Sampler::DpmPp2M,
    Sampler::Lms,
    Sampler::Ddim,
    Sampler::UniPc,
    Sampler::Lcm,
];

#[test]
fn names_parse_like_a1111() -> TestResult {
    let p = |n: &str, s: Option<&str>| SamplerSpec::parse(n, s);
    assert_eq!(
        p("DPM++ 2M Karras", None)?,
        SamplerSpec {
            sampler: Sampler::DpmPp2M,
            scheduler: Scheduler::Karras
        }
    );
    assert_eq!(p("dpm++ 2m karras", None)?, p("k_dpmpp_2m_ka", None)?);
    // A1111 >= 1.9 sends the scheduler separately; "Automatic" keeps the name's default.
    assert_eq!(p("DPM++ 2M", Some("Karras"))?, p("DPM++ 2M Karras", None)?);
    assert_eq!(
        p("DPM++ 2M Karras", Some("Automatic"))?.scheduler,
        Scheduler::Karras
    );
    assert_eq!(
        p("DPM++ 2M Karras", Some("Uniform"))?.scheduler,
        Scheduler::Uniform
    );
    assert_eq!(p("euler A", None)?.sampler, Sampler::EulerA);
    assert_eq!(p("k_euler_ancestral", None)?.sampler, Sampler::EulerA);
    assert_eq!(p("Euler", None)?.scheduler, Scheduler::Uniform);
    for s in EVERY_SAMPLER {
        assert_eq!(p(s.name(), None)?.sampler, s, "{}", s.name());
    }
    let names: Vec<&str> = Sampler::all().iter().map(|i| i.name).collect();
    for wanted in [
        "Euler a",
        "DPM++ 2M Karras",
        "DPM++ 2S a",
        "LMS",
        "DDIM",
        "UniPC",
        "LCM",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
    Ok(())
}

#[test]
fn unknown_names_list_the_valid_ones() {
    let err = SamplerSpec::parse("Euler b", None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SamplerError::UnknownSampler { .. }));
    assert!(
        msg.contains("\"Euler b\"") && msg.contains("DPM++ 2M Karras") && msg.contains("UniPC"),
        "{msg}"
    );
    let err = SamplerSpec::parse("Euler", Some("Quadratic")).unwrap_err();
    assert!(err.to_string().contains("Karras"), "{err}");
}

#[test]
fn bad_step_counts_and_strengths_are_rejected() -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let spec = SamplerSpec::parse("Euler", None)?;
    assert!(matches!(
        Plan::txt2img(&schedule, spec, 0, 150),
        Err(SamplerError::ZeroSteps)
    ));
    let err = Plan::txt2img(&schedule, spec, 151, 150).unwrap_err();
    assert!(matches!(
        err,
        SamplerError::TooManySteps {
            steps: 151,
            max: 150
        }
    ));
    assert!(err.to_string().contains("150"), "{err}");
    assert!(Plan::txt2img(&schedule, spec, 150, 150).is_ok());
    for strength in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            Plan::img2img(&schedule, spec, 20, 150, strength),
            Err(SamplerError::BadStrength(_))
        ));
    }
    assert!(Plan::from_sigmas(Sampler::Euler, vec![1.0, 2.0, 0.0]).is_err());
    assert!(Plan::from_sigmas(Sampler::Euler, vec![]).is_err());
    Ok(())
}

/// Data distributed N(mu, s^2) in every element: the exact denoiser is
/// `D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)` and the ODE from sigma_a to
/// sigma_b maps `x` to `mu + (x - mu) * sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2)`.
const MU: f64 = 0.3;
const S: f64 = 0.5;

fn gaussian_denoiser(x: &Tensor, sigma: f64) -> Result<Tensor, SamplerError> {
    let a = S * S / (S * S + sigma * sigma);
    Ok(x.affine(a, (1.0 - a) * MU)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("same shapes")
}

#[test]
fn deterministic_samplers_solve_the_gaussian_ode() -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let noise = seeded_normal(7, &[1, 4, 8, 8], DType::F32, &Device::Cpu)?;
    // Errors of k-diffusion's own implementations on this problem at 160 steps are
    // 0.031 (Euler), 0.0025 (Heun), 0.010 (DPM++ 2M), 2e-5 (LMS): first-order final
    // steps dominate. A wrong coefficient anywhere shows up as an O(1) error.
    for (sampler, tolerance) in [
        (Sampler::Euler, 0.05),
        (Sampler::Heun, 0.005),
        // A1111 drops DPM2's penultimate sigma, so its final Euler step is long.
        (Sampler::Dpm2, 0.03),
        (Sampler::DpmPp2M, 0.02),
        (Sampler::Lms, 0.001),
        (Sampler::Ddim, 0.05),
        (Sampler::UniPc, 0.01),
    ] {
        let spec = SamplerSpec::parse(sampler.name(), None)?;
        let plan = Plan::txt2img(&schedule, spec, 160, 1000)?;
        let x = plan.initial_latent(&noise, None)?;
        let sigmas = plan.sigmas();
        let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
        // The walk starts from x in sigma space (VP samplers: x * sqrt(first^2 + 1)) and
        // returns the latent at `last` (VP samplers: divided by sqrt(last^2 + 1)).
        let vp = matches!(sampler, Sampler::Ddim | Sampler::UniPc);
        let start = if vp {
            x.affine((first * first + 1.0).sqrt(), 0.0)?
        } else {
            x.clone()
        };
        let ratio = (S * S + last * last).sqrt() / (S * S + first * first).sqrt();
        let mut want = start.affine(ratio, MU * (1.0 - ratio))?;
        if vp {
            want = want.affine(1.0 / (last * last + 1.0).sqrt(), 0.0)?;
        }
        let mut denoiser = gaussian_denoiser;
        let got = plan.run(
            x,
            &mut denoiser,
            &mut RecordedNoise::new([]),
            &mut |_: &StepInfo| Flow::Continue,
        )?;
        let err = max_abs_diff(&got, &want);
        assert!(err < tolerance, "{sampler:?}: max error {err:e}");
    }
    Ok(())
}

#[test]
fn ancestral_samplers_reach_the_data_distribution() -> TestResult {
    // With fresh noise every step the samples end near N(mu, s^2): check the moments.
    let schedule = NoiseSchedule::stable_diffusion();
    let noise = seeded_normal(11, &[1, 4, 64, 64], DType::F32, &Device::Cpu)?;
    for sampler in [Sampler::EulerA, Sampler::Dpm2A, Sampler::DpmPp2SA] {
        // (Not LCM: it re-noises the denoiser's posterior mean, which is right only for a
        // consistency model; with this exact denoiser its spread shrinks by design.)
        let spec = SamplerSpec::parse(sampler.name(), None)?;
        // Ancestral samplers under-disperse with few steps (k-diffusion's Euler a gives a
        // std of 0.47 at 100 steps, 0.486 at 300), so run many.
        let plan = Plan::txt2img(&schedule, spec, 300, 1000)?;
        let x = plan.initial_latent(&noise, None)?;
        let mut denoiser = gaussian_denoiser;
        let got = plan.run(
            x,
            &mut denoiser,
            &mut SeededNoise::new(5),
            &mut |_: &StepInfo| Flow::Continue,
        )?;
        let mean = got.mean_all()?.to_scalar::<f32>()? as f64;
        let var = got
            .affine(1.0, -mean)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        assert!((mean - MU).abs() < 0.02, "{sampler:?}: mean {mean}");
        assert!(
            (var.sqrt() - S).abs() < 0.02,
            "{sampler:?}: std {}",
            var.sqrt()
        );
    }
    Ok(())
}

#[test]
fn the_callback_sees_every_step_and_can_stop() -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let noise = seeded_normal(3, &[1, 4, 4, 4], DType::F32, &Device::Cpu)?;
    for sampler in EVERY_SAMPLER {
        let spec = SamplerSpec::parse(sampler.name(), None)?;
        let plan = Plan::txt2img(&schedule, spec, 10, 150)?;
        let mut seen = Vec::new();
        let mut calls = 0;
        let mut denoiser = |x: &Tensor, s: f64| {
            calls += 1;
            gaussian_denoiser(x, s)
        };
        plan.run(
            plan.initial_latent(&noise, None)?,
            &mut denoiser,
            &mut SeededNoise::new(1),
            &mut |info: &StepInfo| {
                assert_eq!(info.total, plan.steps());
                assert_eq!(info.denoised.dims(), info.x.dims());
                seen.push(info.step);
                Flow::Continue
            },
        )?;
        assert_eq!(seen, (0..plan.steps()).collect::<Vec<_>>(), "{sampler:?}");

        // Stopping at step 2 ends the run at once with Interrupted.
        let mut calls_after_stop = 0;
        let stopped = std::cell::Cell::new(false);
        let mut denoiser = |x: &Tensor, s: f64| {
            if stopped.get() {
                calls_after_stop += 1;
            }
            gaussian_denoiser(x, s)
        };
        let err = plan
            .run(
                plan.initial_latent(&noise, None)?,
                &mut denoiser,
                &mut SeededNoise::new(1),
                &mut |info: &StepInfo| {
                    if info.step == 2 {
                        stopped.set(true);
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                },
            )
            .unwrap_err();
        assert!(
            matches!(err, SamplerError::Interrupted { step: 2, .. }),
            "{sampler:?}: {err}"
        );
        assert_eq!(calls_after_stop, 0, "{sampler:?} kept denoising after Stop");
        assert!(calls > 0);
    }
    Ok(())
}

#[test]
fn denoiser_failures_and_bad_shapes_surface_as_errors() -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let spec = SamplerSpec::parse("Euler", None)?;
    let plan = Plan::txt2img(&schedule, spec, 4, 150)?;
    let noise = seeded_normal(3, &[1, 4, 4, 4], DType::F32, &Device::Cpu)?;
    let mut failing = |_: &Tensor, _: f64| -> Result<Tensor, SamplerError> {
        Err(SamplerError::Denoiser("UNet out of memory".into()))
    };
    let err = plan
        .run(
            noise.clone(),
            &mut failing,
            &mut SeededNoise::new(0),
            &mut |_: &StepInfo| Flow::Continue,
        )
        .unwrap_err();
    assert!(err.to_string().contains("out of memory"), "{err}");
    let mut wrong_shape =
        |x: &Tensor, _: f64| -> Result<Tensor, SamplerError> { Ok(x.narrow(1, 0, 2)?) };
    let err = plan
        .run(
            noise.clone(),
            &mut wrong_shape,
            &mut SeededNoise::new(0),
            &mut |_: &StepInfo| Flow::Continue,
        )
        .unwrap_err();
    assert!(matches!(err, SamplerError::Shape(_)), "{err}");
    // An ancestral sampler with too little recorded noise says so.
    let plan = Plan::txt2img(&schedule, SamplerSpec::parse("Euler a", None)?, 4, 150)?;
    let mut denoiser = gaussian_denoiser;
    let err = plan
        .run(
            noise.clone(),
            &mut denoiser,
            &mut RecordedNoise::new([noise.clone()]),
            &mut |_: &StepInfo| Flow::Continue,
        )
        .unwrap_err();
    assert!(
        matches!(err, SamplerError::NoiseExhausted { drawn: 1 }),
        "{err}"
    );
    Ok(())
}

#[test]
fn model_scalings_recover_x0_from_a_perfect_network() -> TestResult {
    // x = x0 + sigma * eps; a network that predicts eps (or v) exactly must give D = x0.
    let schedule = NoiseSchedule::stable_diffusion();
    let dev = Device::Cpu;
    let x0 = seeded_normal(1, &[1, 4, 4, 4], DType::F64, &dev)?;
    let eps = seeded_normal(2, &[1, 4, 4, 4], DType::F64, &dev)?;
    for sigma in [0.03, 1.0, 14.0] {
        let x = (&x0 + eps.affine(sigma, 0.0)?)?;
        let a = 1.0 / (sigma * sigma + 1.0).sqrt(); // alpha; sigma_vp = sigma * alpha
        let v = (eps.affine(a, 0.0)? - x0.affine(sigma * a, 0.0)?)?;
        for (prediction, out) in [(Prediction::Epsilon, &eps), (Prediction::V, &v)] {
            let scalings = ModelScalings::new(schedule.clone(), prediction, Sampler::Euler);
            let (x_in, t) = scalings.model_input(&x, sigma)?;
            assert!(max_abs_diff(&x_in, &x.affine(a, 0.0)?) < 1e-12);
            assert!((schedule.t_to_sigma(t) - sigma).abs() < 1e-9 * sigma);
            let d = scalings.denoised(&x, sigma, out)?;
            assert!(max_abs_diff(&d, &x0) < 1e-9, "{prediction:?} at {sigma}");
        }
    }
    // LCM feeds its network only the 50 LCM timesteps (19, 39, ..., 999).
    let lcm = ModelScalings::new(schedule.clone(), Prediction::Epsilon, Sampler::Lcm);
    assert_eq!(lcm.timestep(schedule.table()[999]), 999.0);
    assert_eq!(lcm.timestep(schedule.table()[500]), 499.0);
    Ok(())
}

#[test]
fn img2img_noises_the_init_latent_to_the_plan_level() -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let dev = Device::Cpu;
    let init = Tensor::ones((1, 4, 2, 2), DType::F32, &dev)?;
    let noise = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev)?;
    // k-diffusion samplers: x = init + noise * sigma (zero noise leaves init).
    let plan = Plan::img2img(&schedule, SamplerSpec::parse("Euler", None)?, 20, 150, 0.5)?;
    assert_eq!(plan.steps(), 11); // t_enc = 10, t_enc + 1 steps
    assert!(max_abs_diff(&plan.initial_latent(&noise, Some(&init))?, &init) < 1e-7);
    // DDIM (A1111): noised to timesteps[t_enc] in VP space, then t_enc - 1 steps.
    let plan = Plan::img2img(&schedule, SamplerSpec::parse("DDIM", None)?, 20, 150, 0.5)?;
    assert_eq!(plan.steps(), 9);
    let a = schedule.alphas_cumprod()[501].sqrt();
    let x = plan.initial_latent(&noise, Some(&init))?;
    assert!(max_abs_diff(&x, &init.affine(a, 0.0)?) < 1e-6);
    let plan = Plan::img2img(&schedule, SamplerSpec::parse("UniPC", None)?, 20, 150, 0.5)?;
    assert_eq!(plan.steps(), 10);
    Ok(())
}
