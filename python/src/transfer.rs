//! A transfer under way, as Python sees it: wait with the GIL released, look, or await.

use pyo3::prelude::*;

use crate::errors::to_py;

/// A transfer under way (`Agent.write`, `Agent.read`). `await transfer` in asyncio.
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Transfer {
    pub(crate) inner: dmaplane::Transfer,
}

#[pymethods]
impl Transfer {
    /// Its id (what the peer's notification carries as `transfer`).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }
    /// Bytes it moves.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }
    /// Requests it was split into.
    #[getter]
    fn requests(&self) -> usize {
        self.inner.requests()
    }

    /// Block until it ends (`timeout` seconds at most; `None`: as long as it takes, bounded by
    /// the agent's stall timeout) with the GIL released. Returns `None` once done; raises the
    /// error it ended with (`RevokedError`, `PeerLostError`, `StalledError`, ...), or
    /// `TimeoutError` when `timeout` passed first (the transfer goes on).
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = self.inner.clone();
        // The first slice drives the engine from this thread as a poller would (a short
        // transfer ends without a thread hand-off, as `Transfer::wait` does in Rust); later
        // slices sleep and leave it to the progress thread.
        let mut first = true;
        crate::wait_for(
            py,
            timeout,
            |slice| {
                if std::mem::take(&mut first) {
                    t.wait(slice)
                } else {
                    t.wait_sleeping(slice)
                }
            },
            |waited| dmaplane::Error::WaitTimeout {
                transfer: self.inner.id(),
                peer: self.inner.peer().to_string(),
                waited,
            },
        )
    }

    /// Whether it ended (done or failed), without blocking. Each look also drives the
    /// agent's engine once, so a loop polling a short transfer ends it without a thread
    /// hand-off (as polling drives UCX).
    fn done(&self) -> bool {
        !matches!(self.inner.poll(), dmaplane::Status::InProgress { .. })
    }

    /// `"in-progress"`, `"done"` or `"failed"` (then `error()` is the exception); a look drives
    /// the engine once, as `done()` does.
    #[getter]
    fn status(&self) -> &'static str {
        match self.inner.poll() {
            dmaplane::Status::InProgress { .. } => "in-progress",
            dmaplane::Status::Done => "done",
            dmaplane::Status::Failed(_) => "failed",
        }
    }

    /// The exception it ended with, or `None` (in progress or done).
    fn error(&self) -> Option<PyErr> {
        match self.inner.status() {
            dmaplane::Status::Failed(e) => Some(to_py(e)),
            _ => None,
        }
    }

    /// Call `callback()` (from another thread, with the GIL) once it ended: what `await` is
    /// built on.
    fn _on_done(&self, callback: Py<PyAny>) -> PyResult<()> {
        let t = self.inner.clone();
        std::thread::Builder::new()
            .name(format!("dmaplane-py-await {}", t.id()))
            .spawn(move || {
                while let Err(dmaplane::Error::WaitTimeout { .. }) =
                    t.wait_sleeping(std::time::Duration::from_secs(3600))
                {}
                Python::attach(|py| {
                    if let Err(e) = callback.call0(py) {
                        e.print(py);
                    }
                });
            })
            .map(|_| ())
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("no thread: {e}")))
    }

    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let aio = slf.py().import("dmaplane._aio")?;
        aio.call_method1("wait_transfer", (slf,))?
            .call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        format!(
            "Transfer(id={}, bytes={}, status={:?})",
            self.inner.id(),
            self.inner.bytes(),
            self.status()
        )
    }
}
