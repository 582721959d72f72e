//! What a hostile flood of connections costs the agent, measured from outside it (the
//! process's own thread count and resident memory, as Linux reports them): no more threads
//! than the handshakes it serves at once, no more buffered bytes than those handshakes'
//! message bound, all of it given back once the handshakes' time is up, and an honest peer
//! served afterwards. Alone in its file: the counts are the whole process's.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dmaplane::{Agent, Limits, Testbed};

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Resident memory of this process now, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn a_flood_of_connections_grows_threads_and_memory_only_to_the_configured_bounds() {
    const HANDSHAKES: usize = 8;
    const MESSAGE: usize = 1 << 20;
    const CONNECTIONS: usize = 200;
    let tb = Testbed::builtin().unwrap();
    let a = Agent::builder("a")
        .testbed(tb.clone())
        .nics(["nic0"])
        .limits(Limits {
            handshakes: HANDSHAKES,
            message_bytes: MESSAGE,
            handshake_time: Duration::from_secs(2),
            ..Limits::default()
        })
        .build()
        .unwrap();
    let honest = Agent::builder("honest")
        .testbed(tb)
        .nics(["nic1"])
        .build()
        .unwrap();
    // Settle: the agents' own threads have started.
    std::thread::sleep(Duration::from_millis(200));
    let (threads0, rss0) = (threads(), rss());

    // Sample the thread count while the flood runs (the sampler is one thread more).
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(threads(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut peak_rss = 0;
    // Each connection sends almost a whole message without its newline, then holds it open:
    // an agent that served every one would hold a thread and a megabyte per connection.
    let almost = vec![b'x'; MESSAGE - 4096];
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let Ok(c) = TcpStream::connect(a.listen_addr()) else {
            continue;
        };
        c.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = (&c).write_all(&almost);
        held.push(c);
        peak_rss = peak_rss.max(rss());
    }
    let served_at_once = a.stats().handshakes_under_way;
    // The handshakes' time runs out: every slot, thread and buffer is given back.
    let due = Instant::now() + Duration::from_secs(20);
    while (a.stats().handshakes_under_way > 0 || threads() > threads0 + 1) && Instant::now() < due {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let stats = a.stats();
    let extra_threads = peak.load(Ordering::Relaxed).saturating_sub(threads0 + 1);
    let extra_rss = peak_rss.saturating_sub(rss0);
    eprintln!(
        "{CONNECTIONS} connections of {} KiB each: at most {extra_threads} threads more \
         (limit {HANDSHAKES}), {} KiB more resident at the peak (limit {} KiB buffered), \
         {} refused at the door, {} cut at the handshake time",
        almost.len() >> 10,
        extra_rss >> 10,
        (HANDSHAKES * MESSAGE) >> 10,
        stats.refused.handshakes,
        stats.refused.handshake_time,
    );
    assert!(served_at_once <= HANDSHAKES as u64, "{stats:?}");
    assert!(
        extra_threads <= HANDSHAKES,
        "{extra_threads} threads more than before the flood; the bound is {HANDSHAKES}"
    );
    // The handshakes' buffers, their read buffers and stacks, and room for the allocator:
    // far below the 200 MiB an unbounded agent would hold.
    let bound = (HANDSHAKES * (MESSAGE + (128 << 10))) as u64 + (24 << 20);
    assert!(
        extra_rss <= bound,
        "{} KiB more resident; the bound is {} KiB",
        extra_rss >> 10,
        bound >> 10
    );
    assert!(
        stats.refused.handshakes > 0,
        "nothing refused at the door: {stats:?}"
    );
    assert_eq!(stats.handshakes_under_way, 0, "{stats:?}");
    assert!(
        threads() <= threads0 + 1,
        "{} threads after the flood, {threads0} before",
        threads()
    );
    drop(held);
    // And the agent still serves an honest peer.
    let peer = honest.connect_to(&a.listen_addr().to_string()).unwrap();
    assert_eq!(peer.name(), "a");
}
