//! PyTorch checkpoints (`pytorch_model.bin`, as `torch.save` writes them since 1.6: a zip holding a
//! pickled state dict in `*/data.pkl` and each storage in `*/data/KEY`), read without running any of
//! the pickle: a small interpreter that knows the handful of objects a state dict is made of
//! (`OrderedDict`, `torch._utils._rebuild_tensor_v2`, typed storages) and refuses every other global
//! by name, so a `.bin` that would run code is an error, never code. The zip's entries are stored
//! uncompressed, so the file is memory-mapped and each tensor read straight from its storage's bytes,
//! like a safetensors file: no copy of the file, one tensor at a time.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};

/// One tensor of the state dict: where its storage's bytes are in the file, and its view of them.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// In elements.
    strides: Vec<usize>,
    /// Byte range of the whole storage in the file.
    storage: (usize, usize),
    /// In elements, into the storage.
    offset: usize,
}

/// A tensor's element type, shape and row-major bytes.
pub type TensorBytes<'a> = (Dtype, &'a [usize], Cow<'a, [u8]>);

/// A PyTorch checkpoint, mapped.
pub struct TorchBin {
    path: String,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, Entry>,
}

impl TorchBin {
    pub fn open(path: &Path) -> Result<TorchBin> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::io(&name, e))?;
        // SAFETY: mapped read-only; conala does not modify checkpoints while it reads them.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&name, e))?;
        if !map.starts_with(b"PK\x03\x04") {
            return Err(Error::model(if map.starts_with(&[0x80]) {
                format!("{name}: a PyTorch file in the legacy (before torch 1.6) format; conala reads the zip format: re-save it with torch.save, or as safetensors")
            } else {
                format!("{name}: not a PyTorch checkpoint (no zip archive)")
            }));
        }
        let bad =
            |why: String| Error::model(format!("{name}: not a readable PyTorch checkpoint: {why}"));
        let mut zip =
            zip::ZipArchive::new(std::io::Cursor::new(&map[..])).map_err(|e| bad(e.to_string()))?;
        let mut entries: HashMap<String, (usize, usize)> = HashMap::new();
        let mut pickle = None;
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(|e| bad(e.to_string()))?;
            let fname = f.name().map_err(|e| bad(e.to_string()))?.into_owned();
            let start = f
                .data_start()
                .ok_or_else(|| bad(format!("no data offset for `{fname}`")))?
                as usize;
            let len = f.compressed_size() as usize;
            if fname.ends_with("/data.pkl") || fname == "data.pkl" {
                let prefix = fname.trim_end_matches("data.pkl").to_string();
                pickle = Some((prefix, i));
            } else if f.compression() != zip::CompressionMethod::Stored {
                if fname.contains("/data/") {
                    return Err(bad(format!("storage `{fname}` is compressed")));
                }
                continue;
            }
            if start.checked_add(len).is_none_or(|end| end > map.len()) {
                return Err(bad(format!("`{fname}` ends past the end of the file")));
            }
            entries.insert(fname, (start, len));
        }
        let (prefix, index) = pickle.ok_or_else(|| bad("no data.pkl in the archive".into()))?;
        if let Some(&(s, l)) = entries.get(&format!("{prefix}byteorder")) {
            if &map[s..s + l] != b"little" {
                return Err(bad("a big-endian checkpoint".into()));
            }
        }
        let mut text = vec![];
        zip.by_index(index)
            .and_then(|mut f| f.read_to_end(&mut text).map_err(Into::into))
            .map_err(|e| bad(format!("data.pkl: {e}")))?;
        let root = Unpickler::new(&text)
            .run()
            .map_err(|e| Error::model(format!("{name}: {e}")))?;
        let tensors = state_dict(root, |key| {
            entries.get(&format!("{prefix}data/{key}")).copied()
        })
        .map_err(|e| Error::model(format!("{name}: {e}")))?;
        Ok(TorchBin {
            path: name,
            map,
            tensors,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = (&String, &[usize])> {
        self.tensors.iter().map(|(n, e)| (n, e.shape.as_slice()))
    }

    /// The tensor's dtype, shape and bytes (row-major): borrowed from the map when the tensor is
    /// contiguous (state dicts' are), gathered from its strides otherwise.
    pub fn bytes(&self, name: &str) -> Result<TensorBytes<'_>> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::model(format!("{}: missing tensor `{name}`", self.path)))?;
        let width = e.dtype.bitsize() / 8;
        let storage = &self.map[e.storage.0..e.storage.0 + e.storage.1];
        let n: usize = e.shape.iter().product();
        let past = |elems: usize| elems * width > storage.len();
        let reach: usize = e.offset
            + e.shape
                .iter()
                .zip(&e.strides)
                .map(|(d, s)| d.saturating_sub(1) * s)
                .sum::<usize>();
        if n > 0 && past(reach + 1) {
            return Err(Error::model(format!(
                "{}: tensor `{name}` reaches past the end of its storage",
                self.path
            )));
        }
        let row_major = contiguous_strides(&e.shape);
        if n == 0 || e.strides == row_major {
            let start = e.offset * width;
            return Ok((
                e.dtype,
                &e.shape,
                Cow::Borrowed(&storage[start..start + n * width]),
            ));
        }
        let mut out = Vec::with_capacity(n * width);
        let mut index = vec![0usize; e.shape.len()];
        for _ in 0..n {
            let at = e.offset
                + index
                    .iter()
                    .zip(&e.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[at * width..(at + 1) * width]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < e.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok((e.dtype, &e.shape, Cow::Owned(out)))
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// The objects a state dict's pickle builds.
#[derive(Debug, Clone)]
enum Value {
    None,
    /// A bool or a float (what a state dict holds of them is never needed).
    Number,
    Int(i64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Also an `OrderedDict` (its class is not kept).
    Dict(Vec<(Value, Value)>),
    /// A global this reader knows (module, name).
    Global(&'static str, &'static str),
    /// A persistent id: a storage of `dtype` named `key` in the archive.
    Storage {
        dtype: Dtype,
        key: String,
    },
    Tensor(Tensor),
    Mark,
}

#[derive(Debug, Clone)]
struct Tensor {
    dtype: Dtype,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// The globals a plain state dict refers to; anything else is refused by name.
const GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
];

/// torch's typed storage classes and their element types.
const STORAGES: &[(&str, Dtype)] = &[
    ("FloatStorage", Dtype::F32),
    ("HalfStorage", Dtype::F16),
    ("BFloat16Storage", Dtype::BF16),
    ("DoubleStorage", Dtype::F64),
    ("LongStorage", Dtype::I64),
    ("IntStorage", Dtype::I32),
    ("ShortStorage", Dtype::I16),
    ("CharStorage", Dtype::I8),
    ("ByteStorage", Dtype::U8),
    ("BoolStorage", Dtype::BOOL),
];

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

type Step<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: vec![],
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or("data.pkl ends early")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("data.pkl ends early")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Step<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "a malformed pickle (stack underflow)".to_string())
    }

    /// Everything above the last mark.
    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("a malformed pickle (no mark)")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> Step<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "a malformed pickle (empty stack)".to_string())
    }

    fn global(module: &str, name: &str) -> Step<Value> {
        if let Some((m, n)) = GLOBALS.iter().find(|(m, n)| *m == module && *n == name) {
            return Ok(Value::Global(m, n));
        }
        if module == "torch" {
            if let Some((n, _)) = STORAGES.iter().find(|(n, _)| *n == name) {
                return Ok(Value::Global("torch", n));
            }
        }
        Err(format!(
            "not a plain state dict: its pickle refers to `{module}.{name}`; conala reads tensors only and never runs code from a checkpoint (save the weights with `torch.save(model.state_dict(), ...)` or as safetensors)"
        ))
    }

    fn run(mut self) -> Step<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b']' => self.stack.push(Value::List(vec![])),
                b')' => self.stack.push(Value::Tuple(vec![])),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Number),
                b'K' => {
                    let v = self.u8()? as i64;
                    self.stack.push(Value::Int(v));
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64));
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.stack.push(Value::Int(v));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err("an integer too large for a tensor size".into());
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Number);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = String::from_utf8_lossy(self.take(n)?).into_owned();
                    self.stack.push(Value::Str(s));
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'r' => {
                    let k = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(k, v);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v = self.memo.get(&k).cloned().ok_or("a malformed pickle (memo)")?;
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("a malformed pickle (stack underflow)".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Self::global(&module, &name)?);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Self::global(&m, &n)?),
                        _ => return Err("a malformed pickle (STACK_GLOBAL)".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(storage(pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    self.stack.push(reduce(f, args)?);
                }
                b'b' => {
                    // BUILD: an OrderedDict's `_metadata`, a tensor's state: nothing to keep.
                    self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => return Err("not a plain state dict (an object with state)".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err("a malformed pickle (SETITEM)".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let Value::Dict(d) = self.top()? else {
                        return Err("a malformed pickle (SETITEMS)".into());
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("a malformed pickle (APPEND)".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("a malformed pickle (APPENDS)".into()),
                    }
                }
                other => {
                    return Err(format!(
                        "not a plain state dict: pickle opcode 0x{other:02x} at byte {} is not one a state dict uses",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}

/// A persistent id `('storage', torch.XStorage, key, location, numel)`.
fn storage(pid: Value) -> Step<Value> {
    if let Value::Tuple(t) = &pid {
        if let [Value::Str(kind), Value::Global("torch", cls), Value::Str(key), ..] = t.as_slice() {
            if kind == "storage" {
                if let Some((_, dtype)) = STORAGES.iter().find(|(n, _)| n == cls) {
                    return Ok(Value::Storage {
                        dtype: *dtype,
                        key: key.clone(),
                    });
                }
            }
        }
    }
    Err("not a plain state dict (a persistent id that is not a storage)".into())
}

fn usizes(v: &Value, what: &str) -> Step<Vec<usize>> {
    match v {
        Value::Tuple(t) => t
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!("a tensor {what} that is not a tuple of sizes")),
            })
            .collect(),
        _ => Err(format!("a tensor {what} that is not a tuple")),
    }
}

/// The calls a state dict's pickle makes, evaluated on plain values.
fn reduce(f: Value, args: Value) -> Step<Value> {
    let Value::Global(module, name) = f else {
        return Err(
            "not a plain state dict (a call of something that is not a known global)".into(),
        );
    };
    let Value::Tuple(args) = args else {
        return Err(format!(
            "`{module}.{name}` called without an argument tuple"
        ));
    };
    match (module, name) {
        ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(vec![])),
        ("torch._utils", "_rebuild_tensor_v2") => match args.as_slice() {
            [Value::Storage { dtype, key }, Value::Int(offset), size, stride, ..]
                if *offset >= 0 =>
            {
                let (shape, strides) = (usizes(size, "size")?, usizes(stride, "stride")?);
                if shape.len() != strides.len() {
                    return Err("a tensor whose size and stride differ in rank".into());
                }
                Ok(Value::Tensor(Tensor {
                    dtype: *dtype,
                    key: key.clone(),
                    offset: *offset as usize,
                    shape,
                    strides,
                }))
            }
            _ => Err("`_rebuild_tensor_v2` with arguments a state dict does not have".into()),
        },
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("`_rebuild_parameter` of something that is not a tensor".into()),
        },
        ("torch._tensor", "_rebuild_from_type_v2") => match args.as_slice() {
            [f @ Value::Global(..), Value::Global("torch.nn.parameter", "Parameter"), inner, ..] => {
                reduce(f.clone(), inner.clone())
            }
            _ => Err("`_rebuild_from_type_v2` of something that is not a parameter".into()),
        },
        _ => Err(format!(
            "not a plain state dict: it calls `{module}.{name}`"
        )),
    }
}

/// The root object as a state dict: text keys, tensor values.
fn state_dict(
    root: Value,
    entry: impl Fn(&str) -> Option<(usize, usize)>,
) -> Step<BTreeMap<String, Entry>> {
    let Value::Dict(items) = root else {
        return Err("not a plain state dict (the pickle's root is not a dict)".into());
    };
    let mut out = BTreeMap::new();
    for (k, v) in items {
        let Value::Str(k) = k else {
            return Err("not a plain state dict (a key that is not text)".into());
        };
        let Value::Tensor(t) = v else {
            return Err(format!(
                "not a plain state dict: `{k}` holds {}, not a tensor (a training checkpoint? save `model.state_dict()`)",
                match v {
                    Value::Dict(_) => "a dict",
                    Value::List(_) | Value::Tuple(_) => "a list",
                    Value::Int(_) | Value::Number => "a number",
                    Value::Str(_) => "text",
                    _ => "an object",
                }
            ));
        };
        let storage = entry(&t.key)
            .ok_or_else(|| format!("`{k}`: storage {} is missing from the archive", t.key))?;
        out.insert(
            k,
            Entry {
                dtype: t.dtype,
                shape: t.shape,
                strides: t.strides,
                storage,
                offset: t.offset,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_of_row_major_layouts() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[5]), vec![1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }

    #[test]
    fn globals_outside_a_state_dict_are_refused_by_name() {
        // PROTO 2, GLOBAL 'posix system', STOP: never resolved, let alone called.
        let e = Unpickler::new(b"\x80\x02cposix\nsystem\n.")
            .run()
            .unwrap_err();
        assert!(
            e.contains("`posix.system`") && e.contains("never runs code"),
            "{e}"
        );
        // A truncated pickle is an error, not a panic.
        let e = Unpickler::new(b"\x80\x02X\xff\x00\x00\x00ab")
            .run()
            .unwrap_err();
        assert!(e.contains("ends early"), "{e}");
    }
}
