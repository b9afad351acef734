//! A tensor-only unpickler, written from the pickle opcode specification
//! (CPython `Lib/pickletools.py`, protocols 0–5).
//!
//! Nothing in a pickle is ever executed. `GLOBAL`/`STACK_GLOBAL` may only name the few
//! callables torch checkpoints need (see [`Global`]); anything else — `posix.system`,
//! `builtins.eval`, `subprocess.Popen`, a pickled `nn.Module` — stops reading with
//! [`Error::ForbiddenGlobal`] naming it. `REDUCE`, `NEWOBJ` and `BUILD` are interpreted
//! only for those allowlisted callables, each by a fixed Rust rule.
//!
//! The result is an [`Obj`] tree in which tensors are still [`TensorRef`]s (a storage key plus
//! offset/shape/stride); `crate::torch` resolves them against the storages of the file.

use std::collections::HashMap;

use candle_core::DType;

use crate::Error;

/// A pickled value with tensors not yet read from their storages.
#[derive(Debug, Clone)]
pub enum Obj {
    /// Python's `None`.
    None,
    /// A `bool`.
    Bool(bool),
    /// An `int` that fits 64 bits.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `bytes`.
    Bytes(Vec<u8>),
    /// A `list`.
    List(Vec<Obj>),
    /// A `tuple`.
    Tuple(Vec<Obj>),
    /// Insertion-ordered (`dict` and `collections.OrderedDict`).
    Dict(Vec<(Obj, Obj)>),
    /// A `set` or `frozenset`.
    Set(Vec<Obj>),
    /// A tensor, its data still in the storage.
    Tensor(TensorRef),
    /// An allowlisted plain-data class (numpy scalar, Lightning's `ModelCheckpoint` state…),
    /// kept inert: its class name, constructor arguments and `BUILD` state.
    Object {
        /// The class's full name (`module.Name`).
        class: String,
        /// Its constructor's arguments.
        args: Vec<Obj>,
        /// What `BUILD` set on it, if anything.
        state: Option<Box<Obj>>,
    },
    // The variants below live only on the unpickler's stack.
    #[doc(hidden)]
    Global(Global),
    #[doc(hidden)]
    Storage(StorageRef),
}

/// A checkpoint's object tree with its tensors read (CPU, the dtype stored in the file).
#[derive(Debug, Clone)]
pub enum Value {
    /// Python's `None`.
    None,
    /// A `bool`.
    Bool(bool),
    /// An `int` that fits 64 bits.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `bytes`.
    Bytes(Vec<u8>),
    /// A `list`.
    List(Vec<Value>),
    /// A `tuple`.
    Tuple(Vec<Value>),
    /// Insertion-ordered (`dict` and `collections.OrderedDict`).
    Dict(Vec<(Value, Value)>),
    /// A `set` or `frozenset`.
    Set(Vec<Value>),
    /// A tensor (CPU, the dtype stored in the file).
    Tensor(candle_core::Tensor),
    /// An allowlisted plain-data object, never constructed: class name, arguments, state.
    Object {
        /// The class's full name (`module.Name`).
        class: String,
        /// Its constructor's arguments.
        args: Vec<Value>,
        /// What `BUILD` set on it, if anything.
        state: Option<Box<Value>>,
    },
}

impl Value {
    /// `self[key]` for a dict with string keys.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => d
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&candle_core::Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Every tensor in the tree under its dotted path: dict keys (strings or integers) and
    /// list/tuple indices joined with `.`, e.g. `state_dict.conv.weight`, `string_to_param.*`.
    pub fn flatten(&self) -> HashMap<String, candle_core::Tensor> {
        let mut out = HashMap::new();
        fn walk(v: &Value, prefix: &str, out: &mut HashMap<String, candle_core::Tensor>) {
            let join = |k: &str| {
                if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                }
            };
            match v {
                Value::Tensor(t) => {
                    out.insert(prefix.to_string(), t.clone());
                }
                Value::Dict(d) => {
                    for (k, v) in d {
                        let key = match k {
                            Value::Str(s) => s.clone(),
                            Value::Int(i) => i.to_string(),
                            _ => continue,
                        };
                        walk(v, &join(&key), out);
                    }
                }
                Value::List(items) | Value::Tuple(items) => {
                    for (i, v) in items.iter().enumerate() {
                        walk(v, &join(&i.to_string()), out);
                    }
                }
                _ => {}
            }
        }
        walk(self, "", &mut out);
        out
    }
}

/// The callables a torch checkpoint may name. Everything else is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor` (older files).
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`.
    RebuildParameterWithState,
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `builtins.dict`.
    Dict,
    /// `builtins.set`.
    Set,
    /// `builtins.frozenset`.
    FrozenSet,
    /// `torch.Size(...)`: a tuple.
    TorchSize,
    /// `torch.device(...)` / `torch.serialization._get_layout(...)`: kept as their string.
    AsString,
    /// `_codecs.encode(str, encoding)`: how protocol 2 spells `bytes`.
    CodecsEncode,
    /// `torch.FloatStorage` etc., with the element type it stores.
    StorageType(StorageDType),
    /// A plain-data class materialised as an inert [`Obj::Object`].
    DataClass(String),
    /// `copyreg._reconstructor(cls, object, None)`: allowed for data classes only.
    Reconstructor,
}

/// Element types of torch storages, including the ones candle cannot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDType {
    /// A type candle holds.
    Supported(DType),
    /// `torch.BoolStorage`, read as u8.
    Bool,
    /// A type candle cannot hold (named): tensors of it are refused when read.
    Unsupported(&'static str),
}

impl StorageDType {
    /// Bytes per element in the raw storage.
    pub fn size_in_bytes(self) -> usize {
        match self {
            StorageDType::Supported(d) => d.size_in_bytes(),
            StorageDType::Bool => 1,
            StorageDType::Unsupported(_) => 1,
        }
    }
}

/// A storage named by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// The storage's file name in the checkpoint (`data/<key>` in a zip).
    pub key: String,
    /// Its element type.
    pub dtype: StorageDType,
    /// Elements in the root storage.
    pub numel: usize,
    /// Legacy-format views: offset (in elements) of this view inside the root storage.
    pub view_offset: usize,
}

/// A tensor as the pickle describes it: a window onto a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage it views.
    pub storage: StorageRef,
    /// In elements, relative to the storage (view offset already added).
    pub offset: usize,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Elements to step per index of each axis.
    pub stride: Vec<usize>,
}

fn resolve_global(module: &str, name: &str) -> Result<Global, Error> {
    use DType::*;
    let storage = |d| Ok(Global::StorageType(StorageDType::Supported(d)));
    let unsupported = |n| Ok(Global::StorageType(StorageDType::Unsupported(n)));
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("builtins" | "__builtin__", "dict") => Ok(Global::Dict),
        ("builtins" | "__builtin__", "set") => Ok(Global::Set),
        ("builtins" | "__builtin__", "frozenset") => Ok(Global::FrozenSet),
        ("torch", "Size") => Ok(Global::TorchSize),
        ("torch", "device") | ("torch.serialization", "_get_layout") => Ok(Global::AsString),
        ("_codecs", "encode") => Ok(Global::CodecsEncode),
        ("copyreg" | "copy_reg", "_reconstructor") => Ok(Global::Reconstructor),
        ("torch" | "torch.cuda", storage_name) if storage_name.ends_with("Storage") => {
            match storage_name {
                "FloatStorage" => storage(F32),
                "HalfStorage" => storage(F16),
                "BFloat16Storage" => storage(BF16),
                "DoubleStorage" => storage(F64),
                "LongStorage" => storage(I64),
                "IntStorage" => storage(I32),
                "ShortStorage" => storage(I16),
                "ByteStorage" => storage(U8),
                "BoolStorage" => Ok(Global::StorageType(StorageDType::Bool)),
                "CharStorage" => unsupported("int8"),
                "ComplexFloatStorage" => unsupported("complex64"),
                "ComplexDoubleStorage" => unsupported("complex128"),
                _ => Err(Error::ForbiddenGlobal {
                    module: module.into(),
                    name: name.into(),
                }),
            }
        }
        // Inert data classes A1111's safe unpickler also accepts: seen in SD checkpoints.
        ("numpy.core.multiarray" | "numpy._core.multiarray", "scalar")
        | ("numpy", "dtype")
        | ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") => {
            Ok(Global::DataClass(format!("{module}.{name}")))
        }
        _ => Err(Error::ForbiddenGlobal {
            module: module.into(),
            name: name.into(),
        }),
    }
}

/// Hostile input must not exhaust memory: no single string/bytes may claim more than this.
const MAX_LEN: usize = 1 << 31;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Pickle {
            offset: self.pos,
            msg: msg.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > MAX_LEN || self.data.len() - self.pos < n {
            return Err(self.err(format!("needs {n} more bytes than the file holds")));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn line(&mut self) -> Result<&'a [u8], Error> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| self.err("unterminated text line"))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
    fn utf8(&self, b: &[u8]) -> Result<String, Error> {
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }
}

/// Deeper trees than this are not checkpoints (a state dict nests a handful of levels):
/// refusing them while reading keeps every recursive walk over the tree (dropping it
/// included) well inside a thread's stack.
pub const MAX_DEPTH: usize = 256;

/// `PUT`, `GET` and `DUP` copy values (the memo holds copies, not references), so a few bytes
/// can ask for a copy of everything read so far, and doubling a value through the memo grows
/// it exponentially. Copies may add up to this many units (a value or a string's byte each)
/// plus [`COPIES_PER_BYTE`] per byte of the pickle: torch pickles copy little besides short
/// strings and storage types.
const COPY_BUDGET: usize = 1 << 20;
const COPIES_PER_BYTE: usize = 8;

/// A value on the unpickler's stack or in its memo, with what bounds it: how deep it nests
/// and how many units (values, and bytes of strings) a copy of it costs.
#[derive(Clone)]
struct Slot {
    obj: Obj,
    depth: usize,
    size: usize,
}

impl Slot {
    fn leaf(obj: Obj) -> Slot {
        let size = 1 + match &obj {
            Obj::Str(s) => s.len(),
            Obj::Bytes(b) => b.len(),
            Obj::Tensor(t) => t.shape.len() + t.storage.key.len(),
            Obj::Storage(s) => s.key.len(),
            _ => 0,
        };
        Slot {
            obj,
            depth: 1,
            size,
        }
    }

    /// The value `make` builds around `items`, one level deeper than the deepest of them.
    fn around(items: Vec<Slot>, make: impl FnOnce(Vec<Obj>) -> Obj) -> Result<Slot, String> {
        let depth = 1 + items.iter().map(|s| s.depth).max().unwrap_or(0);
        check_depth(depth)?;
        let size = 1 + items.iter().map(|s| s.size).sum::<usize>();
        Ok(Slot {
            obj: make(items.into_iter().map(|s| s.obj).collect()),
            depth,
            size,
        })
    }

    /// Accounts for `depth`/`size` of children just put inside this value.
    fn grow(&mut self, depth: usize, size: usize) -> Result<(), String> {
        self.depth = self.depth.max(depth + 1);
        check_depth(self.depth)?;
        self.size = self.size.saturating_add(size);
        Ok(())
    }
}

fn check_depth(depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "values nested deeper than {MAX_DEPTH} levels: not a checkpoint"
        ));
    }
    Ok(())
}

/// What copies may still cost (see [`COPY_BUDGET`]).
struct Copies {
    left: usize,
}

impl Copies {
    fn copy(&mut self, s: &Slot) -> Result<Slot, String> {
        self.left = self.left.checked_sub(s.size).ok_or_else(|| {
            format!(
                "PUT/GET/DUP copies of values add up to more than a pickle of this size can \
                 hold (a copy of {} values and bytes asked, {} left): refusing to expand it",
                s.size, self.left
            )
        })?;
        Ok(s.clone())
    }
}

/// Unpickles one pickle from `data`, returning the value and the number of bytes consumed.
///
/// Its values nest at most [`MAX_DEPTH`] levels, and copies through the memo are bounded by
/// the size of `data`: a crafted pickle is an error, never a stack overflow or an
/// exponential expansion.
pub fn unpickle(data: &[u8]) -> Result<(Obj, usize), Error> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Slot> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u64, Slot> = HashMap::new();
    let mut copies = Copies {
        left: COPY_BUDGET.saturating_add(data.len().saturating_mul(COPIES_PER_BYTE)),
    };

    macro_rules! pop {
        () => {
            stack.pop().ok_or_else(|| r.err("stack underflow"))?
        };
    }
    macro_rules! top {
        () => {
            stack.last_mut().ok_or_else(|| r.err("stack underflow"))?
        };
    }
    macro_rules! pop_mark {
        () => {{
            let m = marks.pop().ok_or_else(|| r.err("no MARK on the stack"))?;
            if m > stack.len() {
                return Err(r.err("MARK beyond the stack"));
            }
            stack.split_off(m)
        }};
    }
    macro_rules! push {
        ($obj:expr) => {{
            let obj = $obj;
            stack.push(Slot::leaf(obj))
        }};
    }
    macro_rules! push_around {
        ($items:expr, $make:expr) => {{
            let slot = Slot::around($items, $make).map_err(|m| r.err(m))?;
            stack.push(slot)
        }};
    }
    macro_rules! copy {
        ($slot:expr) => {
            copies.copy($slot).map_err(|m| r.err(m))?
        };
    }

    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(r.err(format!("unsupported pickle protocol {proto}")));
                }
            }
            0x95 => {
                r.u64()?; // FRAME: a length hint only
            }
            b'.' => {
                let v = pop!();
                return Ok((v.obj, r.pos));
            }
            b'(' => marks.push(stack.len()),
            b'0' => {
                pop!();
            }
            b'1' => {
                let _ = pop_mark!();
            }
            b'2' => {
                let v = copy!(top!());
                stack.push(v);
            }
            // Constants and numbers
            b'N' => push!(Obj::None),
            0x88 => push!(Obj::Bool(true)),
            0x89 => push!(Obj::Bool(false)),
            b'J' => {
                let v = r.u32()? as i32;
                push!(Obj::Int(v as i64))
            }
            b'K' => {
                let v = r.u8()?;
                push!(Obj::Int(v as i64))
            }
            b'M' => {
                let v = r.u16()?;
                push!(Obj::Int(v as i64))
            }
            b'I' | b'L' => {
                let line = r.line()?;
                let s = std::str::from_utf8(line).map_err(|_| r.err("bad INT"))?;
                let s = s.trim_end_matches('L');
                let v = match s {
                    "00" => Obj::Bool(false),
                    "01" => Obj::Bool(true),
                    _ => Obj::Int(s.parse().map_err(|_| r.err(format!("bad INT {s:?}")))?),
                };
                push!(v)
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8()? as usize
                } else {
                    r.u32()? as usize
                };
                let bytes = r.take(n)?;
                push!(Obj::Int(
                    long_from_le(bytes).ok_or_else(|| r.err("integer does not fit in 64 bits"))?,
                ))
            }
            b'G' => {
                let b = r.take(8)?;
                push!(Obj::Float(f64::from_be_bytes(b.try_into().expect("8"))))
            }
            b'F' => {
                let line = r.line()?;
                let s = std::str::from_utf8(line).map_err(|_| r.err("bad FLOAT"))?;
                push!(Obj::Float(
                    s.trim().parse().map_err(|_| r.err("bad FLOAT"))?,
                ))
            }
            // Strings and bytes
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.u32()? as usize,
                    0x8c => r.u8()? as usize,
                    _ => r.u64()? as usize,
                };
                let b = r.take(n)?;
                push!(Obj::Str(r.utf8(b)?))
            }
            b'V' => {
                let line = r.line()?;
                push!(Obj::Str(r.utf8(line)?))
            }
            b'T' | b'U' => {
                // Python 2 `str`: bytes that checkpoints use as text.
                let n = if op == b'T' {
                    r.u32()? as usize
                } else {
                    r.u8()? as usize
                };
                let b = r.take(n)?;
                push!(Obj::Str(String::from_utf8_lossy(b).into_owned()))
            }
            b'S' => {
                let line = r.line()?;
                let s = String::from_utf8_lossy(line);
                let s = s.trim();
                let unquoted = s
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| s.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    .ok_or_else(|| r.err("STRING is not quoted"))?;
                push!(Obj::Str(unquoted.to_string()))
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => r.u32()? as usize,
                    b'C' => r.u8()? as usize,
                    _ => r.u64()? as usize,
                };
                let b = r.take(n)?;
                push!(Obj::Bytes(b.to_vec()))
            }
            // Containers
            b'}' => push!(Obj::Dict(Vec::new())),
            b']' => push!(Obj::List(Vec::new())),
            b')' => push!(Obj::Tuple(Vec::new())),
            0x8f => push!(Obj::Set(Vec::new())),
            b'l' => push_around!(pop_mark!(), Obj::List),
            b't' => push_around!(pop_mark!(), Obj::Tuple),
            0x91 => push_around!(pop_mark!(), Obj::Set),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(r.err("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                push_around!(items, Obj::Tuple)
            }
            b'd' => {
                let items = pop_mark!();
                if !items.len().is_multiple_of(2) {
                    return Err(r.err("odd number of items for a dict"));
                }
                push_around!(items, |items| Obj::Dict(pairs(items)))
            }
            b'a' => {
                let v = pop!();
                let list = top!();
                list.grow(v.depth, v.size).map_err(|m| r.err(m))?;
                match &mut list.obj {
                    Obj::List(l) => l.push(v.obj),
                    _ => return Err(r.err("APPEND to a non-list")),
                }
            }
            b'e' | 0x90 => {
                let items = pop_mark!();
                let container = top!();
                for s in &items {
                    container.grow(s.depth, s.size).map_err(|m| r.err(m))?;
                }
                let items = items.into_iter().map(|s| s.obj);
                match (op, &mut container.obj) {
                    (b'e', Obj::List(l)) => l.extend(items),
                    (0x90, Obj::Set(s)) => s.extend(items),
                    (b'e', _) => return Err(r.err("APPENDS to a non-list")),
                    _ => return Err(r.err("ADDITEMS to a non-set")),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop!();
                    let k = pop!();
                    vec![k, v]
                } else {
                    pop_mark!()
                };
                if !items.len().is_multiple_of(2) {
                    return Err(r.err("odd number of items for a dict"));
                }
                let dict = top!();
                for s in &items {
                    dict.grow(s.depth, s.size).map_err(|m| r.err(m))?;
                }
                let kv = pairs(items.into_iter().map(|s| s.obj).collect());
                match &mut dict.obj {
                    Obj::Dict(d) => d.extend(kv),
                    _ if op == b's' => return Err(r.err("SETITEM on a non-dict")),
                    _ => return Err(r.err("SETITEMS on a non-dict")),
                }
            }
            // Memo
            b'p' => {
                let line = r.line()?;
                let k = parse_ascii_u64(line).ok_or_else(|| r.err("bad PUT index"))?;
                let v = copy!(top!());
                memo.insert(k, v);
            }
            b'q' | b'r' => {
                let k = if op == b'q' {
                    r.u8()? as u64
                } else {
                    r.u32()? as u64
                };
                let v = copy!(top!());
                memo.insert(k, v);
            }
            0x94 => {
                let k = memo.len() as u64;
                let v = copy!(top!());
                memo.insert(k, v);
            }
            b'g' | b'h' | b'j' => {
                let k = match op {
                    b'g' => {
                        let line = r.line()?;
                        parse_ascii_u64(line).ok_or_else(|| r.err("bad GET index"))?
                    }
                    b'h' => r.u8()? as u64,
                    _ => r.u32()? as u64,
                };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| r.err(format!("memo key {k} was never stored")))?;
                let v = copy!(v);
                stack.push(v)
            }
            // Globals and calls: allowlisted, interpreted, never executed.
            b'c' => {
                let module = r.line()?;
                let module = r.utf8(module)?;
                let name = r.line()?;
                let name = r.utf8(name)?;
                push!(Obj::Global(resolve_global(&module, &name)?))
            }
            0x93 => {
                let name = pop!();
                let module = pop!();
                match (module.obj, name.obj) {
                    (Obj::Str(m), Obj::Str(n)) => push!(Obj::Global(resolve_global(&m, &n)?)),
                    _ => return Err(r.err("STACK_GLOBAL needs two strings")),
                }
            }
            b'R' => {
                let args = pop!();
                let callable = pop!();
                let (depth, size) = (args.depth, args.size);
                let args = match args.obj {
                    Obj::Tuple(a) => a,
                    _ => return Err(r.err("REDUCE arguments are not a tuple")),
                };
                let g = match callable.obj {
                    Obj::Global(g) => g,
                    _ => return Err(r.err("REDUCE on something that is not a global")),
                };
                // The result only rearranges its arguments: no deeper, no larger.
                let obj = call(g, args).map_err(|m| r.err(m))?;
                stack.push(Slot { obj, depth, size })
            }
            0x81 | 0x92 => {
                if op == 0x92 {
                    pop!(); // kwargs
                }
                let args = pop!();
                let cls = pop!();
                let (depth, size) = (args.depth, args.size);
                let args = match args.obj {
                    Obj::Tuple(a) => a,
                    _ => return Err(r.err("NEWOBJ arguments are not a tuple")),
                };
                let obj = match cls.obj {
                    Obj::Global(Global::DataClass(class)) => Obj::Object {
                        class,
                        args,
                        state: None,
                    },
                    Obj::Global(g @ (Global::OrderedDict | Global::Dict | Global::Set)) => {
                        call(g, args).map_err(|m| r.err(m))?
                    }
                    _ => return Err(r.err("NEWOBJ of a class that is not plain data")),
                };
                stack.push(Slot { obj, depth, size })
            }
            b'b' => {
                let state = pop!();
                let target = top!();
                match target.obj {
                    Obj::Object { .. } => {
                        target.grow(state.depth, state.size).map_err(|m| r.err(m))?;
                        if let Obj::Object { state: s, .. } = &mut target.obj {
                            *s = Some(Box::new(state.obj))
                        }
                    }
                    // OrderedDict `_metadata`, parameter hooks: not weights.
                    Obj::Dict(_) | Obj::Tensor(_) => {}
                    _ => return Err(r.err("BUILD on an object that is not plain data")),
                }
            }
            b'Q' => {
                let pid = pop!();
                push!(persistent_load(pid.obj).map_err(|m| r.err(m))?)
            }
            b'P' => {
                let line = r.line()?;
                let _ = line;
                return Err(r.err("text persistent ids are not used by torch checkpoints"));
            }
            b'i' | b'o' => {
                return Err(r.err("INST/OBJ build arbitrary class instances; refused"));
            }
            0x82..=0x84 => return Err(r.err("extension registry codes are refused")),
            0x97 | 0x98 => return Err(r.err("out-of-band buffers are not supported")),
            _ => return Err(r.err(format!("unknown opcode 0x{op:02x}"))),
        }
    }
}

fn parse_ascii_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

/// Two's-complement little-endian integer (LONG1/LONG4).
fn long_from_le(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 8 {
        // Fits only if the extra bytes are pure sign extension.
        let neg = bytes[bytes.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        if bytes[8..].iter().any(|&b| b != fill) || ((bytes[7] & 0x80 != 0) != neg) {
            return None;
        }
        return long_from_le(&bytes[..8]);
    }
    let neg = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Some(i64::from_le_bytes(buf))
}

/// Key/value pairs of a flat list; callers check that the count is even.
fn pairs(items: Vec<Obj>) -> Vec<(Obj, Obj)> {
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

fn as_usize(o: &Obj, what: &str) -> Result<usize, String> {
    match o {
        Obj::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => Err(format!("{what} is not a non-negative integer: {o:?}")),
    }
}

fn usize_tuple(o: &Obj, what: &str) -> Result<Vec<usize>, String> {
    match o {
        Obj::Tuple(items) | Obj::List(items) => items.iter().map(|i| as_usize(i, what)).collect(),
        _ => Err(format!("{what} is not a tuple")),
    }
}

fn persistent_load(pid: Obj) -> Result<Obj, String> {
    let items = match pid {
        Obj::Tuple(items) => items,
        other => return Err(format!("persistent id is not a tuple: {other:?}")),
    };
    match items.as_slice() {
        [Obj::Str(tag), Obj::Global(Global::StorageType(dtype)), key, _location, numel, rest @ ..]
            if tag == "storage" =>
        {
            let key = match key {
                Obj::Str(s) => s.clone(),
                Obj::Int(i) => i.to_string(),
                _ => return Err("storage key is not a string".into()),
            };
            let numel = as_usize(numel, "storage size")?;
            // Legacy format: (view_key, offset, view_size) when the storage is a view.
            let view_offset = match rest {
                [] | [Obj::None] => 0,
                [Obj::Tuple(view)] if view.len() == 3 => as_usize(&view[1], "view offset")?,
                _ => return Err("unrecognised storage view metadata".into()),
            };
            Ok(Obj::Storage(StorageRef {
                key,
                dtype: *dtype,
                numel,
                view_offset,
            }))
        }
        _ => Err("persistent id is not a torch storage reference".into()),
    }
}

fn call(g: Global, args: Vec<Obj>) -> Result<Obj, String> {
    match g {
        Global::RebuildTensorV2 | Global::RebuildTensor => {
            if args.len() < 4 {
                return Err("_rebuild_tensor needs (storage, offset, size, stride, …)".into());
            }
            let storage = match &args[0] {
                Obj::Storage(s) => s.clone(),
                _ => return Err("_rebuild_tensor's first argument is not a storage".into()),
            };
            let offset = as_usize(&args[1], "storage offset")? + storage.view_offset;
            let shape = usize_tuple(&args[2], "tensor size")?;
            let stride = usize_tuple(&args[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err("tensor size and stride differ in length".into());
            }
            Ok(Obj::Tensor(TensorRef {
                storage,
                offset,
                shape,
                stride,
            }))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(t @ Obj::Tensor(_)) => Ok(t.clone()),
            _ => Err("_rebuild_parameter's data is not a tensor".into()),
        },
        Global::OrderedDict | Global::Dict => match args.into_iter().next() {
            None => Ok(Obj::Dict(Vec::new())),
            Some(Obj::Dict(d)) => Ok(Obj::Dict(d)),
            Some(Obj::List(items)) | Some(Obj::Tuple(items)) => {
                let mut d = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Obj::Tuple(kv) | Obj::List(kv) if kv.len() == 2 => {
                            let mut kv = kv.into_iter();
                            d.push((kv.next().expect("2"), kv.next().expect("2")));
                        }
                        _ => return Err("dict items are not pairs".into()),
                    }
                }
                Ok(Obj::Dict(d))
            }
            Some(_) => Err("dict() of something that is not a mapping".into()),
        },
        Global::Set | Global::FrozenSet => match args.into_iter().next() {
            None => Ok(Obj::Set(Vec::new())),
            Some(Obj::List(items)) | Some(Obj::Tuple(items)) | Some(Obj::Set(items)) => {
                Ok(Obj::Set(items))
            }
            Some(_) => Err("set() of something that is not a sequence".into()),
        },
        Global::TorchSize => match args.into_iter().next() {
            Some(Obj::Tuple(items)) | Some(Obj::List(items)) => Ok(Obj::Tuple(items)),
            _ => Err("torch.Size of something that is not a tuple".into()),
        },
        Global::AsString => match args.first() {
            Some(Obj::Str(s)) => Ok(Obj::Str(s.clone())),
            _ => Ok(Obj::Str(String::new())),
        },
        Global::CodecsEncode => match args.as_slice() {
            [Obj::Str(s), ..] => {
                // latin1 is what protocol 2 uses for bytes; each char is one byte.
                Ok(Obj::Bytes(s.chars().map(|c| c as u32 as u8).collect()))
            }
            _ => Err("_codecs.encode of something that is not a string".into()),
        },
        Global::DataClass(class) => Ok(Obj::Object {
            class,
            args,
            state: None,
        }),
        Global::Reconstructor => match args.into_iter().next() {
            Some(Obj::Global(Global::DataClass(class))) => Ok(Obj::Object {
                class,
                args: Vec::new(),
                state: None,
            }),
            _ => Err("copyreg._reconstructor of a class that is not plain data".into()),
        },
        Global::StorageType(_) => Err("calling a storage type is not supported".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_decoding_handles_sign_and_width() {
        assert_eq!(long_from_le(&[0xff]), Some(-1));
        assert_eq!(long_from_le(&[0x00, 0x01]), Some(256));
        assert_eq!(long_from_le(&[0x80, 0x00]), Some(128));
        // The legacy torch magic number needs 80 bits: too big, reported rather than wrapped.
        let magic = 0x1950a86a20f9469cfc6c_u128.to_le_bytes();
        assert_eq!(long_from_le(&magic[..10]), None);
    }

    #[test]
    fn plain_pickle_of_builtin_types() {
        // pickle.dumps({'a': [1, 2.5, None, True], 'b': (b'xy', 'é')}, protocol=2)
        let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03c_codecs\nencode\nq\x04X\x02\x00\x00\x00xyq\x05X\x06\x00\x00\x00latin1q\x06\x86q\x07Rq\x08X\x02\x00\x00\x00\xc3\xa9q\t\x86q\nu.";
        let (v, n) = unpickle(data).unwrap();
        assert_eq!(n, data.len());
        let Obj::Dict(d) = v else {
            panic!("not a dict")
        };
        assert_eq!(d.len(), 2);
        match &d[0].1 {
            Obj::List(l) => {
                assert!(matches!(l[0], Obj::Int(1)));
                assert!(matches!(l[1], Obj::Float(f) if f == 2.5));
                assert!(matches!(l[2], Obj::None));
                assert!(matches!(l[3], Obj::Bool(true)));
            }
            other => panic!("{other:?}"),
        }
        match &d[1].1 {
            Obj::Tuple(t) => {
                assert!(matches!(&t[0], Obj::Bytes(b) if b == b"xy"));
                assert!(matches!(&t[1], Obj::Str(s) if s == "é"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forbidden_global_is_named_and_truncation_is_an_error() {
        let err = unpickle(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap_err();
        assert!(err.to_string().contains("os.system"), "{err}");
        let err = unpickle(b"\x80\x02X\x10\x00\x00\x00ab").unwrap_err();
        assert!(matches!(err, Error::Pickle { .. }), "{err}");
        let err = unpickle(b"\x80\x02]q\x00").unwrap_err();
        assert!(matches!(err, Error::Pickle { .. }), "{err}");
    }
}
