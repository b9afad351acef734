//! Importing ncnn `.param`/`.bin` models (as shipped for Real-ESRGAN-ncnn-vulkan) onto
//! our networks.
//!
//! The `.param` file is text: a magic line `7767517`, a `layers blobs` line, then one line
//! per layer: `Type name n_in n_out inputs… outputs… k=v…` (`k=v` ints or floats; keys
//! ≤ -23300 are arrays `n,v1,…`). The `.bin` file holds, in layer order, each layer's
//! weights: a Convolution's kernel as `ModelBin::load(size, 0)` (a 4-byte tag, `0x01306B47`
//! meaning fp16, zero meaning raw fp32, then data padded to 4 bytes), then its bias and a
//! PReLU's slopes as raw fp32. Convolutions appear in forward order, which for RRDBNet and
//! SRVGGNetCompact is exactly the order of their checkpoint keys, so the import assigns
//! them in sequence and checks every shape against the architecture.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::esrgan::EsrganArch;
use crate::rrdbnet::RrdbConfig;
use crate::srvgg::{Activation, SrvggConfig};
use crate::Error;

/// One `k=v` value of a layer line.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// An integer.
    Int(i32),
    /// A float.
    Float(f32),
    /// An array (keys from -23300 down: `n,v1,…`).
    Array(Vec<f32>),
}

/// One layer line of a `.param` file.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Layer type (`Convolution`, `PReLU`, `Interp`…).
    pub kind: String,
    /// Layer name.
    pub name: String,
    /// Names of the blobs it reads.
    pub inputs: Vec<String>,
    /// Names of the blobs it writes.
    pub outputs: Vec<String>,
    /// Its `k=v` parameters by id.
    pub params: HashMap<i32, ParamValue>,
}

impl Layer {
    fn int(&self, key: i32, default: i32) -> i32 {
        match self.params.get(&key) {
            Some(ParamValue::Int(v)) => *v,
            Some(ParamValue::Float(v)) => *v as i32,
            _ => default,
        }
    }

    /// A size parameter: `k` must be a non-negative integer.
    fn size(&self, key: i32) -> Result<usize, Error> {
        let v = self.int(key, 0);
        usize::try_from(v)
            .map_err(|_| bad(format!("{}: parameter {key}={v} is negative", self.name)))
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Ncnn(msg.into())
}

/// Parses a text `.param` file.
pub fn parse_param(text: &str) -> Result<Vec<Layer>, Error> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    if lines.next().map(str::trim) != Some("7767517") {
        return Err(bad("not an ncnn .param file (first line is not 7767517)"));
    }
    let counts = lines
        .next()
        .ok_or_else(|| bad("missing layer/blob counts"))?;
    let layer_count: usize = counts
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("bad layer count line"))?;
    // The header's count is only compared with the lines that follow, never allocated.
    let mut layers = Vec::new();
    for (i, line) in lines.enumerate() {
        let lineno = i + 3;
        let mut f = line.split_whitespace();
        let mut next = |what: &str| {
            f.next()
                .map(str::to_string)
                .ok_or_else(|| bad(format!("line {lineno}: missing {what}")))
        };
        let kind = next("layer type")?;
        let name = next("layer name")?;
        let n_in: usize = next("input count")?
            .parse()
            .map_err(|_| bad(format!("line {lineno}: bad input count")))?;
        let n_out: usize = next("output count")?
            .parse()
            .map_err(|_| bad(format!("line {lineno}: bad output count")))?;
        let inputs = (0..n_in).map(|_| next("input")).collect::<Result<_, _>>()?;
        let outputs = (0..n_out)
            .map(|_| next("output"))
            .collect::<Result<_, _>>()?;
        let mut params = HashMap::new();
        for kv in f {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("line {lineno}: `{kv}` is not k=v")))?;
            let k: i32 = k
                .parse()
                .map_err(|_| bad(format!("line {lineno}: bad key {k}")))?;
            let num = |s: &str| -> Result<f32, Error> {
                s.parse::<f32>()
                    .map_err(|_| bad(format!("line {lineno}: bad number {s}")))
            };
            if k <= -23300 {
                let mut parts = v.split(',');
                let n: usize = parts
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| bad(format!("line {lineno}: bad array length")))?;
                let values = parts.map(num).collect::<Result<Vec<_>, _>>()?;
                if values.len() != n {
                    return Err(bad(format!(
                        "line {lineno}: array of {n} has {}",
                        values.len()
                    )));
                }
                params.insert(-(k + 23300), ParamValue::Array(values));
            } else if v.contains(['.', 'e', 'E']) {
                params.insert(k, ParamValue::Float(num(v)?));
            } else {
                let iv = v
                    .parse()
                    .map_err(|_| bad(format!("line {lineno}: bad integer {v}")))?;
                params.insert(k, ParamValue::Int(iv));
            }
        }
        layers.push(Layer {
            kind,
            name,
            inputs,
            outputs,
            params,
        });
    }
    if layers.len() != layer_count {
        return Err(bad(format!(
            "header announces {layer_count} layers, file has {}",
            layers.len()
        )));
    }
    Ok(layers)
}

/// A convolution or PReLU with its weights, as read from the `.bin`.
#[derive(Debug)]
pub enum Weights {
    /// A convolution's weight `[out, inp, kernel, kernel]` and optional bias.
    Conv {
        /// Layer name.
        name: String,
        /// Output channels.
        out: usize,
        /// Input channels.
        inp: usize,
        /// Kernel side.
        kernel: usize,
        /// `[out, inp, kernel, kernel]`.
        weight: Tensor,
        /// `[out]`, when the layer has one.
        bias: Option<Tensor>,
    },
    /// A PReLU's per-channel slopes.
    Prelu {
        /// Layer name.
        name: String,
        /// `[channels]`.
        slope: Tensor,
    },
}

struct Bin<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bin<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], Error> {
        if self.data.len() - self.pos < n {
            return Err(bad(format!(
                "{what}: .bin ends at byte {} but {n} more bytes are needed (truncated, or not this .param's .bin)",
                self.data.len()
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// `n` elements of `size` bytes: an error when that overflows, else [`Self::take`].
    fn take_elems(&mut self, n: usize, size: usize, what: &str) -> Result<&[u8], Error> {
        let len = n
            .checked_mul(size)
            .ok_or_else(|| bad(format!("{what}: {n} weights do not fit in memory")))?;
        self.take(len, what)
    }

    fn raw_f32(&mut self, n: usize, what: &str) -> Result<Tensor, Error> {
        let b = self.take_elems(n, 4, what)?;
        Ok(Tensor::from_raw_buffer(b, DType::F32, &[n], &Device::Cpu)?)
    }

    /// `ModelBin::load(n, 0)`: tagged data.
    fn tagged(&mut self, n: usize, what: &str) -> Result<Tensor, Error> {
        let tag = u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes"));
        match tag {
            0x01306B47 => {
                let b = self.take_elems(n, 2, what)?.to_vec();
                self.take((4 - b.len() % 4) % 4, what)?;
                Ok(Tensor::from_raw_buffer(&b, DType::F16, &[n], &Device::Cpu)?)
            }
            0 => self.raw_f32(n, what),
            other => Err(bad(format!(
                "{what}: weight tag 0x{other:08x} is neither fp16 nor fp32 (an int8/quantised model, or a .bin that does not belong to this .param)"
            ))),
        }
    }
}

/// Reads every weighted layer's data from `bin`, in layer order.
pub fn read_weights(layers: &[Layer], bin: &[u8]) -> Result<Vec<Weights>, Error> {
    let mut b = Bin { data: bin, pos: 0 };
    let mut out = Vec::new();
    for l in layers {
        match l.kind.as_str() {
            "Convolution" => {
                let num_output = l.size(0)?;
                let kernel = l.size(1)?;
                if l.int(11, l.int(1, 0)) != l.int(1, 0) {
                    return Err(bad(format!(
                        "{}: non-square kernels are not supported",
                        l.name
                    )));
                }
                let size = l.size(6)?;
                let per_input = num_output
                    .checked_mul(kernel)
                    .and_then(|n| n.checked_mul(kernel))
                    .filter(|&n| n != 0 && size.is_multiple_of(n))
                    .ok_or_else(|| bad(format!("{}: inconsistent convolution sizes", l.name)))?;
                let inp = size / per_input;
                let weight = b
                    .tagged(size, &l.name)?
                    .reshape((num_output, inp, kernel, kernel))?;
                let bias = if l.int(5, 0) != 0 {
                    Some(b.raw_f32(num_output, &l.name)?)
                } else {
                    None
                };
                out.push(Weights::Conv {
                    name: l.name.clone(),
                    out: num_output,
                    inp,
                    kernel,
                    weight,
                    bias,
                });
            }
            "PReLU" => {
                let n = l.size(0)?;
                out.push(Weights::Prelu {
                    name: l.name.clone(),
                    slope: b.raw_f32(n, &l.name)?,
                });
            }
            "Input" | "Split" | "Concat" | "Eltwise" | "BinaryOp" | "Interp" | "PixelShuffle"
            | "ReLU" | "Crop" | "Noop" => {}
            other => {
                return Err(bad(format!(
                    "layer {} of type {other} is not part of a RealESRGAN network",
                    l.name
                )))
            }
        }
    }
    if b.pos != bin.len() {
        return Err(bad(format!(
            ".bin has {} bytes left over after the last layer: it does not belong to this .param",
            bin.len() - b.pos
        )));
    }
    Ok(out)
}

/// The architecture an ncnn graph encodes: PReLUs mean SRVGGNetCompact, else RRDBNet.
pub fn infer_arch(weights: &[Weights]) -> Result<EsrganArch, Error> {
    let convs: Vec<(usize, usize)> = weights
        .iter()
        .filter_map(|w| match w {
            Weights::Conv { inp, out, .. } => Some((*inp, *out)),
            _ => None,
        })
        .collect();
    let prelus = weights
        .iter()
        .filter(|w| matches!(w, Weights::Prelu { .. }))
        .count();
    let (first, last) = match (convs.first(), convs.last()) {
        (Some(f), Some(l)) if convs.len() >= 2 => (*f, *l),
        _ => return Err(bad("fewer than two convolutions: not a RealESRGAN network")),
    };
    if prelus > 0 {
        let num_out_ch = first.0;
        let up2 = last.1 / num_out_ch.max(1);
        let upscale = (1..=8)
            .find(|u| u * u == up2)
            .ok_or_else(|| bad("last convolution's width is not channels·upscale²"))?;
        return Ok(EsrganArch::Srvgg(SrvggConfig {
            num_in_ch: first.0,
            num_out_ch,
            num_feat: first.1,
            num_conv: convs.len() - 2,
            upscale,
            act: Activation::Prelu,
        }));
    }
    if convs.len() < 6 || !(convs.len() - 6).is_multiple_of(15) {
        return Err(bad(format!(
            "{} convolutions do not make an RRDBNet (1 + 15·blocks + 5)",
            convs.len()
        )));
    }
    let num_out_ch = last.1;
    let (scale, num_in_ch) = match first.0 / num_out_ch.max(1) {
        16 => (1, first.0 / 16),
        4 => (2, first.0 / 4),
        _ => (4, first.0),
    };
    Ok(EsrganArch::Rrdb(RrdbConfig {
        num_in_ch,
        num_out_ch,
        scale,
        num_feat: first.1,
        num_block: (convs.len() - 6) / 15,
        num_grow_ch: convs.get(1).map(|c| c.1).unwrap_or(32),
    }))
}

/// Maps an ncnn model onto our checkpoint keys. With `expected` set, the graph must encode
/// exactly that architecture. Kernels keep the file's fp16; biases and slopes are f32.
pub fn import(
    param_text: &str,
    bin: &[u8],
    expected: Option<EsrganArch>,
) -> Result<(EsrganArch, HashMap<String, Tensor>), Error> {
    let layers = parse_param(param_text)?;
    let weights = read_weights(&layers, bin)?;
    let arch = infer_arch(&weights)?;
    if let Some(want) = expected {
        if want != arch {
            return Err(bad(format!(
                "the graph encodes {arch:?}, not the requested {want:?}"
            )));
        }
    }
    let (conv_keys, prelu_keys) = match arch {
        EsrganArch::Rrdb(c) => (c.convs(), Vec::new()),
        EsrganArch::Srvgg(c) => (c.convs(), c.prelus()),
    };
    let mut conv_keys = conv_keys.into_iter();
    let mut prelu_keys = prelu_keys.into_iter();
    let mut out = HashMap::new();
    for w in weights {
        match w {
            Weights::Conv {
                name,
                out: o,
                inp,
                kernel,
                weight,
                bias,
            } => {
                let (key, cin, cout) = conv_keys
                    .next()
                    .ok_or_else(|| bad(format!("{name}: one convolution too many")))?;
                if (cin, cout, kernel) != (inp, o, 3) {
                    return Err(bad(format!(
                        "{name} is {inp}→{o} ({kernel}×{kernel}) but `{key}` needs {cin}→{cout} (3×3)"
                    )));
                }
                out.insert(format!("{key}.weight"), weight);
                let bias = match bias {
                    Some(b) => b,
                    None => Tensor::zeros(o, DType::F32, &Device::Cpu)?,
                };
                out.insert(format!("{key}.bias"), bias);
            }
            Weights::Prelu { name, slope } => {
                let (key, n) = prelu_keys
                    .next()
                    .ok_or_else(|| bad(format!("{name}: one PReLU too many")))?;
                if slope.elem_count() != n {
                    return Err(bad(format!(
                        "{name}: {} slopes, `{key}` needs {n}",
                        slope.elem_count()
                    )));
                }
                out.insert(format!("{key}.weight"), slope);
            }
        }
    }
    if conv_keys.next().is_some() || prelu_keys.next().is_some() {
        return Err(bad("the graph has fewer layers than the architecture"));
    }
    Ok((arch, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAM: &str = "7767517\n4 4\nInput in 0 1 data\n\
        Convolution c0 1 1 data a 0=2 1=3 4=1 5=1 6=18 9=2 -23310=1,2.000000e-01\n\
        PReLU p0 1 1 a b 0=2\n\
        Convolution c1 1 1 b out 0=4 1=3 4=1 5=1 6=72\n";

    fn bin() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x01306B47u32.to_le_bytes());
        for i in 0..18 {
            b.extend_from_slice(&half::f16::from_f32(i as f32).to_le_bytes());
        }
        b.extend_from_slice(&[0.5f32, -0.5].map(f32::to_le_bytes).concat());
        b.extend_from_slice(&[0.25f32, 0.75].map(f32::to_le_bytes).concat());
        b.extend_from_slice(&0u32.to_le_bytes());
        for i in 0..72 {
            b.extend_from_slice(&(i as f32 * 0.1).to_le_bytes());
        }
        b.extend_from_slice(&[1f32, 2., 3., 4.].map(f32::to_le_bytes).concat());
        b
    }

    #[test]
    fn parses_layers_and_array_params() {
        let layers = parse_param(PARAM).unwrap();
        assert_eq!(layers.len(), 4);
        assert_eq!(layers[1].params[&0], ParamValue::Int(2));
        assert_eq!(layers[1].params[&10], ParamValue::Array(vec![0.2]));
        assert_eq!(layers[2].inputs, ["a"]);
    }

    #[test]
    fn maps_a_tiny_srvgg_graph() {
        let (arch, t) = import(PARAM, &bin(), None).unwrap();
        // 1 input channel, 4 = 1·2² outputs: an x2 SRVGG with no body convolutions.
        let EsrganArch::Srvgg(cfg) = arch else {
            panic!("{arch:?}")
        };
        assert_eq!(
            (cfg.num_in_ch, cfg.num_feat, cfg.num_conv, cfg.upscale),
            (1, 2, 0, 2)
        );
        let w: Vec<f32> = t["body.0.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w, (0..18).map(|i| i as f32).collect::<Vec<_>>());
        let slope: Vec<f32> = t["body.1.weight"].to_vec1().unwrap();
        assert_eq!(slope, [0.25, 0.75]);
        let bias: Vec<f32> = t["body.2.bias"].to_vec1().unwrap();
        assert_eq!(bias, [1., 2., 3., 4.]);
    }

    #[test]
    fn truncated_or_mismatched_bin_is_refused() {
        let b = bin();
        let err = import(PARAM, &b[..b.len() - 3], None).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut longer = b.clone();
        longer.extend_from_slice(&[0; 8]);
        let err = import(PARAM, &longer, None).unwrap_err();
        assert!(err.to_string().contains("left over"), "{err}");
        let err = import(PARAM, &b, Some(EsrganArch::Rrdb(RrdbConfig::X4PLUS))).unwrap_err();
        assert!(err.to_string().contains("not the requested"), "{err}");
        assert!(parse_param("hello").is_err());
    }
}
