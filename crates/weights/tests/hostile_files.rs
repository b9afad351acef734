//! Crafted checkpoints that crashed the readers or made them allocate what a header claims,
//! found by `scripts/fuzz.sh` (targets `pickle`, `torch_zip`, `embedding`).
//! Each must now be an error naming the problem, allocate little and keep the stack small.

use std::path::{Path, PathBuf};

use sdkube_testkit::{largest_allocation, LargestAllocation};
use sdkube_weights::pickle::unpickle;
use sdkube_weights::{load_tree, load_tree_from_bytes, Error};

#[global_allocator]
static ALLOC: LargestAllocation = LargestAllocation;

/// Far below any size these files claim, far above what reading them needs.
const SMALL: usize = 16 << 20;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Reads `data` on a thread with a small stack (a server's worker has 2 MiB), checking how
/// much it allocated at once; the error, if any.
fn read_small(data: Vec<u8>) -> Result<(), String> {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            let (result, largest) = largest_allocation(|| {
                let result = load_tree_from_bytes(&data).map(|_| ());
                // Dropping what was read is part of reading it.
                drop(data);
                result
            });
            assert!(largest < SMALL, "allocated {largest} bytes at once");
            result.map_err(|e| e.to_string())
        })
        .unwrap()
        .join()
        .expect("no panic, no stack overflow")
}

fn refused(data: Vec<u8>) -> String {
    read_small(data).expect_err("a crafted file must be refused")
}

fn unpickle_refused(data: Vec<u8>) -> String {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || {
            let (result, largest) = largest_allocation(|| unpickle(&data).map(|_| ()));
            assert!(largest < SMALL, "allocated {largest} bytes at once");
            result
                .expect_err("a crafted pickle must be refused")
                .to_string()
        })
        .unwrap()
        .join()
        .expect("no panic, no stack overflow")
}

/// The fuzzer's `torch_zip`/`embedding` finding: the zip directory claims an uncompressed
/// size of 939 MB for a storage of a few bytes, and the reader reserved it.
#[test]
fn zip_entry_claiming_more_than_the_archive_holds() {
    let mut data = std::fs::read(fixture("nested_zip.pt")).unwrap();
    let name = b"nested_zip/data/1";
    let entry = (0..data.len() - 46)
        .find(|&i| data[i..].starts_with(b"PK\x01\x02") && data[i + 46..].starts_with(name))
        .expect("central directory entry");
    // Central directory: uncompressed size at offset 24.
    data[entry + 24..entry + 28].copy_from_slice(&0x3800_0006u32.to_le_bytes());
    // The bytes that are there are read (the tensors then check they suffice); the claim is
    // never reserved.
    read_small(data).unwrap();
}

/// A value doubled through `DUP` + `APPEND` forty times: 81 bytes asking for 2^40 values.
#[test]
fn dup_doubling_is_refused() {
    let mut data = b"\x80\x02]".to_vec();
    for _ in 0..40 {
        data.extend_from_slice(b"2a");
    }
    data.push(b'.');
    let err = unpickle_refused(data);
    assert!(err.contains("copies of values"), "{err}");
}

/// The same through the memo: `[m, m]` stored back as `m`, forty times.
#[test]
fn memo_doubling_is_refused() {
    let mut data = b"\x80\x02]q\x00".to_vec();
    for _ in 0..40 {
        data.extend_from_slice(b"(h\x00h\x00lq\x00");
    }
    data.push(b'.');
    let err = unpickle_refused(data);
    assert!(err.contains("copies of values"), "{err}");
}

/// 100,000 nested one-tuples: dropping (or printing) such a tree recursed once per level
/// and overflowed a worker thread's stack.
#[test]
fn deep_nesting_is_refused() {
    let mut data = b"\x80\x02N".to_vec();
    data.extend(std::iter::repeat_n(0x85, 100_000));
    data.push(b'.');
    let err = unpickle_refused(data);
    assert!(err.contains("nested deeper than 256"), "{err}");
    let mut lists = b"\x80\x02".to_vec();
    lists.extend(std::iter::repeat_n(b']', 50_000));
    lists.extend(std::iter::repeat_n(b'a', 49_999));
    lists.push(b'.');
    let err = unpickle_refused(lists);
    assert!(err.contains("nested deeper than 256"), "{err}");
}

/// A legacy (pre-1.6) torch file holding one tensor over storage `0` of `storage_numel`
/// elements of `storage`, with `raw` as the storage's bytes.
fn legacy_file(
    storage: &str,
    storage_numel: u64,
    offset: i64,
    shape: &[i64],
    stride: &[i64],
    raw: &[u8],
) -> Vec<u8> {
    fn int(out: &mut Vec<u8>, v: i64) {
        out.extend_from_slice(&[0x8a, 8]);
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn text(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut f = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    f.extend_from_slice(b"\x80\x02M\xe9\x03."); // protocol 1001
    f.extend_from_slice(b"\x80\x02}."); // sys_info
    f.extend_from_slice(b"\x80\x02ctorch._utils\n_rebuild_tensor\n((");
    text(&mut f, "storage");
    f.extend_from_slice(format!("ctorch\n{storage}\n").as_bytes());
    text(&mut f, "0");
    text(&mut f, "cpu");
    int(&mut f, storage_numel as i64);
    f.extend_from_slice(b"NtQ");
    int(&mut f, offset);
    f.push(b'(');
    shape.iter().for_each(|&d| int(&mut f, d));
    f.extend_from_slice(b"t(");
    stride.iter().for_each(|&d| int(&mut f, d));
    f.extend_from_slice(b"ttR.");
    f.extend_from_slice(b"\x80\x02](X\x01\x00\x00\x000e.");
    f.extend_from_slice(&storage_numel.to_le_bytes());
    f.extend_from_slice(raw);
    f
}

#[test]
fn a_well_formed_legacy_file_still_reads() {
    let raw: Vec<u8> = [1f32, 2., 3., 4.]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let data = legacy_file("FloatStorage", 4, 0, &[2, 2], &[2, 1], &raw);
    let tree = load_tree_from_bytes(&data).unwrap();
    let t = tree.flatten().into_values().next().unwrap();
    assert_eq!(t.to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.]]);
}

/// Shapes whose element count overflows, or a broadcast (stride 0) view claiming 2^40
/// elements over a 4-element storage: the count was multiplied unchecked, and the view
/// was materialised at the size its shape claims.
#[test]
fn tensor_shapes_beyond_their_storage_are_refused() {
    let raw = [0u8; 16];
    let huge = 1i64 << 32;
    let err = refused(legacy_file(
        "FloatStorage",
        4,
        0,
        &[huge, huge],
        &[1, 1],
        &raw,
    ));
    assert!(err.contains("more elements than its storage"), "{err}");
    let err = refused(legacy_file("FloatStorage", 4, 0, &[1 << 40], &[0], &raw));
    assert!(err.contains("more elements than its storage"), "{err}");
}

/// A storage section whose element count, added to its position, overflows.
#[test]
fn storage_sizes_that_overflow_are_refused() {
    let raw = [0u8; 16];
    let mut data = legacy_file("ByteStorage", 4, 0, &[1], &[1], &raw);
    let count = data.len() - raw.len() - 8;
    data[count..count + 8].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
    let err = refused(data);
    assert!(err.contains("storage `0` is truncated"), "{err}");
}

/// The file is named when reading from a path.
#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.pt");
    let mut data = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    data.extend_from_slice(b"\x80\x02M\xe9\x03.\x80\x02}.\x80\x02N");
    data.extend(std::iter::repeat_n(0x85, 1000));
    data.push(b'.');
    std::fs::write(&path, data).unwrap();
    let err = load_tree(&path).unwrap_err();
    assert!(matches!(err, Error::File { .. }), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("evil.pt") && err.contains("nested deeper"),
        "{err}"
    );
}

fn safetensors_file(shape: &str, nbytes: usize) -> Vec<u8> {
    let header =
        format!(r#"{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":[0,{nbytes}]}}}}"#);
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0u8, nbytes));
    out
}

/// Empty tensors whose other dimensions multiply past `usize`: valid to the safetensors
/// and pickle formats (zero elements), but candle's strides overflowed (a panic; wrapped
/// strides in release builds).
#[test]
fn empty_tensors_with_overflowing_shapes_are_refused() {
    for shape in ["[0,1099511627776,1073741824]", "[0,18446744073709551615]"] {
        let err = refused(safetensors_file(shape, 0));
        assert!(
            err.contains("larger than any tensor can be"),
            "{shape}: {err}"
        );
    }
    let err = refused(legacy_file(
        "FloatStorage",
        4,
        0,
        &[0, 1 << 40, 1 << 30],
        &[1, 1, 1],
        &[0; 16],
    ));
    assert!(err.contains("larger than any tensor can be"), "{err}");
    // Ordinary empty and scalar tensors still read.
    read_small(safetensors_file("[0,768]", 0)).unwrap();
    read_small(safetensors_file("[]", 4)).unwrap();
}
