//! [`FileTransfer`]: the handle of file I/O under way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Drive;
use crate::error::{Error, Result};
use crate::file::StoragePath;
use crate::sync::{lock, wait_timeout};

/// File I/O under way ([`crate::Agent::read_file`], [`crate::Agent::write_file`]). Dropping it
/// does not stop it: what was queued still completes.
pub struct FileTransfer {
    pub(super) drive: Arc<Drive>,
    pub(super) id: u64,
    pub(super) total: u64,
    pub(super) paths: Vec<StoragePath>,
}

impl std::fmt::Debug for FileTransfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTransfer")
            .field("id", &self.id)
            .field("drive", &self.drive.name)
            .field("bytes", &self.total)
            .finish()
    }
}

impl FileTransfer {
    /// Bytes it moves when done.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether it moves nothing (never true: empty descriptors are refused).
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// How the drive reaches each memory the transfer touches.
    pub fn paths(&self) -> &[StoragePath] {
        &self.paths
    }

    /// Whether it ended (done or failed).
    pub fn is_done(&self) -> bool {
        lock(&self.drive.st)
            .ops
            .get(&self.id)
            .is_none_or(|o| o.finished)
    }

    /// Wait up to `timeout` for it to end: the bytes moved, or the first error (every piece on
    /// the drive completed first). [`Error::WaitTimeout`] leaves it going.
    pub fn wait(&self, timeout: Duration) -> Result<u64> {
        let until = Instant::now() + timeout;
        let mut st = lock(&self.drive.st);
        loop {
            match st.ops.get(&self.id) {
                Some(op) if op.finished => {
                    return match &op.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(op.moved),
                    };
                }
                Some(_) => {}
                None => {
                    return Err(Error::setup(&self.drive.agent, "file transfer forgotten"));
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::WaitTimeout {
                    transfer: self.id,
                    peer: format!("drive {}", self.drive.name),
                    waited: timeout,
                });
            }
            st = wait_timeout(&self.drive.finished, st, left).0;
        }
    }
}

/// Awaiting a file transfer needs no runtime: the drive's thread wakes the task when the last
/// piece completes. The output is [`FileTransfer::wait`]'s.
impl std::future::Future for FileTransfer {
    type Output = Result<u64>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<u64>> {
        let mut st = lock(&self.drive.st);
        let poll = match st.ops.get_mut(&self.id) {
            Some(op) if op.finished => std::task::Poll::Ready(match &op.error {
                Some(e) => Err(e.clone()),
                None => Ok(op.moved),
            }),
            Some(op) => {
                op.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
            None => std::task::Poll::Ready(Err(Error::setup(
                &self.drive.agent,
                "file transfer forgotten",
            ))),
        };
        self.drive.unlock(st);
        poll
    }
}

impl Drop for FileTransfer {
    fn drop(&mut self) {
        let mut st = lock(&self.drive.st);
        match st.ops.get_mut(&self.id) {
            Some(op) if op.finished => {
                if let Some(op) = st.ops.remove(&self.id) {
                    st.trash_ops.push(op);
                }
            }
            Some(op) => op.detached = true,
            None => {}
        }
        self.drive.unlock(st);
    }
}
