//! ControlNet parity with diffusers' `ControlNetModel` and the UNet's residual inputs, on the
//! tiny fixtures of `scripts/make_controlnet_fixtures.py` (references in fp32 from the same
//! fp16 weights): the residuals, guess mode, the UNet output with them, for a diffusers
//! folder and an lllyasviel single file.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sdkube_models::controlnet::load_controlnet;
use sdkube_models::unet::{AddedConditioning, ControlResiduals};
use sdkube_models::{load, LoadOptions};
use sdkube_testkit::max_abs_diff;

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures().join("controlnet")
}

fn refs(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join(format!("refs/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    eprintln!("{what}: max abs diff {d:e}");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}

fn added(r: &HashMap<String, Tensor>) -> Option<AddedConditioning> {
    r.get("text_embeds").map(|te| AddedConditioning {
        text_embeds: te.clone(),
        time_ids: r["time_ids"].clone(),
    })
}

fn check_residuals(what: &str, got: &ControlResiduals, r: &HashMap<String, Tensor>, p: &str) {
    let n = r
        .keys()
        .filter(|k| k.starts_with(&format!("{p}down.")))
        .count();
    assert_eq!(got.down.len(), n, "{what}: residual count");
    for (k, t) in got.down.iter().enumerate() {
        assert_close(
            &format!("{what} {p}down.{k}"),
            t,
            &r[&format!("{p}down.{k}")],
            2e-5,
        );
    }
    assert_close(
        &format!("{what} {p}mid"),
        &got.mid,
        &r[&format!("{p}mid")],
        2e-5,
    );
}

fn check(name: &str, controlnet: &std::path::Path, config: Option<&std::path::Path>) {
    let r = refs(name);
    let cn = load_controlnet(controlnet, config)
        .unwrap()
        .build(&Device::Cpu, DType::F32)
        .unwrap();
    let added = added(&r);
    let raw = cn
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["context"],
            added.as_ref(),
            &r["cond"],
        )
        .unwrap();
    let what = format!("{name} ({})", controlnet.display());
    let n = raw.down.len() + 1;
    let residuals = raw.scaled(&vec![0.7; n]).unwrap();
    check_residuals(&what, &residuals, &r, "");
    // diffusers' guess mode: logspace(-1, 0, n) × the conditioning scale.
    let soft: Vec<f64> = (0..n)
        .map(|k| 0.7 * 10f64.powf(-1.0 + k as f64 / (n - 1) as f64))
        .collect();
    check_residuals(&what, &raw.scaled(&soft).unwrap(), &r, "guess.");

    let model = load(
        &sdkube_testkit::fixtures().join("sd").join(name),
        &LoadOptions::default(),
    )
    .unwrap();
    let unet = model.unet.build(&Device::Cpu, DType::F32).unwrap();
    let out = unet
        .forward_with_control(
            &r["sample"],
            &r["timestep"],
            &r["context"],
            added.as_ref(),
            Some(&residuals),
        )
        .unwrap();
    assert_close(&format!("{what} unet"), &out, &r["unet"], 2e-5);
    let plain = unet
        .forward(&r["sample"], &r["timestep"], &r["context"], added.as_ref())
        .unwrap();
    assert_close(
        &format!("{what} unet.plain"),
        &plain,
        &r["unet.plain"],
        2e-5,
    );
    // The residuals matter: without them the output is far from the controlled one.
    assert!(max_abs_diff(&plain, &r["unet"]) > 0.1);
}

#[test]
fn diffusers_folders_match_reference() {
    check("sd1", &fixtures().join("sd1"), None);
    check("sdxl", &fixtures().join("sdxl"), None);
}

#[test]
fn lllyasviel_single_file_matches_reference() {
    // The tiny fixture's group norms have 4 groups, which no real ControlNet has: its
    // config comes from the folder, as diffusers' from_single_file(config=…).
    let single = fixtures().join("sd1-ldm.safetensors");
    check("sd1", &single, Some(&fixtures().join("sd1")));
}

#[test]
fn single_file_config_is_inferred_from_shapes() {
    let cfg = load_controlnet(&fixtures().join("sd1-ldm.safetensors"), None)
        .unwrap()
        .config;
    let folder = load_controlnet(&fixtures().join("sd1"), None)
        .unwrap()
        .config;
    assert_eq!(
        cfg.conditioning_embedding_out_channels,
        folder.conditioning_embedding_out_channels
    );
    assert_eq!(cfg.conditioning_channels, 3);
    assert_eq!(cfg.unet.block_out_channels, folder.unet.block_out_channels);
    assert_eq!(cfg.unet.layers_per_block, folder.unet.layers_per_block);
    assert_eq!(cfg.unet.down_block_types, folder.unet.down_block_types);
    assert_eq!(
        cfg.unet.cross_attention_dim,
        folder.unet.cross_attention_dim
    );
}

#[test]
fn a_checkpoint_that_is_not_a_controlnet_is_a_clear_error() {
    let sd = sdkube_testkit::fixtures()
        .join("sd")
        .join("sd1.safetensors");
    let err = load_controlnet(&sd, None).unwrap_err().to_string();
    assert!(err.contains("not a ControlNet"), "{err}");
    assert!(err.contains("sd1.safetensors"), "{err}");
}

#[test]
fn a_controlnet_for_another_unet_is_refused() {
    // SDXL's ControlNet gives 9 residuals; SD1's UNet has 4 skip connections.
    let r = refs("sdxl");
    let cn = load_controlnet(&fixtures().join("sdxl"), None)
        .unwrap()
        .build(&Device::Cpu, DType::F32)
        .unwrap();
    let residuals = cn
        .forward(
            &r["sample"],
            &r["timestep"],
            &r["context"],
            added(&r).as_ref(),
            &r["cond"],
        )
        .unwrap();
    let sd1 = refs("sd1");
    let model = load(
        &sdkube_testkit::fixtures().join("sd").join("sd1"),
        &LoadOptions::default(),
    )
    .unwrap();
    let unet = model.unet.build(&Device::Cpu, DType::F32).unwrap();
    let err = unet
        .forward_with_control(
            &sd1["sample"],
            &sd1["timestep"],
            &sd1["context"],
            None,
            Some(&residuals),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("residuals"), "{err}");
}
