//! Files: byte ranges of files registered like memory (`Agent.register_file`), read into and
//! written from registered memory through the agent's drive (`read_file`, `write_file`), and
//! checkpoint shards loaded into a peer's memory (`Agent.load`).

use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::desc::{Desc, range};
use crate::errors::{invalid, to_py};

/// What to register: a file, a range of it, and how to open it.
///
/// `FileSpec(path)` is the whole file, read-only; `offset`/`length` a range of it;
/// `writable=True` opens it read-write; `create=n` creates it (or grows it) to `n` bytes;
/// `buffered_fallback=True` goes through the page cache where the file system refuses
/// `O_DIRECT` (else that is an error saying so).
#[pyclass(module = "dmaplane._dmaplane", frozen, skip_from_py_object)]
#[derive(Clone)]
pub(crate) struct FileSpec {
    pub(crate) inner: dmaplane::FileSpec,
}

#[pymethods]
impl FileSpec {
    #[new]
    #[pyo3(signature = (path, offset = 0, length = None, *, writable = false, create = None, buffered_fallback = false))]
    fn new(
        path: std::path::PathBuf,
        offset: u64,
        length: Option<u64>,
        writable: bool,
        create: Option<u64>,
        buffered_fallback: bool,
    ) -> PyResult<FileSpec> {
        let mut s = dmaplane::FileSpec::new(path);
        match length {
            Some(0) => return Err(invalid("length", 0, "at least 1 byte (None: to the end)")),
            Some(n) => s = s.range(offset, n),
            None if offset != 0 => {
                return Err(invalid(
                    "offset",
                    offset,
                    "give `length` with an offset (the range is offset..offset + length)",
                ));
            }
            None => {}
        }
        if writable {
            s = s.writable();
        }
        if let Some(n) = create {
            s = s.create(n);
        }
        if buffered_fallback {
            s = s.buffered_fallback();
        }
        Ok(FileSpec { inner: s })
    }
    /// The path given.
    #[getter]
    fn path(&self) -> std::path::PathBuf {
        self.inner.path().to_path_buf()
    }
    /// Whether it opens the file read-write.
    #[getter]
    fn writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn __repr__(&self) -> String {
        format!("FileSpec({:?})", self.inner)
    }
}

/// A registered range of a file: slice it for descriptors (`f[offset:offset + n]`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct FileRegion {
    pub(crate) inner: dmaplane::FileRegion,
    pub(crate) agent: dmaplane::Agent,
}

#[pymethods]
impl FileRegion {
    /// The registration id.
    #[getter]
    fn id(&self) -> u32 {
        self.inner.id()
    }
    /// The file (its canonical path).
    #[getter]
    fn path(&self) -> std::path::PathBuf {
        self.inner.path().to_path_buf()
    }
    /// Where in the file the region starts.
    #[getter]
    fn file_offset(&self) -> u64 {
        self.inner.file_offset()
    }
    /// Whether I/O on it bypasses the page cache (`O_DIRECT`).
    #[getter]
    fn direct(&self) -> bool {
        self.inner.is_direct()
    }
    /// Whether it is open read-write.
    #[getter]
    fn writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn __len__(&self) -> usize {
        usize::try_from(self.inner.len()).unwrap_or(usize::MAX)
    }
    fn __getitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<Desc> {
        let (offset, len) = range(key, self.inner.len())?;
        Ok(Desc {
            inner: self.inner.desc(offset, len).map_err(to_py)?,
        })
    }
    /// The whole region as one descriptor.
    fn all(&self) -> Desc {
        Desc {
            inner: self.inner.all(),
        }
    }
    /// Deregister it: transfers naming it are refused from now on; those under way finish.
    fn deregister(&self) {
        self.agent.deregister_file(&self.inner);
    }
    fn __repr__(&self) -> String {
        format!(
            "FileRegion(path={:?}, offset={}, len={}, direct={})",
            self.inner.path(),
            self.inner.file_offset(),
            self.inner.len(),
            self.inner.is_direct()
        )
    }
}

/// File I/O under way (`Agent.read_file`, `Agent.write_file`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct FileTransfer {
    pub(crate) inner: std::sync::Arc<dmaplane::FileTransfer>,
}

#[pymethods]
impl FileTransfer {
    /// Bytes it moves.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.len()
    }
    /// Whether it ended (done or failed), without blocking.
    fn done(&self) -> bool {
        self.inner.is_done()
    }
    /// How the drive reaches each memory: dicts with `path` (`"direct"` or `"bounced"`),
    /// `drive`, and `route` or `through` and `why`.
    fn paths<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let json = py.import("json")?;
        let list = PyList::empty(py);
        for p in self.inner.paths() {
            let text = serde_json::to_string(p).unwrap_or_else(|_| "{}".into());
            list.append(json.call_method1("loads", (text,))?)?;
        }
        Ok(list)
    }
    /// Block until it ends (`timeout` seconds at most) with the GIL released: the bytes
    /// moved, or the error it ended with; `TimeoutError` when `timeout` passed first.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<u64> {
        let t = self.inner.clone();
        crate::wait_for(
            py,
            timeout,
            |slice| t.wait(slice),
            |waited| dmaplane::Error::WaitTimeout {
                transfer: 0,
                peer: "the agent's drive".into(),
                waited,
            },
        )
    }
    fn __repr__(&self) -> String {
        format!(
            "FileTransfer(bytes={}, done={})",
            self.inner.len(),
            self.inner.is_done()
        )
    }
}

/// `Agent.load`: shards `(file_desc, remote_desc)` into the peer's memory through `slots`,
/// calling `progress(shard, step)` as each moves on.
pub(crate) fn load<'py>(
    py: Python<'py>,
    agent: &dmaplane::Agent,
    peer: &dmaplane::Peer,
    shards: Vec<dmaplane::load::Shard>,
    slots: Vec<dmaplane::Desc>,
    timeout: Duration,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut failed: Option<PyErr> = None;
    let report = py
        .detach(|| {
            dmaplane::load::load(agent, peer, &shards, &slots, timeout, |n, step| {
                let Some(cb) = &progress else { return };
                if failed.is_some() {
                    return;
                }
                let name = match step {
                    dmaplane::load::Step::ReadStarted => "read-started",
                    dmaplane::load::Step::ReadDone => "read-done",
                    dmaplane::load::Step::SendStarted => "send-started",
                    dmaplane::load::Step::SendDone => "send-done",
                };
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (n, name)) {
                        failed = Some(e);
                    }
                });
            })
        })
        .map_err(to_py)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let text = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
    let d = py.import("json")?.call_method1("loads", (text,))?;
    d.set_item("seconds", report.elapsed.as_secs_f64())?;
    d.set_item("gbps", report.gbps())?;
    Ok(d)
}
