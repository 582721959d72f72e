//! The drive's scheduler: what is queued on the engine (at most [`MAX_COMMANDS`]), what each
//! completion does to its transfer, and when a transfer ends.

use std::sync::Arc;

use dmaplane_core::Invalid;
use dmaplane_storage::{BufId, Completion, FileId, Ring, StorageError};

use crate::stage::Stage;

use super::piece::{Piece, PieceBuffer};
use super::piece::{fail, free_slot, judge, revoked_or, storage_error};
use super::{Drive, DriveBackend, MAX_COMMANDS, State};

/// Queue one request on the engine: (write, (file, at), (buffer, offset), len, user data).
type Submit<'a> = dyn FnMut(bool, (FileId, u64), (BufId, u64), u64, u64) -> std::result::Result<(), StorageError>
    + 'a;

impl Drive {
    /// Queue what the transfers have room for on the drive: on the simulated one from any
    /// thread, on the kernel's only from its thread (which passes its ring).
    pub(super) fn pump(&self, st: &mut State, ring: Option<&mut Ring>) {
        match (&self.engine, ring) {
            (DriveBackend::Sim(nvme), _) => self.pump_with(st, &mut |write, at, buf, len, ud| {
                if write {
                    nvme.write(at, buf, len, ud)
                } else {
                    nvme.read(at, buf, len, ud)
                }
            }),
            (DriveBackend::Kernel, Some(ring)) => {
                self.pump_with(st, &mut |write, at, buf, len, ud| {
                    let len = u32::try_from(len).map_err(|_| {
                        StorageError::Invalid(Invalid::new(
                            "io_uring",
                            "len",
                            len,
                            "at most 4 GiB - 1",
                        ))
                    })?;
                    if write {
                        ring.write(at, buf, len, ud)
                    } else {
                        ring.read(at, buf, len, ud)
                    }
                });
                if let Err(e) = ring.submit() {
                    tracing::warn!(drive = %self.name, error = %e, "io_uring submit");
                }
            }
            // Only the ring's thread submits: wake it.
            (DriveBackend::Kernel, None) => self.work.notify_all(),
        }
    }

    pub(super) fn pump_with(&self, st: &mut State, submit: &mut Submit<'_>) {
        let mut queued: usize = st.cmds.len();
        let ids: Vec<u64> = st.ops.keys().copied().collect();
        for id in ids {
            loop {
                if queued >= MAX_COMMANDS {
                    return;
                }
                let ud = st.next_ud;
                let Some(op) = st.ops.get_mut(&id) else { break };
                if op.error.is_some() || op.finished {
                    break;
                }
                let Some(mut p) = op.queue.pop_front() else {
                    break;
                };
                let (buf, off) = match &mut p.target {
                    PieceBuffer::Direct(b) => (*b, p.mem_off),
                    PieceBuffer::Bounce { idx, slot } => {
                        let b = &mut op.bounces[*idx];
                        let Some(s) = b.free.pop() else {
                            op.queue.push_front(p);
                            break;
                        };
                        *slot = Some(s);
                        (b.buf, s)
                    }
                };
                let mut result = Ok(());
                if op.write
                    && let PieceBuffer::Bounce { idx, .. } = p.target
                {
                    // Out of device memory into the bounce piece before the drive takes it.
                    let b = &op.bounces[idx];
                    result = b
                        .stage
                        .copy_at(&p.region.memory, p.mem_off, off, p.len, true)
                        .map_err(|e| revoked_or(&p, e));
                }
                if result.is_ok() {
                    result = submit(op.write, (p.file.media, p.at), (buf, off), p.len, ud)
                        .map_err(|e| storage_error(&p, op.write, e));
                }
                match result {
                    Ok(()) => {
                        op.in_flight += 1;
                        st.next_ud += 1;
                        st.cmds.insert(ud, (id, p));
                        queued += 1;
                    }
                    Err(e) => {
                        free_slot(op, &p);
                        fail(op, e);
                        let left: Vec<Piece> = op.queue.drain(..).collect();
                        st.trash.extend(left);
                        st.trash.push(p);
                        self.settle(st, id);
                        break;
                    }
                }
            }
        }
    }

    /// Account one completion of the drive.
    pub(super) fn complete(&self, st: &mut State, c: &Completion) {
        let Some((id, p)) = st.cmds.remove(&c.user_data) else {
            tracing::warn!(drive = %self.name, user_data = c.user_data, "a completion for no command");
            return;
        };
        let Some(op) = st.ops.get_mut(&id) else {
            return;
        };
        op.in_flight -= 1;
        let judged = judge(&p, op.write, c.result);
        let result = match (judged, p.target) {
            (Ok(()), PieceBuffer::Bounce { idx, slot: Some(s) })
                if !op.write && op.error.is_none() =>
            {
                // Out of the bounce piece into device memory, on this thread, while the
                // drive fills the other piece.
                op.bounces[idx]
                    .stage
                    .copy_at(&p.region.memory, p.mem_off, s, p.len, false)
                    .map_err(|e| revoked_or(&p, e))
            }
            (r, _) => r,
        };
        free_slot(op, &p);
        match result {
            Ok(()) => op.moved += p.len,
            Err(e) => fail(op, e),
        }
        if op.error.is_some() {
            let left: Vec<Piece> = op.queue.drain(..).collect();
            st.trash.extend(left);
        }
        st.trash.push(p);
        self.settle(st, id);
    }

    /// Finish transfer `id` if nothing of it is left on the drive and nothing more will go.
    pub(super) fn settle(&self, st: &mut State, id: u64) {
        let Some(op) = st.ops.get_mut(&id) else {
            return;
        };
        if op.in_flight > 0 || (op.error.is_none() && !op.queue.is_empty()) {
            return;
        }
        let left: Vec<Piece> = op.queue.drain(..).collect();
        op.finished = true;
        if let Some(w) = op.waker.take() {
            w.wake();
        }
        // Nothing of it is on the drive: its bounce buffers are let go of, each kept alive
        // until the engine has (the kernel's ring does it on its thread).
        let bufs: Vec<(BufId, Arc<Stage>)> = op
            .bounces
            .iter()
            .map(|b| (b.buf, b.stage.clone()))
            .collect();
        for (b, stage) in bufs {
            match &self.engine {
                DriveBackend::Sim(nvme) if nvme.release(b).is_ok() => {}
                _ => st.releases.push((b, Some(stage))),
            }
        }
        st.trash.extend(left);
        if st.ops.get(&id).is_some_and(|o| o.detached)
            && let Some(op) = st.ops.remove(&id)
        {
            st.trash_ops.push(op);
        }
        self.finished.notify_all();
    }

    /// Let go of imported buffers nothing is queued on any more.
    pub(super) fn release(&self, st: &mut State, ring: Option<&mut Ring>) {
        match (&self.engine, ring) {
            (DriveBackend::Sim(nvme), _) => st.releases.retain(|(b, _)| nvme.release(*b).is_err()),
            (DriveBackend::Kernel, Some(ring)) => {
                st.releases.retain(|(b, _)| ring.release(*b).is_err())
            }
            (DriveBackend::Kernel, None) => {}
        }
    }
}
