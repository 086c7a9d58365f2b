//! Reading the GGUF container: header, metadata, tensor infos and the tensor data section.
//!
//! Layout (little-endian, versions 2 and 3; see `gguf.h` / llama.cpp's `docs/gguf.md`):
//!
//! ```text
//! "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count  x (key: string, type: u32, value)
//! tensor_count x (name: string, n_dims: u32, ne: [u64; n_dims], type: u32, offset: u64)
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//!
//! A string is a `u64` byte length and UTF-8 bytes; an array is an element type `u32`, a `u64`
//! count and the elements. `ne[0]` is the innermost (fastest-varying) dimension.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dequant::Dequantizer;
use crate::error::{GgufError, Result};
use crate::ggml_type::GgmlType;
use crate::value::Value;

const MAGIC: &[u8; 4] = b"GGUF";
/// `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// How deep arrays of arrays may nest; real files use one level.
const MAX_ARRAY_NESTING: u32 = 8;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A parsed GGUF file; the tensor data stays in the (memory-mapped) file until asked for.
pub struct GgufFile {
    path: PathBuf,
    bytes: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: BTreeMap<String, usize>,
}

/// One tensor's entry in the file's tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: `dims[0]` is the innermost one (ggml's `ne`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
    /// Byte length of the data; `None` for a type whose layout is unknown.
    pub n_bytes: Option<u64>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The row-major shape PyTorch / safetensors use: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::io("open", path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io("stat", path, e))?.len();
        let bytes = if len < 64 {
            // Too small to be a model (and mapping an empty file fails); read it to report why.
            Storage::Owned(std::fs::read(path).map_err(|e| GgufError::io("read", path, e))?)
        } else {
            // SAFETY: the map is read-only. As with every memory-mapped reader, the file must
            // not be truncated by another process while it is open.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::io("memory-map", path, e))?;
            Storage::Mapped(map)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses a GGUF image held in memory; `name` is only used in messages.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<Self> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Storage) -> Result<Self> {
        let mut r = Cursor { bytes: &bytes, pos: 0, path: &path };

        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            let found = match bytes.len() {
                0 => "nothing (the file is empty)".to_string(),
                n => format!("\"{}\"", bytes[..n.min(4)].escape_ascii()),
            };
            return Err(GgufError::NotGguf { path, found });
        }
        r.pos = 4;
        let version = r.u32("the version")?;
        if version.swap_bytes() <= 3 && version > 3 {
            return Err(GgufError::BigEndian { path });
        }
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path, version });
        }
        let tensor_count = r.u64("the tensor count")?;
        let kv_count = r.u64("the metadata count")?;
        // Each key/value takes at least 12 bytes and each tensor info at least 24; a count
        // beyond that is garbage, and must not drive an allocation.
        r.check_count(kv_count, 12, "the metadata")?;

        let mut metadata = BTreeMap::new();
        for index in 0..kv_count {
            let key = r.string(&format!("the key of metadata entry {index}"))?;
            let what = format!("the value of metadata key {key:?}");
            let ty = r.u32(&what)?;
            let value = r.value(ty, &what, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.malformed(format!("metadata key {key:?} appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(r.malformed(format!("general.alignment is {v}, not a power of two"))),
            },
        };

        r.check_count(tensor_count, 24, "the tensor table")?;
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut by_name = BTreeMap::new();
        for index in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {index}"))?;
            let what = format!("the info of tensor {name:?}");
            let n_dims = r.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(
                    r.malformed(format!("tensor {name:?} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"))
                );
            }
            let dims = (0..n_dims).map(|_| r.u64(&what)).collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType::from_id(r.u32(&what)?);
            let offset = r.u64(&what)?;

            let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let Some(n_elements) = n_elements.filter(|&n| n < 1 << 48) else {
                return Err(r.malformed(format!("tensor {name:?} has impossible dimensions {dims:?}")));
            };
            if let Some((block, _)) = ggml_type.block_layout() {
                if dims[0] % block != 0 {
                    return Err(r.malformed(format!(
                        "tensor {name:?} has rows of {} elements, not a whole number of {ggml_type} blocks of {block}",
                        dims[0]
                    )));
                }
            }
            if offset % alignment != 0 {
                return Err(r.malformed(format!(
                    "tensor {name:?} starts at offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            let n_bytes = ggml_type.byte_size(n_elements);
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(r.malformed(format!("tensor {name:?} appears twice")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_bytes });
        }

        let data_offset = (r.pos as u64).next_multiple_of(alignment);
        let len = bytes.len() as u64;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|start| start.checked_add(t.n_bytes.unwrap_or(0)));
            if end.is_none_or(|end| end > len) {
                return Err(GgufError::Truncated {
                    path,
                    what: format!("the data of tensor {:?}", t.name),
                    offset: data_offset.saturating_add(t.offset),
                    needed: t.n_bytes.unwrap_or(0),
                    len,
                });
            }
        }

        Ok(GgufFile { path, bytes, version, alignment, data_offset, metadata, tensors, by_name })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data (`general.alignment`, 32 when absent).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the tensor data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?.ok_or(GgufError::MissingMetadata {
            key: "general.architecture".into(),
            hint: "every llama.cpp model file names its architecture; the file is not a model",
        })
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> Result<&[u8]> {
        let n_bytes = tensor
            .n_bytes
            .ok_or_else(|| GgufError::UnsupportedTensorType { tensor: tensor.name.clone(), ty: tensor.ggml_type })?;
        // In range: checked when the file was parsed.
        let start = (self.data_offset + tensor.offset) as usize;
        Ok(&self.bytes[start..start + n_bytes as usize])
    }

    /// A checked dequantizer for a tensor's data.
    pub fn dequantizer(&self, tensor: &TensorInfo) -> Result<Dequantizer<'_>> {
        if !tensor.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedTensorType { tensor: tensor.name.clone(), ty: tensor.ggml_type });
        }
        let data = self.tensor_data(tensor)?;
        Dequantizer::new(tensor.ggml_type, data, tensor.n_elements() as usize)
            .map_err(|source| GgufError::Dequantize { tensor: tensor.name.clone(), source })
    }

    /// A tensor's values as `f32`, in GGUF element order (row-major over [`TensorInfo::shape`]).
    pub fn dequantize(&self, tensor: &TensorInfo) -> Result<Vec<f32>> {
        Ok(self.dequantizer(tensor)?.to_vec())
    }

    /// An integer metadata value; `Ok(None)` when absent, an error when it is not an integer.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// A numeric metadata value as `f64` (see [`Value::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        let strings = items.iter().map(Value::as_str).collect::<Option<Vec<_>>>();
        strings.map(Some).ok_or_else(|| GgufError::MetadataType {
            key: key.into(),
            found: self.metadata[key].type_name(),
            expected: "an array of strings",
        })
    }

    /// An array of integers.
    pub fn get_u64s(&self, key: &str) -> Result<Option<Vec<u64>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        let ints = items.iter().map(Value::as_u64).collect::<Option<Vec<_>>>();
        ints.map(Some).ok_or_else(|| GgufError::MetadataType {
            key: key.into(),
            found: self.metadata[key].type_name(),
            expected: "an array of non-negative integers",
        })
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(value) => convert(value).map(Some).ok_or_else(|| GgufError::MetadataType {
                key: key.into(),
                found: value.type_name(),
                expected,
            }),
        }
    }
}

/// A little-endian reader over the file bytes that turns short reads into [`GgufError::Truncated`].
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let available = (self.bytes.len() - self.pos) as u64;
        if n > available {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed(format!("{what} is not valid UTF-8")))
    }

    /// Fails as truncated when `count` items of at least `min_size` bytes cannot fit in the rest
    /// of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let available = (self.bytes.len() - self.pos) as u64;
        if count.saturating_mul(min_size) > available {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{what} ({count} entries)"),
                offset: self.pos as u64,
                needed: count.saturating_mul(min_size),
                len: self.bytes.len() as u64,
            });
        }
        Ok(())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => Value::Bool(self.array::<1>(what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.malformed(format!("{what} nests arrays more than {MAX_ARRAY_NESTING} deep")));
                }
                let item_type = self.u32(what)?;
                let count = self.u64(what)?;
                let min_size = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(self.malformed(format!("{what} is an array of unknown type {other}"))),
                };
                self.check_count(count, min_size, what)?;
                let items = (0..count).map(|_| self.value(item_type, what, depth + 1)).collect::<Result<Vec<_>>>()?;
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.malformed(format!("{what} has unknown value type {other}"))),
        })
    }

    fn malformed(&self, detail: String) -> GgufError {
        GgufError::Malformed { path: self.path.to_path_buf(), detail }
    }
}
