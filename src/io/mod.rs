//! File I/O shared by every format: memory-mapped safetensors reading, atomic safetensors and JSON
//! writing (temp file in the target directory, fsync, then rename, so a crash never leaves a
//! half-written file), and dtype mapping.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub mod peft;

/// Maps a crate dtype to the safetensors dtype.
pub fn to_st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::U8 => StDtype::U8,
        DType::I32 => StDtype::I32,
        DType::I64 => StDtype::I64,
    }
}

/// Maps a safetensors dtype to the crate's, if the crate supports it.
pub fn from_st_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::U8 => DType::U8,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        _ => return None,
    })
}

/// A read-only, memory-mapped safetensors file. Header parsing and bounds checks are done by the
/// `safetensors` crate when opened; tensors are decoded on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    names: Vec<String>,
    metadata: Option<HashMap<String, String>>,
    /// The parsed header (owned, no borrow of the map) and where the data section starts, so that a
    /// lookup does not re-parse the header (which made reading every tensor O(n²) in the tensor count).
    header: safetensors::tensor::Metadata,
    data_start: usize,
}

impl SafetensorsFile {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped could
        // fault; that is the documented contract of every mmap-based safetensors loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (names, metadata, header, data_start) = {
            // Full validation (offsets within the file, no overlaps) happens here, once.
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
            let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
            names.sort();
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
            (names, meta.metadata().clone(), meta, 8 + n)
        };
        Ok(SafetensorsFile {
            path,
            mmap,
            names,
            metadata,
            header,
            data_start,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// True if a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    pub(crate) fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path.display().to_string(), msg)
    }

    /// The raw view of one tensor: safetensors dtype, shape and little-endian bytes (borrowed).
    pub fn raw(&self, name: &str) -> Result<(StDtype, Vec<usize>, &[u8])> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| self.err(format!("missing tensor {name:?}")))?;
        let (begin, end) = info.data_offsets;
        // In bounds: `open` validated every offset against the file size with `SafeTensors::deserialize`.
        let data = self
            .mmap
            .get(self.data_start + begin..self.data_start + end)
            .ok_or_else(|| self.err(format!("tensor {name:?} lies outside the file")))?;
        Ok((info.dtype, info.shape.clone(), data))
    }

    /// Loads one tensor onto `device`. Fails for dtypes the crate does not support.
    pub fn load(&self, name: &str, device: Device) -> Result<Tensor> {
        let (dtype, shape, data) = self.raw(name)?;
        let dt = from_st_dtype(dtype)
            .ok_or_else(|| self.err(format!("tensor {name:?} has unsupported dtype {dtype:?}")))?;
        Tensor::from_bytes(data, dt, &shape, device)
    }
}

/// One tensor to write: dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct TensorBytes<'a> {
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorBytes<'a> {
    /// Bytes of a [`Tensor`] (downloaded if on a GPU).
    pub fn from_tensor(t: &Tensor) -> Result<TensorBytes<'static>> {
        Ok(TensorBytes {
            dtype: to_st_dtype(t.dtype()),
            shape: t.shape().to_vec(),
            data: Cow::Owned(t.to_bytes()?),
        })
    }

    /// Borrowed raw bytes (used to pass tensors through unchanged).
    pub fn borrowed(dtype: StDtype, shape: Vec<usize>, data: &'a [u8]) -> TensorBytes<'a> {
        TensorBytes {
            dtype,
            shape,
            data: Cow::Borrowed(data),
        }
    }
}

impl safetensors::View for &TensorBytes<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes a safetensors file atomically (temp file + fsync + rename).
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorBytes<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    for (name, t) in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8;
        if want != t.data.len() {
            return Err(Error::shape(
                "write_safetensors",
                format!(
                    "tensor {name:?}: shape {:?} of {:?} needs {want} bytes, got {}",
                    t.shape,
                    t.dtype,
                    t.data.len()
                ),
            ));
        }
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| Error::format(path.display().to_string(), e.to_string()))?;
    atomic_write(path, &bytes)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename.
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".peftk-tmp-")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
