//! Safe output files: every file this crate writes goes through [`AtomicOutput`].
//!
//! The rules, in the order they are applied:
//!
//! - **Only regular files are replaced.** A destination that exists and is a directory, a device node, a
//!   FIFO or a socket is refused with an error naming what it is ([`check_output`]); nothing is written.
//! - **Symlinks are written through.** A destination that is a symbolic link (or a chain of them, dangling
//!   or not) is resolved first; the new contents replace the link's *target*, atomically, and the link
//!   itself stays in place. (`cp` and shell redirection behave the same way.)
//! - **Atomic replacement.** Data goes to a temp file `.peftk-tmp-<pid>-XXXXXX` in the target's directory,
//!   is fsynced, and is renamed over the target only when complete, so readers see the old file or the
//!   whole new one, and an error leaves the old file untouched. Other hard links to an old file keep the
//!   old contents (a rename creates a new inode).
//! - **Permissions.** A new file gets the mode an ordinary `File::create` would give it, `0o666 & !umask`
//!   (the temp file is created with that mode, so the kernel applies the umask). Replacing an existing
//!   file keeps its mode and, where the process may (as root), its owner and group.
//! - **Never an input.** [`check_output`] refuses a destination that is the same file as one of the
//!   inputs, compared by (device, inode) after following symlinks, so hard links, `./a` vs `a` and
//!   symlinks are all caught; callers pass `force = true` to override (safe with this writer: inputs are
//!   read through their own open descriptors or maps, and the rename does not touch the old inode).
//! - **No temp files left behind.** A temp file is removed when its [`AtomicOutput`] is dropped without
//!   [`AtomicOutput::commit`] (errors, panics that unwind), and by [`remove_pending_temps`], which a
//!   program's SIGINT/SIGTERM handler calls (the `peftk` binary does). `kill -9` cannot be caught, so
//!   every new temp file first sweeps its directory for stale ones of our own naming
//!   ([`sweep_stale_temps`]): a `.peftk-tmp-<pid>-*` file is removed when process `<pid>` is gone **and**
//!   no process holds the `flock` that every writer keeps on its temp file while writing (the second test
//!   covers processes in other PID namespaces on the same machine). A `.peftk-tmp-*` without a PID (older
//!   versions) is removed when unlocked and older than one hour.

use crate::error::{Error, Result};
use crate::io::TensorBytes;
use crate::tensor::Tensor;
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The prefix of every temp file this crate creates.
pub const TEMP_PREFIX: &str = ".peftk-tmp-";

/// Temp files being written by this process (for [`remove_pending_temps`]).
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temp file this process is writing. Meant for a SIGINT/SIGTERM handler that then ends
/// the process (it runs on an ordinary thread, e.g. `signal_hook::iterator::Signals`, not inside the
/// signal handler). Returns how many were removed. Holds the registry lock until it returns, and
/// [`AtomicOutput::commit`] renames under the same lock, so no output is committed after a cleanup began
/// if the caller exits right after.
pub fn remove_pending_temps() -> usize {
    let g = pending();
    g.iter().filter(|p| fs::remove_file(p).is_ok()).count()
}

/// Removes the temp files and then terminates the process as `signal` would, with the lock held so
/// that no output is renamed into place in between.
#[cfg(unix)]
pub fn remove_pending_temps_and_exit(signal: i32) -> ! {
    let g = pending();
    for p in g.iter() {
        let _ = fs::remove_file(p);
    }
    // 128 + signal is the shell's convention for "killed by signal".
    std::process::exit(128 + signal)
}

/// What a file type is, for error messages.
fn describe(ft: fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

fn invalid_path(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{}: {msg}", path.display()))
}

/// Follows symlinks from `path` to the file they finally name (which may not exist yet).
pub fn resolve_symlinks(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = fs::read_link(&p).map_err(|e| Error::io(&p, e))?;
                p = match p.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Err(invalid_path(path, "too many levels of symbolic links"))
}

/// Fails unless `path` is an existing regular file (after following symlinks): a clear error for a
/// missing file, a directory, a FIFO (which would block a reader forever) or a device.
pub fn check_input(path: &Path) -> Result<()> {
    let m = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if m.is_file() {
        Ok(())
    } else {
        Err(invalid_path(
            path,
            format!("is {}, not a regular file", describe(m.file_type())),
        ))
    }
}

/// True if `a` and `b` name the same file (same device and inode, symlinks followed). False if either
/// does not exist.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            (x.dev(), x.ino()) == (y.dev(), y.ino())
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => match (fs::canonicalize(a), fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// Checks that `out` may be written: after following symlinks it is either absent (in an existing
/// directory) or a regular file, and, unless `force`, it is not the same file as any of `inputs` (files,
/// or directories whose files are all inputs, as an adapter directory). See the module docs.
pub fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let target = resolve_symlinks(out)?;
    target_dir(&target)?;
    match fs::metadata(&target) {
        Ok(m) if !m.is_file() => {
            return Err(invalid_path(
                out,
                format!(
                    "is {}; refusing to replace it (give the path of a regular file)",
                    describe(m.file_type())
                ),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(out, e)),
    }
    if force {
        return Ok(());
    }
    for input in inputs {
        let mut files = vec![input.to_path_buf()];
        if input.is_dir()
            && let Ok(rd) = fs::read_dir(input)
        {
            files.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
        }
        if let Some(f) = files.iter().find(|f| same_file(f, &target)) {
            return Err(invalid_path(
                out,
                format!(
                    "is the same file as the input {}; refusing to overwrite an input (write elsewhere, or \
                     pass --force)",
                    f.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The directory a resolved target lives in, which must exist; and the target must have a file name.
fn target_dir(target: &Path) -> Result<PathBuf> {
    let name_ok = target.file_name().is_some_and(|n| n != "." && n != "..");
    if !name_ok || target.as_os_str().to_string_lossy().ends_with('/') {
        return Err(invalid_path(target, "is a directory; give the path of a file"));
    }
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match fs::metadata(&dir) {
        Ok(m) if m.is_dir() => Ok(dir),
        Ok(_) => Err(invalid_path(&dir, "is not a directory")),
        Err(e) => Err(Error::io(&dir, e)),
    }
}

#[cfg(target_os = "linux")]
fn try_lock(f: &File, nonblocking: bool) -> bool {
    use std::os::fd::AsRawFd;
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    // SAFETY: flock on a descriptor this `File` owns for the duration of the call; no memory is passed.
    unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn try_lock(_: &File, _: bool) -> bool {
    true
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(target_os = "linux"))]
fn process_alive(_: u32) -> bool {
    // Unknown: treat as alive, so only the one-hour rule applies.
    true
}

/// Removes stale temp files of our own naming from `dir` (see the module docs for the rule) and returns
/// how many. Best effort: errors are ignored. Never follows symlinks, never touches other names.
pub fn sweep_stale_temps(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    let me = std::process::id();
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if !meta.file_type().is_file() {
            continue;
        }
        let pid = rest.split_once('-').and_then(|(p, _)| p.parse::<u32>().ok());
        let stale = match pid {
            Some(p) if p == me => false,
            Some(p) => !process_alive(p),
            None => meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600),
        };
        if !stale {
            continue;
        }
        // A writer holds an exclusive flock on its temp file until it is done: if we can take it,
        // nobody is writing.
        let Ok(f) = File::open(e.path()) else {
            continue;
        };
        if try_lock(&f, true) && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A file being written atomically: a locked temp file next to the (symlink-resolved) target, renamed
/// over it by [`commit`](Self::commit); removed on drop otherwise. See the module docs.
pub struct AtomicOutput {
    /// The path the caller gave (for messages).
    path: PathBuf,
    /// Where the data ends up (symlinks resolved).
    target: PathBuf,
    tmp: Option<tempfile::NamedTempFile>,
    /// The existing target's (mode, uid, gid), kept on commit.
    keep: Option<(u32, u32, u32)>,
}

impl AtomicOutput {
    /// Creates the temp file for `path` after [`check_output`]'s destination checks (not the same-file
    /// check: that needs the inputs), sweeping stale temp files from its directory first.
    pub fn create(path: impl AsRef<Path>) -> Result<AtomicOutput> {
        let path = path.as_ref().to_path_buf();
        check_output(&path, &[], true)?;
        let target = resolve_symlinks(&path)?;
        let dir = target_dir(&target)?;
        sweep_stale_temps(&dir);
        let keep = fs::metadata(&target).ok().map(|m| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                (m.mode() & 0o7777, m.uid(), m.gid())
            }
            #[cfg(not(unix))]
            {
                let _ = m;
                (0o644, 0, 0)
            }
        });
        let mut b = tempfile::Builder::new();
        let prefix = format!("{TEMP_PREFIX}{}-", std::process::id());
        b.prefix(&prefix);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // New file: 0o666, which the kernel masks with the umask, as `File::create` does. Replacing
            // a file: private until its own mode is restored at commit.
            let mode = if keep.is_some() { 0o600 } else { 0o666 };
            b.permissions(fs::Permissions::from_mode(mode));
        }
        // Registered before it exists, so that a signal arriving right after creation finds it.
        let mut reg = pending();
        let tmp = b.tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
        reg.push(tmp.path().to_path_buf());
        drop(reg);
        try_lock(tmp.as_file(), false);
        Ok(AtomicOutput {
            path,
            target,
            tmp: Some(tmp),
            keep,
        })
    }

    /// The temp file, to write into.
    pub fn file(&mut self) -> &mut File {
        // `tmp` is only taken by `commit`, which consumes `self`.
        self.tmp
            .as_mut()
            .map(|t| t.as_file_mut())
            .expect("AtomicOutput used after commit")
    }

    /// The path of the temp file.
    pub fn temp_path(&self) -> Option<&Path> {
        self.tmp.as_ref().map(|t| t.path())
    }

    /// The final destination (symlinks resolved).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes, fsyncs, restores the replaced file's mode/owner, and renames the temp file over the target.
    pub fn commit(mut self) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        let tp = tmp.path().to_path_buf();
        #[cfg(unix)]
        if let Some((mode, uid, gid)) = self.keep {
            use std::os::unix::fs::PermissionsExt;
            // The owner first: chown clears the set-id bits, which the chmod then restores. Only root
            // (or the owner, for the group) may chown; otherwise the file is ours, as with `cp`.
            let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(uid), Some(gid));
            tmp.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&tp, e))?;
        }
        tmp.as_file().sync_all().map_err(|e| Error::io(&tp, e))?;
        let mut reg = pending();
        reg.retain(|p| p != &tp);
        if !tp.exists() {
            return Err(Error::io(
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "the temp file was removed before the write completed",
                ),
            ));
        }
        tmp.persist(&self.target)
            .map_err(|e| Error::io(&self.path, e.error))?;
        drop(reg);
        // Make the rename durable too (best effort: not every filesystem lets a directory be synced).
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let mut reg = pending();
            let p = tmp.path().to_path_buf();
            reg.retain(|q| q != &p);
            // NamedTempFile removes the file when dropped.
            drop(tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically (see [`AtomicOutput`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = AtomicOutput::create(path)?;
    out.file().write_all(bytes).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// The header entry of one tensor of a safetensors file written by [`write_safetensors_streaming`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of data this tensor takes.
    pub fn byte_len(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(self.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8))
            .ok_or_else(|| Error::shape("write", format!("{}: tensor too large", self.name)))
    }
}

/// The data of one tensor handed to [`write_safetensors_streaming`]: bytes, or a [`Tensor`] whose CPU
/// storage is written without a copy.
pub enum Payload<'a> {
    Bytes(Cow<'a, [u8]>),
    Tensor(Tensor),
}

impl<'a> From<Cow<'a, [u8]>> for Payload<'a> {
    fn from(b: Cow<'a, [u8]>) -> Self {
        Payload::Bytes(b)
    }
}

impl From<Tensor> for Payload<'_> {
    fn from(t: Tensor) -> Self {
        Payload::Tensor(t)
    }
}

/// Writes a safetensors file whose header is computed first and whose tensors are then produced and
/// written one at a time by `produce`, so that memory stays near the largest tensor. The layout (data
/// sorted by descending dtype, then name; header padded to 8 bytes) and the header bytes are the
/// `safetensors` crate's own. Written through [`AtomicOutput`]: nothing replaces `path` unless every
/// tensor was produced with its announced size. Returns the file size.
pub fn write_safetensors_streaming<'a, P: Into<Payload<'a>>>(
    path: &Path,
    mut specs: Vec<TensorSpec>,
    metadata: Option<HashMap<String, String>>,
    mut produce: impl FnMut(&TensorSpec) -> Result<P>,
) -> Result<u64> {
    specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut infos = Vec::with_capacity(specs.len());
    let mut offset = 0usize;
    for s in &specs {
        let n = s.byte_len()?;
        infos.push((
            s.name.clone(),
            safetensors::tensor::TensorInfo {
                dtype: s.dtype,
                shape: s.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset = offset
            .checked_add(n)
            .ok_or_else(|| Error::shape("write", "file too large"))?;
    }
    let ctx = || path.display().to_string();
    let meta = safetensors::tensor::Metadata::new(metadata, infos)
        .map_err(|e| Error::format(ctx(), e.to_string()))?;
    let mut head = serde_json::to_string(&meta).map_err(|e| Error::format(ctx(), e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(' ');
    }
    let mut out = AtomicOutput::create(path)?;
    {
        let io = |e| Error::io(path, e);
        let mut w = BufWriter::with_capacity(1 << 20, out.file());
        w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(head.as_bytes()).map_err(io)?;
        for s in &specs {
            let payload = produce(s)?.into();
            let view;
            let bytes: &[u8] = match &payload {
                Payload::Bytes(b) => b,
                Payload::Tensor(t) => {
                    view = TensorBytes::view(t)?;
                    &view.data
                }
            };
            let want = s.byte_len()?;
            if bytes.len() != want {
                return Err(Error::shape(
                    "write",
                    format!(
                        "tensor {:?}: shape {:?} of {:?} needs {want} bytes, got {}",
                        s.name,
                        s.shape,
                        s.dtype,
                        bytes.len()
                    ),
                ));
            }
            w.write_all(bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    out.commit()?;
    Ok((8 + head.len() + offset) as u64)
}
