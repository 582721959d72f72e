//! The agent and its registrations, as Python sees them.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::blocks::{LocalBlocks, Prepared, RemoteBlocks, indices};
use crate::desc::{Desc, LOCAL, REMOTE, RemoteDesc, descs, local_descs, range};
use crate::errors::{invalid, registration, to_py};
use crate::files::{FileRegion, FileSpec, FileTransfer};
use crate::notify::{Notification, notify_arg};
use crate::peer::Peer;
use crate::transfer::Transfer;

/// One agent: its NICs, its registrations, its peers. A context manager: leaving the `with`
/// block (or `close()`) stops it.
///
/// - `name`: what peers know it by.
/// - `backend`: `"sim"` (the built-in simulated testbed, or `testbed`), `"tcp"` (software RC
///   NICs over TCP, any host) or `"verbs"` (RDMA NICs, when the package was built with verbs).
/// - `nics`: the NICs it uses (testbed NICs such as `["nic0"]`; on TCP, names for its sockets).
/// - `listen`: `host:port` its handshake listener binds (loopback, any port, by default).
/// - `secret`: bytes every agent that may connect shares (each side proves it holds them);
///   without one the agent listens on loopback only.
/// - `chunk`: bytes per request a transfer is split into; `stall_timeout`: seconds without a
///   completion before a transfer fails with `StalledError`.
///
/// Waits release the GIL; the agent's threads make progress without Python.
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Agent {
    inner: Mutex<Option<dmaplane::Agent>>,
    name: String,
}

impl Agent {
    pub(crate) fn agent(&self) -> PyResult<dmaplane::Agent> {
        self.inner
            .lock()
            .map_err(|_| invalid("agent", &self.name, "poisoned"))?
            .clone()
            .ok_or_else(|| invalid("agent", &self.name, "closed: make a new Agent"))
    }
}

#[pymethods]
impl Agent {
    #[new]
    #[pyo3(signature = (name, backend = "sim", nics = None, testbed = None, listen = None, secret = None, chunk = None, stall_timeout = None, _fault = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: &str,
        backend: &str,
        nics: Option<Vec<String>>,
        testbed: Option<PyRef<'_, crate::Testbed>>,
        listen: Option<String>,
        secret: Option<Vec<u8>>,
        chunk: Option<u64>,
        stall_timeout: Option<f64>,
        _fault: Option<&str>,
    ) -> PyResult<Agent> {
        let mut b = dmaplane::Agent::builder(name);
        b = match backend {
            "sim" => {
                let tb = match testbed {
                    Some(t) => t.inner.clone(),
                    None => dmaplane::Testbed::shared().map_err(to_py)?,
                };
                b.testbed(tb)
            }
            "tcp" => b.tcp(),
            #[cfg(feature = "verbs")]
            "verbs" => b.verbs(),
            #[cfg(not(feature = "verbs"))]
            "verbs" => {
                return Err(invalid(
                    "backend",
                    "verbs",
                    "this build has no RDMA: MATURIN_PEP517_ARGS=\"--features verbs\" pip install \
                     ./python (needs cmake and libclang-dev), or use \"tcp\"",
                ));
            }
            other => {
                return Err(invalid(
                    "backend",
                    other,
                    "\"sim\" (the simulated testbed), \"tcp\" (any host) or \"verbs\" (RDMA \
                     devices)",
                ));
            }
        };
        if let Some(n) = nics {
            b = b.nics(n);
        }
        if let Some(l) = listen {
            b = b.listen(l);
        }
        if let Some(s) = secret {
            b = b.secret(dmaplane::auth::Secret::new(s).map_err(to_py)?);
        }
        if let Some(c) = chunk {
            b = b.chunk(c);
        }
        // Hidden: break the revoke protocol on purpose, for tests that show their checks fail.
        if let Some(f) = _fault {
            let fault = f
                .parse::<dmaplane::Fault>()
                .map_err(|why| invalid("_fault", f, &why))?;
            b = b.inject(Some(fault));
        }
        if let Some(t) = stall_timeout {
            if !(t.is_finite() && t > 0.0) {
                return Err(invalid("stall_timeout", t, "seconds, more than 0"));
            }
            b = b.stall_timeout(std::time::Duration::from_secs_f64(t));
        }
        let agent = py.detach(|| b.build()).map_err(to_py)?;
        Ok(Agent {
            name: name.to_string(),
            inner: Mutex::new(Some(agent)),
        })
    }

    /// The agent's name (what peers know it by).
    #[getter]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Where its handshake listener accepts peers (`host:port`).
    #[getter]
    fn listen_addr(&self) -> PyResult<String> {
        Ok(self.agent()?.listen_addr().to_string())
    }

    /// Register `obj`'s memory, zero-copy: anything that exports a contiguous buffer (a NumPy
    /// array, a `bytearray`, a `memoryview`), a DLPack tensor on the CPU (`__dlpack__`: a
    /// torch CPU tensor, a JAX or CuPy host array), or CUDA memory (`__cuda_array_interface__`:
    /// a torch CUDA tensor, a CuPy array; DLPack on a CUDA device). The registration holds
    /// `obj` (its buffer export, its DLPack capsule, or the object) so the memory cannot be
    /// freed or resized until `Region.deregister()`. A read-only buffer is registered
    /// read-only: a WRITE's source, never a READ's target, and peers may not write it
    /// (read-only CUDA memory is refused). A non-contiguous one is refused saying what to
    /// call. CUDA streams are not synchronised: finish the kernels writing a tensor first.
    #[pyo3(signature = (obj, name = None))]
    fn register(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        name: Option<String>,
    ) -> PyResult<Region> {
        let lending = crate::dlpack::lend(obj)?;
        let name = name.unwrap_or_else(|| {
            format!(
                "py:{}@{:#x}",
                obj.get_type()
                    .name()
                    .map_or_else(|_| "object".into(), |n| n.to_string()),
                lending.address()
            )
        });
        match lending {
            crate::dlpack::Lending::Host(h) => self.lend(py, name, h),
            crate::dlpack::Lending::Cuda(c) => self.lend_cuda(py, name, c),
        }
    }

    /// Register `length` bytes at `addr` of this process — memory the caller owns and keeps
    /// alive and in place until the registration is deregistered (NIXL's contract for raw
    /// addresses: nothing holds it). `owner_keeps_alive=True` says so; without it the call is
    /// refused. The range must be mapped in this process; it is registered read-only where a
    /// mapping is not writable. With `cuda=True` the range is CUDA device memory (NIXL's
    /// `"VRAM"`), checked with the driver. Prefer `register(obj)`, which holds the object.
    #[pyo3(signature = (addr, length, name = None, *, owner_keeps_alive = false, cuda = false))]
    fn register_address(
        &self,
        py: Python<'_>,
        addr: u64,
        length: u64,
        name: Option<String>,
        owner_keeps_alive: bool,
        cuda: bool,
    ) -> PyResult<Region> {
        if !owner_keeps_alive {
            return Err(invalid(
                "owner_keeps_alive",
                "False",
                "a raw address is registered only on the caller's word that the memory stays \
                 alive until deregistered: pass owner_keeps_alive=True, or register the object",
            ));
        }
        let name = name.unwrap_or_else(|| format!("addr:{addr:#x}+{length:#x}"));
        if cuda {
            let lent = crate::cuda::Lent {
                addr,
                len: length,
                keeper: crate::cuda::Keeper::new(None, None),
            };
            return self.lend_cuda(py, name, lent);
        }
        let raw = crate::raw::RawRange::new(addr, length)?;
        self.lend(py, name, crate::dlpack::Held::new(Box::new(raw)))
    }

    /// This agent's metadata blob, for a peer's `connect`.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let blob = self.agent()?.metadata_blob().map_err(to_py)?;
        Ok(PyBytes::new(py, &blob))
    }

    /// Connect to the agent a metadata blob describes.
    fn connect(&self, py: Python<'_>, blob: &[u8]) -> PyResult<Peer> {
        let agent = self.agent()?;
        let blob = blob.to_vec();
        let p = py.detach(|| agent.connect(&blob)).map_err(to_py)?;
        Ok(Peer { inner: p })
    }

    /// Connect to the agent listening at `addr` (`host:port`).
    fn connect_to(&self, py: Python<'_>, addr: &str) -> PyResult<Peer> {
        let agent = self.agent()?;
        let p = py.detach(|| agent.connect_to(addr)).map_err(to_py)?;
        Ok(Peer { inner: p })
    }

    /// The connected peer called `name`, or `None`.
    fn peer(&self, name: &str) -> PyResult<Option<Peer>> {
        Ok(self.agent()?.peer(name).map(|inner| Peer { inner }))
    }

    /// WRITE `local` (this agent's descriptors) into the peer's `remote`, pairwise. With
    /// `notify` (a tag, bytes, or `(tag, bytes)`), the peer gets it after every byte landed.
    #[pyo3(signature = (peer, local, remote, notify = None))]
    fn write(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: &Bound<'_, PyAny>,
        remote: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        self.start(py, &peer, (local, remote), notify, true)
    }

    /// READ the peer's `remote` into `local` (this agent's descriptors), pairwise. With
    /// `notify`, the peer gets it after every byte was read out of its memory.
    #[pyo3(signature = (peer, local, remote, notify = None))]
    fn read(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: &Bound<'_, PyAny>,
        remote: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        self.start(py, &peer, (local, remote), notify, false)
    }

    /// READ blocks `remote_idx` of the peer's `remote` blocks into blocks `local_idx` of
    /// `local`, pairwise (indices: lists or NumPy int32/int64 arrays).
    #[pyo3(signature = (peer, local, local_idx, remote, remote_idx, notify = None))]
    #[allow(clippy::too_many_arguments)]
    fn read_blocks(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: PyRef<'_, LocalBlocks>,
        local_idx: &Bound<'_, PyAny>,
        remote: PyRef<'_, RemoteBlocks>,
        remote_idx: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        self.by_index(py, &peer, (&local, local_idx), (&remote, remote_idx), false)?
            .post(py, notify)
    }

    /// WRITE blocks `local_idx` of `local` into blocks `remote_idx` of the peer's `remote`.
    #[pyo3(signature = (peer, local, local_idx, remote, remote_idx, notify = None))]
    #[allow(clippy::too_many_arguments)]
    fn write_blocks(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: PyRef<'_, LocalBlocks>,
        local_idx: &Bound<'_, PyAny>,
        remote: PyRef<'_, RemoteBlocks>,
        remote_idx: &Bound<'_, PyAny>,
        notify: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        self.by_index(py, &peer, (&local, local_idx), (&remote, remote_idx), true)?
            .post(py, notify)
    }

    /// A READ of blocks `remote_idx` into blocks `local_idx`, checked, routed and split into
    /// requests once: `Prepared.post()` starts it, as often as wanted.
    fn prepare_read(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: PyRef<'_, LocalBlocks>,
        local_idx: &Bound<'_, PyAny>,
        remote: PyRef<'_, RemoteBlocks>,
        remote_idx: &Bound<'_, PyAny>,
    ) -> PyResult<Prepared> {
        self.by_index(py, &peer, (&local, local_idx), (&remote, remote_idx), false)
    }

    /// `prepare_read` for a WRITE of blocks `local_idx` into blocks `remote_idx`.
    fn prepare_write(
        &self,
        py: Python<'_>,
        peer: PyRef<'_, Peer>,
        local: PyRef<'_, LocalBlocks>,
        local_idx: &Bound<'_, PyAny>,
        remote: PyRef<'_, RemoteBlocks>,
        remote_idx: &Bound<'_, PyAny>,
    ) -> PyResult<Prepared> {
        self.by_index(py, &peer, (&local, local_idx), (&remote, remote_idx), true)
    }

    /// Register a range of a file (`FileSpec`, or a path for the whole file read-only):
    /// slice the result for descriptors of `read_file` / `write_file` / `load`.
    fn register_file(&self, py: Python<'_>, spec: &Bound<'_, PyAny>) -> PyResult<FileRegion> {
        let agent = self.agent()?;
        let spec = match spec.extract::<PyRef<'_, FileSpec>>() {
            Ok(s) => s.inner.clone(),
            Err(_) => {
                dmaplane::FileSpec::new(spec.extract::<std::path::PathBuf>().map_err(|_| {
                    invalid(
                        "spec",
                        spec.repr().map_or_else(|_| "?".into(), |r| r.to_string()),
                        "a FileSpec or a path",
                    )
                })?)
            }
        };
        let region = py.detach(|| agent.register_file(&spec)).map_err(to_py)?;
        Ok(FileRegion {
            inner: region,
            agent,
        })
    }

    /// Read file descriptors `files` into memory descriptors `into`, pairwise, through the
    /// agent's drive (straight into a GPU where the drive reaches it, else bounced).
    fn read_file(
        &self,
        py: Python<'_>,
        files: &Bound<'_, PyAny>,
        into: &Bound<'_, PyAny>,
    ) -> PyResult<FileTransfer> {
        let agent = self.agent()?;
        let (f, m) = (local_descs(files, "files")?, local_descs(into, "into")?);
        let t = py.detach(|| agent.read_file(&f, &m)).map_err(to_py)?;
        Ok(FileTransfer {
            inner: std::sync::Arc::new(t),
        })
    }

    /// Write memory descriptors `source` into file descriptors `files`, pairwise.
    fn write_file(
        &self,
        py: Python<'_>,
        source: &Bound<'_, PyAny>,
        files: &Bound<'_, PyAny>,
    ) -> PyResult<FileTransfer> {
        let agent = self.agent()?;
        let (m, f) = (local_descs(source, "source")?, local_descs(files, "files")?);
        let t = py.detach(|| agent.write_file(&m, &f)).map_err(to_py)?;
        Ok(FileTransfer {
            inner: std::sync::Arc::new(t),
        })
    }

    /// Load checkpoint shards into the peer's memory: `shards` is a list of
    /// `(file_desc, remote_desc)` of equal lengths; each is read into a `slots` descriptor
    /// (local memory; two let the read of shard n + 1 overlap the send of shard n), then
    /// written to the peer. `progress(shard, step)` is called as each moves on (`step`:
    /// "read-started", "read-done", "send-started", "send-done"). Returns the report:
    /// `shards`, `bytes`, `seconds`, `gbps`. The first error ends the load after everything
    /// started has ended.
    #[pyo3(signature = (peer, shards, slots, timeout = 60.0, progress = None))]
    fn load<'py>(
        &self,
        py: Python<'py>,
        peer: PyRef<'_, Peer>,
        shards: Vec<(PyRef<'_, Desc>, PyRef<'_, RemoteDesc>)>,
        slots: &Bound<'_, PyAny>,
        timeout: f64,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(invalid("timeout", timeout, "seconds, more than 0"));
        }
        let agent = self.agent()?;
        let shards = shards
            .iter()
            .map(|(f, r)| dmaplane::load::Shard {
                file: f.inner,
                remote: r.inner.clone(),
            })
            .collect();
        let slots = local_descs(slots, "slots")?;
        crate::files::load(
            py,
            &agent,
            &peer.inner,
            shards,
            slots,
            std::time::Duration::from_secs_f64(timeout),
            progress,
        )
    }

    /// Send the peer a notification on its own: `tag` and `data`.
    #[pyo3(signature = (peer, tag, data = None))]
    fn notify(&self, peer: PyRef<'_, Peer>, tag: String, data: Option<Vec<u8>>) -> PyResult<()> {
        self.agent()?
            .notify(
                &peer.inner,
                dmaplane::Notify::new(tag, data.unwrap_or_default()),
            )
            .map_err(to_py)
    }

    /// The next notification (from `peer`, tagged `tag`, or with a tag starting with
    /// `prefix`; the others stay queued), waiting up to `timeout` seconds with the GIL
    /// released (`None`: as long as it takes). `None` when none came.
    #[pyo3(signature = (timeout = None, peer = None, tag = None, prefix = None))]
    fn next_notification(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        peer: Option<String>,
        tag: Option<String>,
        prefix: Option<String>,
    ) -> PyResult<Option<Notification>> {
        let agent = self.agent()?;
        let mut f = dmaplane::NotifyFilter::any();
        if let Some(p) = peer {
            f = f.from(p);
        }
        if let Some(t) = tag {
            f = f.tag(t);
        }
        if let Some(p) = prefix {
            f = f.tag_prefix(p);
        }
        let deadline = crate::deadline(timeout)?;
        let got = crate::wait_releasing(py, deadline, |slice| {
            agent.next_notification_matching(&f, slice)
        })?;
        Ok(got.map(|n| Notification::new(py, n)))
    }

    /// The next notification (by `peer`, `tag` or `prefix`) as an awaitable:
    /// `n = await agent.notification(tag="done")`.
    #[pyo3(signature = (peer = None, tag = None, prefix = None))]
    fn notification<'py>(
        slf: Bound<'py, Self>,
        peer: Option<String>,
        tag: Option<String>,
        prefix: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("dmaplane._aio")?
            .call_method1("next_notification", (slf, peer, tag, prefix))
    }

    /// Every notification received and not yet read.
    fn notifications(&self, py: Python<'_>) -> PyResult<Vec<Notification>> {
        Ok(self
            .agent()?
            .notifications()
            .into_iter()
            .map(|n| Notification::new(py, n))
            .collect())
    }

    /// Events since the last call (memory freed, a peer's region gone, peers lost), as dicts.
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let json = py.import("json")?;
        let list = PyList::empty(py);
        for e in self.agent()?.events() {
            let text = serde_json_text(&e);
            list.append(json.call_method1("loads", (text,))?)?;
        }
        Ok(list)
    }

    /// The agent's counters: transfers, requests, bytes, notifications, the cache.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json_text(&self.agent()?.stats());
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Stop the agent (as leaving its `with` block does): its peers are told, its threads
    /// end. Registrations still held keep their memory until deregistered.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self
            .inner
            .lock()
            .map_err(|_| invalid("agent", &self.name, "poisoned"))?
            .take();
        py.detach(move || drop(taken));
        Ok(())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match self.inner.lock().ok().and_then(|g| g.clone()) {
            Some(a) => format!("Agent({:?}, nics={:?})", self.name, a.nics()),
            None => format!("Agent({:?}, closed)", self.name),
        }
    }
}

impl Agent {
    /// CUDA memory, registered in place; the producer held until the memory is freed.
    fn lend_cuda(&self, py: Python<'_>, name: String, lent: crate::cuda::Lent) -> PyResult<Region> {
        let crate::cuda::Lent { addr, len, keeper } = lent;
        let released = keeper.released();
        self.registered(py, addr as usize, released, move |agent| {
            // SAFETY: the keeper holds the producer (and its DLPack tensor), which keeps the
            // memory allocated until the keeper drops — done by the memory's free, after
            // every importer quiesced.
            unsafe { agent.lend_cuda(&name, addr, len, Box::new(keeper)) }
        })
    }

    /// Host memory, registered in place; the object held until the memory is freed.
    fn lend(&self, py: Python<'_>, name: String, lent: crate::dlpack::Held) -> PyResult<Region> {
        let (address, released) = (lent.address(), lent.released());
        self.registered(py, address, released, move |agent| {
            agent.lend(&name, lent.boxed())
        })
    }

    /// The memory `make` lends the agent, registered (with the GIL released), as a `Region`
    /// whose deregistration waits for `released`.
    fn registered(
        &self,
        py: Python<'_>,
        address: usize,
        released: std::sync::Arc<std::sync::atomic::AtomicBool>,
        make: impl FnOnce(&dmaplane::Agent) -> dmaplane::Result<dmaplane::Memory> + Send,
    ) -> PyResult<Region> {
        let agent = self.agent()?;
        let (memory, region) = py
            .detach(|| {
                let memory = make(&agent)?;
                let region = agent.register(&memory)?;
                Ok::<_, dmaplane::Error>((memory, region))
            })
            .map_err(registration)?;
        Ok(Region {
            region: Mutex::new(Some(region)),
            memory,
            address,
            released,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn by_index(
        &self,
        py: Python<'_>,
        peer: &Peer,
        (local, local_idx): (&LocalBlocks, &Bound<'_, PyAny>),
        (remote, remote_idx): (&RemoteBlocks, &Bound<'_, PyAny>),
        write: bool,
    ) -> PyResult<Prepared> {
        let agent = self.agent()?;
        let li = indices(local_idx, "local_idx")?;
        let ri = indices(remote_idx, "remote_idx")?;
        let p = &peer.inner;
        let prepared = py
            .detach(|| {
                if write {
                    agent.prepare_write(p, &local.inner, &li, &remote.inner, &ri)
                } else {
                    agent.prepare_read(p, &local.inner, &li, &remote.inner, &ri)
                }
            })
            .map_err(to_py)?;
        Ok(Prepared { inner: prepared })
    }

    fn start(
        &self,
        py: Python<'_>,
        peer: &Peer,
        (local, remote): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
        notify: Option<&Bound<'_, PyAny>>,
        write: bool,
    ) -> PyResult<Transfer> {
        let agent = self.agent()?;
        let l: Vec<Desc> = descs(local, "local", LOCAL)?;
        let r: Vec<RemoteDesc> = descs(remote, "remote", REMOTE)?;
        let l: Vec<dmaplane::Desc> = l.into_iter().map(|d| d.inner).collect();
        let r: Vec<dmaplane::RemoteDesc> = r.into_iter().map(|d| d.inner).collect();
        let n = notify_arg(notify)?;
        let p = peer.inner.clone();
        let t = py
            .detach(|| {
                if write {
                    agent.write(&p, &l, &r, n)
                } else {
                    agent.read(&p, &l, &r, n)
                }
            })
            .map_err(to_py)?;
        Ok(Transfer { inner: t })
    }
}

fn serde_json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
}

/// Registered memory (`Agent.register`): slice it for descriptors (`region[offset:offset+n]`).
#[pyclass(module = "dmaplane._dmaplane", frozen)]
pub(crate) struct Region {
    region: Mutex<Option<dmaplane::Region>>,
    memory: dmaplane::Memory,
    /// Where the bytes are in this process.
    address: usize,
    /// Set once the agent let go of the object (after the deregistration's revoke, when the
    /// last reference of the revoked memory went).
    released: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Region {
    fn region(&self) -> PyResult<dmaplane::Region> {
        self.region
            .lock()
            .map_err(|_| invalid("region", self.memory.name(), "poisoned"))?
            .clone()
            .ok_or_else(|| {
                invalid(
                    "region",
                    self.memory.name(),
                    "deregistered: register the object again",
                )
            })
    }
}

#[pymethods]
impl Region {
    /// The registration id (what the peer's descriptors name).
    #[getter]
    fn id(&self) -> PyResult<u32> {
        Ok(self.region()?.id())
    }
    /// The name it was registered under.
    #[getter]
    fn name(&self) -> String {
        self.memory.name().to_string()
    }
    /// Whether the buffer was read-only (a WRITE's source only).
    #[getter]
    fn read_only(&self) -> bool {
        self.memory.is_read_only()
    }
    fn __len__(&self) -> usize {
        usize::try_from(self.memory.len()).unwrap_or(usize::MAX)
    }
    fn __getitem__(&self, key: &Bound<'_, PyAny>) -> PyResult<Desc> {
        let r = self.region()?;
        let (offset, len) = range(key, r.len())?;
        Ok(Desc {
            inner: r.desc(offset, len).map_err(to_py)?,
        })
    }
    /// The whole region as one descriptor.
    fn all(&self) -> PyResult<Desc> {
        Ok(Desc {
            inner: self.region()?.all(),
        })
    }
    /// The region split into blocks of `size` bytes (block `i` at `i * size`), for transfers
    /// by index (`Agent.read_blocks`, `Agent.prepare_read`).
    fn blocks(&self, size: u64) -> PyResult<LocalBlocks> {
        Ok(LocalBlocks {
            inner: self.region()?.blocks(size).map_err(to_py)?,
        })
    }
    /// The address of its first byte in this process (what NIXL's descriptors name).
    #[getter]
    fn address(&self) -> usize {
        self.address
    }
    /// Whether it was deregistered.
    #[getter]
    fn deregistered(&self) -> bool {
        self.memory.is_freed()
    }
    /// Deregister: every NIC and every peer that may reach the memory stops first (transfers
    /// using it end with `RevokedError`), then the object's buffer is let go. Raises when an
    /// importer missed `timeout` seconds (the buffer is then kept until nothing reaches it).
    #[pyo3(signature = (timeout = 5.0))]
    fn deregister(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        if !(timeout.is_finite() && timeout >= 0.0) {
            return Err(invalid("timeout", timeout, "seconds, at least 0"));
        }
        let taken = self
            .region
            .lock()
            .map_err(|_| invalid("region", self.memory.name(), "poisoned"))?
            .take();
        let memory = self.memory.clone();
        let released = self.released.clone();
        py.detach(move || {
            drop(taken);
            let deadline = std::time::Duration::from_secs_f64(timeout);
            let started = std::time::Instant::now();
            memory.free(deadline).map(|_| ())?;
            // The object is let go once the last reference of the revoked memory goes (the
            // engine's and the NICs', right after the free): wait for it, so the caller may
            // resize or free the object as soon as this returns.
            while !released.load(std::sync::atomic::Ordering::Acquire)
                && started.elapsed() < deadline.max(std::time::Duration::from_secs(1))
            {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            Ok(())
        })
        .map_err(to_py)
    }
    fn __repr__(&self) -> String {
        format!(
            "Region(name={:?}, len={}, read_only={}, deregistered={})",
            self.memory.name(),
            self.memory.len(),
            self.memory.is_read_only(),
            self.memory.is_freed()
        )
    }
}
