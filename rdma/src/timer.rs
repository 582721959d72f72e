//! One lazily started timer thread per tracker: runs callbacks at deadlines (drain deadlines,
//! lease cut-offs). Callbacks must be short and must not block.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::sync::lock;

type Job = Box<dyn FnOnce() + Send>;

struct TimerEntry {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for TimerEntry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for TimerEntry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Reverse<TimerEntry>>,
    seq: u64,
    started: bool,
}

pub(crate) struct Timer {
    inner: Arc<(Mutex<State>, Condvar)>,
    /// The thread's name.
    name: &'static str,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timer")
    }
}

impl Timer {
    /// A timer whose thread (started on the first job) is called `name`.
    pub(crate) fn new(name: &'static str) -> Timer {
        Timer {
            inner: Arc::default(),
            name,
        }
    }

    pub(crate) fn at(&self, at: Instant, job: impl FnOnce() + Send + 'static) {
        let (m, cv) = &*self.inner;
        let mut st = lock(m);
        // Wake the thread only when this deadline comes before the one it sleeps towards: a
        // revoke arms a cut-off each time, and a needless wake-up is one more thread wanting a
        // CPU in the middle of the revoke.
        let earlier = st.heap.peek().is_none_or(|Reverse(e)| at < e.at);
        st.seq += 1;
        let seq = st.seq;
        st.heap.push(Reverse(TimerEntry {
            at,
            seq,
            job: Box::new(job),
        }));
        if !st.started {
            st.started = true;
            let inner = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || run(inner));
            if spawned.is_err() {
                st.started = false;
                tracing::error!(
                    thread = self.name,
                    "could not start the timer thread: its jobs will not run"
                );
            }
        }
        if earlier {
            cv.notify_one();
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.inner.1.notify_all();
    }
}

fn run(inner: std::sync::Weak<(Mutex<State>, Condvar)>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let (m, cv) = &*inner;
        let mut st = lock(m);
        let now = Instant::now();
        let due = match st.heap.peek() {
            Some(Reverse(e)) if e.at <= now => st.heap.pop().map(|Reverse(e)| e.job),
            Some(Reverse(e)) => {
                let wait = e.at - now;
                drop(cv.wait_timeout(st, wait));
                continue;
            }
            None => {
                // Re-check now and then so the thread ends once the tracker is gone.
                drop(cv.wait_timeout(st, std::time::Duration::from_millis(200)));
                continue;
            }
        };
        drop(st);
        if let Some(job) = due {
            job();
        }
    }
}
