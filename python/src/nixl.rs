//! NIXL's transfer request (`nixl_xfer_handle`) in Rust. A serving engine makes one per
//! request, posts it and polls it until `"DONE"` (`make_prepped_xfer`, `transfer`,
//! `check_xfer_state`): with the request native, that loop costs the facade one Python call
//! per step and no Python objects of its own.
//!
//! The facade (`dmaplane/nixl/_api.py`) keeps NIXL's checks of the lists and the exceptions:
//! a dmaplane error raised here becomes the NIXL one there, with this one chained.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::agent::Agent;
use crate::blocks::{LocalBlocks, RemoteBlocks};
use crate::errors::{invalid, to_py};
use crate::peer::Peer;

/// The tag dmaplane notifications carry for NIXL messages (what `get_new_notifs` collects).
const TAG: &str = "nixl";

/// NIXL's transfer request on a dmaplane prepared transfer (`make_prepped_xfer`): posted by
/// `transfer` as often as wanted, one post at a time.
#[pyclass(module = "dmaplane._dmaplane", name = "NixlRequest", frozen)]
pub(crate) struct NixlRequest {
    /// `None` once released: its registrations are let go with it.
    prepared: Mutex<Option<Arc<dmaplane::Prepared>>>,
    /// The request's notification message (`notif_msg` of `make_prepped_xfer`).
    notif: Vec<u8>,
    /// Descriptors per side, for telemetry.
    descs: usize,
    /// Whether posts are timed (`capture_telemetry`).
    telemetry: bool,
    last: Mutex<Last>,
}

/// The last post, and what was observed of it.
#[derive(Default)]
struct Last {
    transfer: Option<dmaplane::Transfer>,
    /// A look saw it end (a new post may start).
    ended: bool,
    /// Telemetry: when it was posted, how long the post took, when a look first saw it done.
    started: Option<(Instant, SystemTime)>,
    post_us: u64,
    done_us: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A NIXL notification message: bytes, str (UTF-8), a bytearray, or `None` (none).
fn message(obj: Option<&Bound<'_, PyAny>>, field: &str) -> PyResult<Vec<u8>> {
    let Some(obj) = obj else {
        return Ok(Vec::new());
    };
    if obj.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(s.to_cow()?.as_bytes().to_vec());
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    Err(invalid(
        field,
        obj.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
        "bytes, str or None",
    ))
}

#[pymethods]
impl NixlRequest {
    /// The tag of the notifications NIXL messages travel as.
    #[classattr]
    #[pyo3(name = "TAG")]
    fn tag() -> &'static str {
        TAG
    }

    /// Prepare `operation` (`"READ"` or `"WRITE"`) of blocks `local_idx` of `local` and
    /// `remote_idx` of the peer's `remote`: checked, routed and split once.
    #[new]
    #[pyo3(signature = (agent, operation, peer, local, local_idx, remote, remote_idx, notif_msg = None, telemetry = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        agent: PyRef<'_, Agent>,
        operation: &str,
        peer: PyRef<'_, Peer>,
        local: PyRef<'_, LocalBlocks>,
        local_idx: &Bound<'_, PyAny>,
        remote: PyRef<'_, RemoteBlocks>,
        remote_idx: &Bound<'_, PyAny>,
        notif_msg: Option<&Bound<'_, PyAny>>,
        telemetry: bool,
    ) -> PyResult<NixlRequest> {
        let write = match operation {
            "READ" => false,
            "WRITE" => true,
            other => return Err(invalid("operation", other, "\"READ\" or \"WRITE\"")),
        };
        let notif = message(notif_msg, "notif_msg")?;
        let descs = local_idx.len().unwrap_or(0);
        let prepared =
            agent.by_index(py, &peer, (&local, local_idx), (&remote, remote_idx), write)?;
        Ok(NixlRequest {
            prepared: Mutex::new(Some(Arc::new(prepared.inner))),
            notif,
            descs,
            telemetry,
            last: Mutex::new(Last::default()),
        })
    }

    /// Post it (`transfer`): `"DONE"` when it already completed, else `"PROC"`; `None` while
    /// the last post is still under way (NIXL's repost-active). `notif_msg` (or the request's
    /// own) reaches the peer after the data, tagged `"nixl"`.
    #[pyo3(signature = (notif_msg = None))]
    fn _post<'py>(
        &self,
        py: Python<'py>,
        notif_msg: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<Bound<'py, PyString>>> {
        let prepared = lock(&self.prepared)
            .clone()
            .ok_or_else(|| invalid("handle", "released", "make a new request"))?;
        {
            let last = lock(&self.last);
            if let Some(t) = &last.transfer
                && !last.ended
                && matches!(t.poll(), dmaplane::Status::InProgress { .. })
            {
                return Ok(None);
            }
        }
        let msg = message(notif_msg, "notif_msg")?;
        let msg = if msg.is_empty() { &self.notif } else { &msg };
        let notify = (!msg.is_empty()).then(|| dmaplane::Notify::new(TAG, msg.clone()));
        let start = self.telemetry.then(|| (Instant::now(), SystemTime::now()));
        let t = py.detach(|| prepared.post(notify)).map_err(to_py)?;
        let done = matches!(t.status(), dmaplane::Status::Done);
        let mut last = lock(&self.last);
        if let Some((at, _)) = start {
            last.post_us = micros(at.elapsed());
            last.done_us = None;
        }
        last.started = start;
        last.transfer = Some(t);
        last.ended = false;
        Ok(Some(state(py, done)))
    }

    /// Its state (`check_xfer_state`): `"PROC"` while it moves, `"DONE"` once every byte
    /// landed, `None` when it was never posted; the error it ended with is raised. A look
    /// drives the agent's engine once, as polling drives UCX.
    fn _state<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyString>>> {
        let mut last = lock(&self.last);
        let Some(t) = &last.transfer else {
            return Ok(None);
        };
        match t.poll() {
            dmaplane::Status::InProgress { .. } => Ok(Some(state(py, false))),
            dmaplane::Status::Done => {
                last.ended = true;
                if last.done_us.is_none()
                    && let Some((at, _)) = last.started
                {
                    last.done_us = Some(micros(at.elapsed()));
                }
                Ok(Some(state(py, true)))
            }
            dmaplane::Status::Failed(e) => {
                last.ended = true;
                Err(to_py(e))
            }
        }
    }

    /// Telemetry of the last post, `None` when never posted: (start, µs since the epoch;
    /// post µs; µs to the completion a look saw, 0 until then; bytes; descriptors).
    fn _telemetry(&self) -> Option<(u64, u64, u64, u64, usize)> {
        let last = lock(&self.last);
        last.transfer.as_ref()?;
        let wall = last
            .started
            .and_then(|(_, w)| w.duration_since(UNIX_EPOCH).ok())
            .map_or(0, micros);
        let bytes = lock(&self.prepared).as_ref().map_or(0, |p| p.bytes());
        Some((
            wall,
            last.post_us,
            last.done_us.unwrap_or(0),
            bytes,
            self.descs,
        ))
    }

    /// Let it go (`release_xfer_handle`): its registrations are no longer held by it. A post
    /// under way runs to its end (dmaplane owes every request its completion).
    fn release(&self) {
        lock(&self.prepared).take();
    }

    /// Whether it was released.
    #[getter]
    fn released(&self) -> bool {
        lock(&self.prepared).is_none()
    }

    fn __repr__(&self) -> String {
        let bytes = lock(&self.prepared).as_ref().map_or(0, |p| p.bytes());
        format!("nixl_xfer_handle({} descs, {bytes} bytes)", self.descs)
    }
}

/// `"DONE"` or `"PROC"`, interned (a poll loop makes no string).
fn state(py: Python<'_>, done: bool) -> Bound<'_, PyString> {
    if done {
        pyo3::intern!(py, "DONE").clone()
    } else {
        pyo3::intern!(py, "PROC").clone()
    }
}
