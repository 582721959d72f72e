//! `dmaplane._dmaplane`: the Rust [`dmaplane::Agent`] for Python. The classes here are the
//! package's native API (`dmaplane/__init__.py` re-exports them with the exceptions and the
//! asyncio glue); nothing is reimplemented — every call goes to the Rust library.
//!
//! Waits release the GIL and wake every 50 ms to let Python handle signals, so Ctrl-C during
//! `Transfer.wait` raises `KeyboardInterrupt` promptly. Progress never needs Python: the agent's
//! own threads drive it.

mod agent;
mod bench;
mod blocks;
mod buffer;
mod cuda;
mod desc;
mod dlpack;
mod errors;
mod files;
mod nixl;
mod notify;
mod peer;
mod raw;
mod transfer;

use pyo3::prelude::*;

/// The simulated machine agents of this process can share (see `Testbed.builtin`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Testbed {
    pub(crate) inner: std::sync::Arc<dmaplane::Testbed>,
}

#[pymethods]
impl Testbed {
    /// The built-in testbed: one two-socket machine with nic0..nic2, gpu0..gpu2 and nvme0
    /// (gpu0 and nic0 share a switch, as do gpu2 and nic1). A new one each call.
    #[staticmethod]
    fn builtin() -> PyResult<Testbed> {
        Ok(Testbed {
            inner: dmaplane::Testbed::builtin().map_err(errors::to_py)?,
        })
    }

    /// The process's shared built-in testbed (what an agent without one uses).
    #[staticmethod]
    fn shared() -> PyResult<Testbed> {
        Ok(Testbed {
            inner: dmaplane::Testbed::shared().map_err(errors::to_py)?,
        })
    }

    /// The NICs of the testbed.
    fn nics(&self) -> Vec<String> {
        self.inner.nic_names()
    }

    /// The GPUs of the testbed.
    fn gpus(&self) -> Vec<String> {
        self.inner.gpu_names()
    }

    /// The fabric's DMA oracle, an observer apart from the agents: every DMA after a fence or
    /// an importer's ack, memory reused before every ack. `clean` is true when there was none;
    /// `acks` and `fences` say how many revokes it watched.
    fn verdict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.inner.fabric().oracle().verdict();
        let text = serde_json::to_string(&v).unwrap_or_else(|_| "{}".into());
        let d = py.import("json")?.call_method1("loads", (text,))?;
        d.set_item("clean", v.is_clean())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "Testbed(nics={:?}, gpus={:?})",
            self.inner.nic_names(),
            self.inner.gpu_names()
        )
    }
}

#[pymodule]
fn _dmaplane(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Testbed>()?;
    m.add_class::<agent::Agent>()?;
    m.add_class::<agent::Region>()?;
    m.add_class::<desc::Desc>()?;
    m.add_class::<desc::RemoteDesc>()?;
    m.add_class::<peer::Peer>()?;
    m.add_class::<peer::RemoteRegion>()?;
    m.add_class::<transfer::Transfer>()?;
    m.add_class::<notify::Notification>()?;
    m.add_class::<blocks::LocalBlocks>()?;
    m.add_class::<blocks::RemoteBlocks>()?;
    m.add_class::<blocks::Prepared>()?;
    m.add_class::<files::FileSpec>()?;
    m.add_class::<files::FileRegion>()?;
    m.add_class::<files::FileTransfer>()?;
    m.add_class::<nixl::NixlRequest>()?;
    m.add_function(wrap_pyfunction!(dlpack::address_of, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_transfer_loop, m)?)?;
    m.add_function(wrap_pyfunction!(bench::rust_prepared_loop, m)?)?;
    Ok(())
}

/// Run `f` (a bounded wait of the library) with the GIL released, in slices of at most 50 ms
/// until `deadline`, handling Python's signals between slices; `f` returns `None` while it
/// should go on.
pub(crate) fn wait_releasing<T: Send>(
    py: Python<'_>,
    deadline: Option<std::time::Instant>,
    mut f: impl FnMut(std::time::Duration) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    const SLICE: std::time::Duration = std::time::Duration::from_millis(50);
    loop {
        // At least one look, even with no time left (`wait(0)` asks how it ended).
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let slice = left.map_or(SLICE, |l| l.min(SLICE));
        if let Some(v) = py.detach(|| f(slice)) {
            return Ok(Some(v));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}

/// Wait on `f` — a wait of the library, a slice at a time, `Err(WaitTimeout)` while it goes
/// on — for `timeout` seconds at most (`None`: as long as it takes) with the GIL released;
/// `timed_out(waited)` is the error when the timeout passes first.
pub(crate) fn wait_for<T: Send>(
    py: Python<'_>,
    timeout: Option<f64>,
    mut f: impl FnMut(std::time::Duration) -> dmaplane::Result<T> + Send,
    timed_out: impl FnOnce(std::time::Duration) -> dmaplane::Error,
) -> PyResult<T> {
    let got = wait_releasing(py, deadline(timeout)?, |slice| match f(slice) {
        Err(dmaplane::Error::WaitTimeout { .. }) => None,
        other => Some(other),
    })?;
    match got {
        Some(r) => r.map_err(errors::to_py),
        None => Err(errors::to_py(timed_out(
            std::time::Duration::from_secs_f64(timeout.unwrap_or(0.0)),
        ))),
    }
}

/// A timeout in seconds as a deadline (`None`: no deadline); a negative or NaN one is refused.
pub(crate) fn deadline(timeout: Option<f64>) -> PyResult<Option<std::time::Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(
            std::time::Instant::now() + std::time::Duration::from_secs_f64(t),
        )),
        Some(t) if t.is_infinite() && t > 0.0 => Ok(None),
        Some(t) => Err(errors::invalid(
            "timeout",
            t,
            "seconds, at least 0 (None waits as long as it takes)",
        )),
    }
}
