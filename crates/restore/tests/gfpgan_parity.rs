//! GFPGANv1Clean against the reference (gfpgan 1.3.8), fixtures from
//! `scripts/make_face_fixtures.py`: a tiny random-weight instance (out 64, narrow 1/32, 16-dim
//! styles) run with the stored noise maps, and the full v1.4 key tree.

use sdkube_testkit::max_abs_diff;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdkube_restore::face::FaceError;
use sdkube_restore::gfpgan::{Gfpgan, GfpganConfig, Noise};

const TINY: GfpganConfig = GfpganConfig {
    out_size: 64,
    num_style_feat: 16,
    channel_multiplier: 2,
    narrow: 1.0 / 32.0,
};

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures().join("face")
}

fn tiny_fixture() -> (HashMap<String, Tensor>, Tensor, Tensor) {
    let mut t =
        candle_core::safetensors::load(fixtures().join("gfpgan_tiny.safetensors"), &Device::Cpu)
            .unwrap();
    let input = t.remove("input").unwrap();
    let output = t.remove("output").unwrap();
    (t, input, output)
}

#[test]
fn tiny_gfpgan_matches_reference_with_stored_noise() -> anyhow::Result<()> {
    let (weights, input, expected) = tiny_fixture();
    let net = Gfpgan::from_tensors(weights, TINY, &Device::Cpu)?;
    let out = net.forward(&input, Noise::Stored)?;
    assert_eq!(out.dims(), expected.dims());
    let diff = max_abs_diff(&out, &expected);
    let spread = expected.flatten_all()?.abs()?.max(0)?.to_scalar::<f32>()?;
    println!("GFPGAN tiny: max |rust - torch| = {diff:e} (output magnitude up to {spread})");
    assert!(diff < 1e-4, "max abs diff {diff}");
    Ok(())
}

/// Each face of a batch is modulated by its own style: a batch gives what each face gives
/// alone, whatever its neighbour.
#[test]
fn each_face_of_a_batch_comes_out_as_alone() -> anyhow::Result<()> {
    let (weights, input, _) = tiny_fixture();
    let net = Gfpgan::from_tensors(weights, TINY, &Device::Cpu)?;
    let first = input.narrow(0, 0, 1)?;
    let other = (first.flip(&[3])? * 0.5)?;
    let both = net.forward(&Tensor::cat(&[&first, &other], 0)?, Noise::Stored)?;
    let alone = [
        net.forward(&first, Noise::Stored)?,
        net.forward(&other, Noise::Stored)?,
    ];
    for (i, a) in alone.iter().enumerate() {
        let diff = max_abs_diff(&both.narrow(0, i, 1)?, a);
        assert!(
            diff < 1e-5,
            "face {i}: max abs diff {diff} against itself alone"
        );
    }
    assert!(
        max_abs_diff(&alone[0], &alone[1]) > 1e-2,
        "the two faces must differ"
    );
    Ok(())
}

#[test]
fn noise_choice_changes_the_output_and_seeds_reproduce() -> anyhow::Result<()> {
    let (weights, input, expected) = tiny_fixture();
    let net = Gfpgan::from_tensors(weights, TINY, &Device::Cpu)?;
    let a = net.forward(&input, Noise::Seeded(1))?;
    let b = net.forward(&input, Noise::Seeded(1))?;
    let c = net.forward(&input, Noise::Seeded(2))?;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 1e-3);
    assert!(max_abs_diff(&a, &expected) > 1e-3);
    Ok(())
}

#[test]
fn params_ema_prefix_is_accepted() -> anyhow::Result<()> {
    let (weights, input, expected) = tiny_fixture();
    let wrapped = weights
        .into_iter()
        .map(|(k, v)| (format!("params_ema.{k}"), v))
        .collect();
    let net = Gfpgan::from_tensors(wrapped, TINY, &Device::Cpu)?;
    assert!(max_abs_diff(&net.forward(&input, Noise::Stored)?, &expected) < 1e-4);
    Ok(())
}

#[test]
fn wrong_weights_and_inputs_are_typed_errors() {
    let (weights, input, _) = tiny_fixture();
    // The tiny checkpoint is not a full-size v1.4 network: shape mismatch, named.
    let err = Gfpgan::from_tensors(weights.clone(), GfpganConfig::V1_4, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, FaceError::Weights(_)), "{err}");
    // A missing tensor names the key.
    let mut missing = weights.clone();
    missing.remove("final_linear.weight");
    let err = Gfpgan::from_tensors(missing, TINY, &Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("final_linear"), "{err}");
    // Bad configuration.
    let bad = GfpganConfig {
        out_size: 48,
        ..TINY
    };
    assert!(matches!(
        Gfpgan::from_tensors(weights.clone(), bad, &Device::Cpu),
        Err(FaceError::Config(_))
    ));
    // Wrong input size.
    let net = Gfpgan::from_tensors(weights, TINY, &Device::Cpu).unwrap();
    let small = input.narrow(2, 0, 32).unwrap();
    assert!(matches!(
        net.forward(&small, Noise::Stored),
        Err(FaceError::Input(_))
    ));
}

/// Records every tensor the network asks for and hands back zero-cost broadcast zeros.
struct Recorder(Mutex<BTreeMap<String, Vec<usize>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn full_size_key_tree_is_the_official_one() -> anyhow::Result<()> {
    let official: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("gfpgan_keys.json"),
    )?)?;
    let recorder = std::sync::Arc::new(Recorder(Mutex::new(BTreeMap::new())));
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            h: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    Gfpgan::new(vb, GfpganConfig::V1_4)?;
    let used = recorder.0.lock().unwrap().clone();
    for (name, shape) in &used {
        assert_eq!(
            official.get(name),
            Some(shape),
            "{name} {shape:?} is not in the official key tree"
        );
    }
    // Everything the official file has is used, except the training-only branches.
    let unused: Vec<_> = official
        .keys()
        .filter(|k| !used.contains_key(*k))
        .filter(|k| !k.starts_with("toRGB.") && !k.starts_with("stylegan_decoder.style_mlp."))
        .collect();
    assert!(unused.is_empty(), "official keys not loaded: {unused:?}");
    Ok(())
}

#[test]
fn configuration_is_read_off_the_shapes() -> anyhow::Result<()> {
    let (weights, _, _) = tiny_fixture();
    assert_eq!(GfpganConfig::infer(&weights)?, TINY);
    // And the full-size tree gives the v1.4 preset.
    let official: BTreeMap<String, Vec<usize>> = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("gfpgan_keys.json"),
    )?)?;
    let shapes: HashMap<String, Tensor> = official
        .into_iter()
        .map(|(k, s)| {
            let t = Tensor::zeros((), DType::F32, &Device::Cpu)
                .unwrap()
                .broadcast_as(s)
                .unwrap();
            (k, t)
        })
        .collect();
    assert_eq!(GfpganConfig::infer(&shapes)?, GfpganConfig::V1_4);
    assert!(GfpganConfig::infer(&HashMap::new()).is_err());
    Ok(())
}

#[test]
fn loads_from_a_file() -> anyhow::Result<()> {
    let net = Gfpgan::load(&fixtures().join("gfpgan_tiny.safetensors"), &Device::Cpu)?;
    assert_eq!(net.config(), &TINY);
    let (_, input, expected) = tiny_fixture();
    assert!(max_abs_diff(&net.forward(&input, Noise::Stored)?, &expected) < 1e-4);
    Ok(())
}
