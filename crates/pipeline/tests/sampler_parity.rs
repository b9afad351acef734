//! Every sampler against its reference implementation (k-diffusion / diffusers), run on
//! an analytic stand-in network so no UNet is needed. The references and the stand-in
//! are in `scripts/make_sampler_fixtures.py`, which wrote `fixtures/samplers/*`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use sdkube_pipeline::sampler::{
    Flow, ModelScalings, NoiseSchedule, Plan, Prediction, RecordedNoise, Sampler, SamplerError,
    SamplerSpec, UniPcOptions, UniPcVariant,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Largest deviation allowed, relative to the reference's largest magnitude.
const RUN_TOLERANCE: f64 = 1e-5;

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = sdkube_testkit::fixtures().join("samplers").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/make_sampler_fixtures.py)",
            path.display()
        )
    })
}

fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("fixture key {key} missing"))
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_vec1::<f64>())
        .expect("a 1-D tensor")
}

/// The stand-in network of the fixture script: `tanh(0.5 x + 0.001 t) + 0.1 x`.
fn stand_in(x_in: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    x_in.affine(0.5, 0.001 * t)?.tanh()? + x_in.affine(0.1, 0.0)?
}

/// Runs `plan` from `x` with the stand-in behind `ModelScalings`; returns the result and
/// how many noise tensors were drawn.
fn run_stand_in(
    plan: &Plan,
    prediction: Prediction,
    x: &Tensor,
    noise: Vec<Tensor>,
) -> Result<(Tensor, usize, usize), SamplerError> {
    let scalings = ModelScalings::new(
        NoiseSchedule::stable_diffusion(),
        prediction,
        plan.sampler(),
    );
    let mut denoiser = |x: &Tensor, sigma: f64| -> Result<Tensor, SamplerError> {
        let (x_in, t) = scalings.model_input(x, sigma)?;
        let out = stand_in(&x_in, t)?;
        scalings.denoised(x, sigma, &out)
    };
    let mut recorded = RecordedNoise::new(noise);
    let mut reported = 0;
    let mut on_step = |_: &sdkube_pipeline::sampler::StepInfo| {
        reported += 1;
        Flow::Continue
    };
    let out = plan.run(x.clone(), &mut denoiser, &mut recorded, &mut on_step)?;
    Ok((out, recorded.drawn(), reported))
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let diff = (got - want)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes");
    let scale = want
        .abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("a tensor");
    diff as f64 / scale.max(1e-6) as f64
}

fn noises(f: &HashMap<String, Tensor>, case: &str) -> Vec<Tensor> {
    match f.get(&format!("{case}.noise")) {
        Some(stack) => (0..stack.dim(0).unwrap())
            .map(|i| stack.get(i).unwrap())
            .collect(),
        None => Vec::new(),
    }
}

fn prediction(name: &str) -> Prediction {
    if name.ends_with(".v") {
        Prediction::V
    } else {
        Prediction::Epsilon
    }
}

#[test]
fn k_diffusion_samplers_match_k_diffusion() -> TestResult {
    let f = load("runs.safetensors");
    let samplers = [
        ("euler", Sampler::Euler),
        ("euler_a", Sampler::EulerA),
        ("heun", Sampler::Heun),
        ("dpm2", Sampler::Dpm2),
        ("dpm2_a", Sampler::Dpm2A),
        ("dpmpp_2s_a", Sampler::DpmPp2SA),
        ("dpmpp_2m", Sampler::DpmPp2M),
        ("lms", Sampler::Lms),
    ];
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (name, sampler) in samplers {
        for sched in ["normal", "karras"] {
            for pred in ["eps", "v"] {
                let case = format!("{name}.{sched}.{pred}");
                let Some(sigmas) = f.get(&format!("{case}.sigmas")) else {
                    continue;
                };
                let plan = Plan::from_sigmas(sampler, vec64(sigmas))?;
                let recorded = noises(&f, &case);
                let n_noise = recorded.len();
                let (out, drawn, reported) = run_stand_in(
                    &plan,
                    prediction(&case),
                    get(&f, &format!("{case}.x")),
                    recorded,
                )?;
                let err = relative_error(&out, get(&f, &format!("{case}.out")));
                worst = worst.max(err);
                assert!(err < RUN_TOLERANCE, "{case}: relative error {err:e}");
                assert_eq!(drawn, n_noise, "{case}: noise draws");
                assert_eq!(reported, plan.steps(), "{case}: callbacks");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 18, "cases found in the fixture");
    eprintln!("k-diffusion samplers: worst relative error {worst:e}");
    Ok(())
}

/// A1111's timestep samplers (DDIM, PLMS) against diffusers' scheduler run without its final
/// step: the sigmas are diffusers' timesteps (each once), and the run ends at t = 1.
fn check_timestep_sampler(
    f: &HashMap<String, Tensor>,
    name: &str,
    case: &str,
    steps: usize,
) -> TestResult {
    let schedule = NoiseSchedule::stable_diffusion();
    let plan = Plan::txt2img(&schedule, SamplerSpec::parse(name, None)?, steps, 150)?;
    // diffusers' PLMS repeats a timestep (its first step's second model call).
    let mut timesteps = vec64(get(f, &format!("{case}.timesteps")));
    timesteps.dedup();
    let want: Vec<f64> = timesteps
        .into_iter()
        .map(|t| schedule.table()[t as usize])
        .collect();
    assert_eq!(plan.sigmas(), want.as_slice(), "{case}: sigmas");
    let x = plan.initial_latent(get(f, &format!("{case}.x")), None)?;
    let (out, _, reported) = run_stand_in(&plan, prediction(case), &x, vec![])?;
    let err = relative_error(&out, get(f, &format!("{case}.out")));
    assert!(err < RUN_TOLERANCE, "{case}: relative error {err:e}");
    assert_eq!(reported, steps - 1);
    Ok(())
}

#[test]
fn ddim_matches_diffusers_without_its_final_step() -> TestResult {
    let f = load("runs.safetensors");
    for steps in [5usize, 8] {
        for pred in ["eps", "v"] {
            check_timestep_sampler(&f, "DDIM", &format!("ddim.{steps}.{pred}"), steps)?;
        }
    }
    Ok(())
}

#[test]
fn unipc_matches_diffusers() -> TestResult {
    let f = load("runs.safetensors");
    for (variant, label, final_kind) in [
        (UniPcVariant::Bh1, "bh1", "sigma_min"),
        (UniPcVariant::Bh2, "bh2", "sigma_min"),
        (UniPcVariant::Bh2, "bh2", "zero"),
    ] {
        for pred in ["eps", "v"] {
            let case = format!("unipc.{label}.{final_kind}.{pred}");
            let options = UniPcOptions {
                variant,
                ..UniPcOptions::default()
            };
            let plan =
                Plan::from_sigmas(Sampler::UniPc, vec64(get(&f, &format!("{case}.sigmas"))))?
                    .with_unipc(options);
            let (out, _, reported) = run_stand_in(
                &plan,
                prediction(&case),
                get(&f, &format!("{case}.x")),
                vec![],
            )?;
            let err = relative_error(&out, get(&f, &format!("{case}.out")));
            assert!(err < RUN_TOLERANCE, "{case}: relative error {err:e}");
            assert_eq!(reported, plan.steps());
        }
    }
    Ok(())
}

#[test]
fn lcm_matches_diffusers() -> TestResult {
    let f = load("runs.safetensors");
    let schedule = NoiseSchedule::stable_diffusion();
    for pred in ["eps", "v"] {
        let case = format!("lcm.{pred}");
        let mut sigmas: Vec<f64> = vec64(get(&f, &format!("{case}.timesteps")))
            .into_iter()
            .map(|t| schedule.table()[t as usize])
            .collect();
        sigmas.push(0.0);
        let first = sigmas[0];
        let plan = Plan::from_sigmas(Sampler::Lcm, sigmas)?;
        // diffusers starts from the variance-preserving latent; k-diffusion style is x * sqrt(sigma^2 + 1).
        let x = get(&f, &format!("{case}.x")).affine((first * first + 1.0).sqrt(), 0.0)?;
        let recorded = noises(&f, &case);
        let n_noise = recorded.len();
        let (out, drawn, _) = run_stand_in(&plan, prediction(&case), &x, recorded)?;
        let err = relative_error(&out, get(&f, &format!("{case}.out")));
        assert!(err < RUN_TOLERANCE, "{case}: relative error {err:e}");
        assert_eq!(drawn, n_noise);
    }
    Ok(())
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // The references are float32, from a float32 alphas_cumprod: 1 - alphas_cumprod
        // near t = 0 keeps only ~4 digits there, hence 1e-4 relative.
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn sigma_schedules_match_a1111() -> TestResult {
    let f = load("schedules.safetensors");
    let schedule = NoiseSchedule::stable_diffusion();
    for steps in [1usize, 2, 7, 20, 50] {
        for (key, sampler, scheduler) in [
            ("normal", "Euler", None),
            ("karras", "DPM++ 2M Karras", None),
            ("karras", "DPM++ 2M", Some("Karras")),
            ("exponential", "Euler", Some("exponential")),
            ("sgm_uniform", "Euler", Some("SGM Uniform")),
            ("dpm2", "DPM2", None),
            ("lcm", "LCM", None),
        ] {
            let spec = SamplerSpec::parse(sampler, scheduler)?;
            let plan = Plan::txt2img(&schedule, spec, steps, 150)?;
            let want = vec64(get(&f, &format!("sched.{key}.{steps}")));
            assert_close(
                plan.sigmas(),
                &want,
                &format!("{sampler} {scheduler:?} {steps}"),
            );
        }
    }
    for (steps, strength) in [(20usize, 0.75), (10, 0.3), (8, 1.0), (6, 0.0)] {
        let spec = SamplerSpec::parse("Euler a", None)?;
        let plan = Plan::img2img(&schedule, spec, steps, 150, strength)?;
        let key = format!("img2img.normal.{steps}.{}", (strength * 100.0) as usize);
        assert_close(plan.sigmas(), &vec64(get(&f, &key)), &key);
    }
    let probe = vec64(get(&f, "sigma_to_t.sigma"));
    let want = vec64(get(&f, "sigma_to_t.t"));
    let got: Vec<f64> = probe.iter().map(|s| schedule.sigma_to_t(*s)).collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 2e-3, "sigma_to_t: {g} vs {w}");
    }
    Ok(())
}

#[test]
fn samplers_run_in_the_latent_dtype() -> TestResult {
    // The per-step scalars are f64 whatever the tensors are; f64 latents must reach the
    // float32 reference to its precision, f16/bf16 latents to theirs.
    let f = load("runs.safetensors");
    for (case, sampler) in [
        ("dpmpp_2m.karras.eps", Sampler::DpmPp2M),
        ("euler_a.normal.v", Sampler::EulerA),
        ("lms.normal.eps", Sampler::Lms),
    ] {
        let plan = Plan::from_sigmas(sampler, vec64(get(&f, &format!("{case}.sigmas"))))?;
        let want = get(&f, &format!("{case}.out"));
        for (dtype, tolerance) in [(DType::F64, 1e-5), (DType::F16, 2e-2), (DType::BF16, 5e-2)] {
            let x = get(&f, &format!("{case}.x")).to_dtype(dtype)?;
            let noise = noises(&f, case)
                .into_iter()
                .map(|n| n.to_dtype(dtype))
                .collect::<Result<Vec<_>, _>>()?;
            let (out, _, _) = run_stand_in(&plan, prediction(case), &x, noise)?;
            assert_eq!(out.dtype(), dtype);
            let err = relative_error(&out.to_dtype(DType::F32)?, want);
            assert!(
                err < tolerance,
                "{case} in {dtype:?}: relative error {err:e}"
            );
        }
    }
    Ok(())
}

/// eps models only: for v models diffusers' PNDM converts a combination of v outputs to eps
/// at the current step, where A1111 combines each step's eps (as sdkube does, through the same
/// v→eps path as DDIM, which is checked above).
#[test]
fn plms_matches_diffusers_pndm_without_its_final_step() -> TestResult {
    let f = load("plms.safetensors");
    for steps in [5usize, 8] {
        check_timestep_sampler(&f, "PLMS", &format!("plms.{steps}.eps"), steps)?;
    }
    Ok(())
}
