//! File I/O shared by every format: memory-mapped safetensors reading, atomic streaming safetensors
//! and JSON writing through [`output::AtomicOutput`] (temp file in the target directory, fsync, then
//! rename, so a crash never leaves a half-written file; non-regular destinations refused, symlinks
//! written through, modes kept; see [`output`]), and dtype mapping.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod output;
pub mod peft;

pub use output::{TensorSpec, write_safetensors_streaming};

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
        // A directory, FIFO or device is refused before it is opened (a FIFO would block forever).
        output::check_input(&path)?;
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped could
        // fault; that is the documented contract of every mmap-based safetensors loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (names, metadata, header, data_start) = {
            // Full validation (offsets within the file, no overlaps) happens here, once.
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                let msg = match sniff_format(&mmap) {
                    Some(what) => format!("not a safetensors file: {what}"),
                    None => format!("not a valid safetensors file: {e}"),
                };
                Error::format(path.display().to_string(), msg)
            })?;
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

    /// The [`TensorSpec`] (name, dtype, shape) of every tensor `keep` accepts, in name order: what a
    /// streaming writer copies through unchanged.
    pub fn specs_where(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<TensorSpec>> {
        let mut specs = Vec::new();
        for name in self.names.iter().filter(|n| keep(n)) {
            let (dtype, shape, _) = self.raw(name)?;
            specs.push(TensorSpec {
                name: name.clone(),
                dtype,
                shape,
            });
        }
        Ok(specs)
    }

    /// Drops the pages of tensor `name` from this process's resident set, after its bytes were used
    /// (streaming writers call it so that the input map does not accumulate in memory). The pages stay
    /// in the page cache and are mapped again, with the same bytes, if the tensor is read later. A no-op
    /// for an unknown name and off Unix.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(info) = self.header.info(name) {
            const PAGE: usize = 4096;
            let (begin, end) = info.data_offsets;
            // Whole pages inside the tensor only (neighbours keep theirs).
            let start = (self.data_start + begin).next_multiple_of(PAGE);
            let stop = (self.data_start + end).min(self.mmap.len()) / PAGE * PAGE;
            if stop > start {
                // SAFETY: the map is a read-only MAP_SHARED mapping of a file (memmap2's `Mmap::map`):
                // MADV_DONTNEED only drops page-table entries, and the next access maps the same file
                // bytes again from the page cache, so no outstanding borrow of the map ever observes
                // different data. The range is page-aligned and inside the map.
                let _ = unsafe {
                    self.mmap
                        .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, stop - start)
                };
            }
        }
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

    /// The bytes of a [`Tensor`], borrowed when it lives on the CPU (no copy), downloaded otherwise.
    pub fn view(t: &Tensor) -> Result<TensorBytes<'_>> {
        match t.storage() {
            crate::tensor::Storage::Cpu(s) => Ok(TensorBytes::borrowed(
                to_st_dtype(t.dtype()),
                t.shape().to_vec(),
                s.as_bytes(),
            )),
            #[cfg(feature = "cuda")]
            _ => TensorBytes::from_tensor(t),
        }
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

/// What a file that is not safetensors looks like, from its first bytes, if recognisable.
pub fn sniff_format(bytes: &[u8]) -> Option<&'static str> {
    let head = &bytes[..bytes.len().min(16)];
    let trimmed: Vec<u8> = head.iter().copied().skip_while(u8::is_ascii_whitespace).collect();
    Some(if bytes.is_empty() {
        "the file is empty"
    } else if bytes.len() < 8 {
        "the file is shorter than a safetensors header"
    } else if head.starts_with(b"GGUF") {
        "looks like GGUF (llama.cpp); convert it to safetensors first"
    } else if head.starts_with(b"PK\x03\x04") {
        "looks like a zip archive (a PyTorch `torch.save` .bin/.pt checkpoint?); pickles are not supported, \
         convert it with safetensors.torch.save_file"
    } else if head.first() == Some(&0x80) && head.get(1).is_some_and(|p| (2..=5).contains(p)) {
        "looks like a Python pickle (a PyTorch .bin/.pt checkpoint?); pickles are not supported, convert it \
         with safetensors.torch.save_file"
    } else if trimmed.first() == Some(&b'{') {
        "looks like JSON (a config file?)"
    } else if head
        .iter()
        .all(|c| c.is_ascii_graphic() || c.is_ascii_whitespace())
    {
        "looks like a text file"
    } else if head.starts_with(b"\x89HDF") {
        "looks like HDF5 (a Keras .h5 checkpoint?)"
    } else if head.starts_with(b"\x93NUMPY") {
        "looks like a NumPy .npy array"
    } else {
        let n = u64::from_le_bytes(bytes[..8].try_into().ok()?);
        if n > (bytes.len() as u64).saturating_sub(8) {
            "the first 8 bytes, read as the header length, exceed the file size (not a safetensors file, \
             or truncated)"
        } else {
            return None;
        }
    })
}

/// Checks that a tensor's byte length matches its shape and dtype.
fn check_len(name: &str, t: &TensorBytes<'_>) -> Result<()> {
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
    Ok(())
}

/// Writes a safetensors file atomically (see [`output`]): the header first, then each tensor, with
/// the same layout as `safetensors::serialize` and no copy of the whole file in memory.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, TensorBytes<'_>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut by_name = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        check_len(name, t)?;
        if by_name.insert(name.as_str(), t).is_some() {
            return Err(Error::invalid(format!(
                "{}: tensor name {name:?} would be written twice",
                path.display()
            )));
        }
    }
    let specs = tensors
        .iter()
        .map(|(name, t)| TensorSpec {
            name: name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    write_safetensors_streaming(path, specs, metadata, |s| {
        Ok(Cow::Borrowed(&by_name[s.name.as_str()].data[..]))
    })?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`output`]).
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    output::write_atomic(path.as_ref(), bytes)
}
