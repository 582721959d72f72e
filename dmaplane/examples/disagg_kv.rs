//! Disaggregated serving: a prefill engine and a decode engine sharing KV-cache blocks.
//!
//! Prefill owns a pool of 64 KV blocks; for each request it tells decode which blocks hold the
//! request's KV (a notification). Decode READs those blocks by id from a prepared list into
//! random slots of its own 80-block pool, with a `done` notification attached: prefill gets it
//! once every byte was read, and only then reuses the blocks. Then prefill frees its pool under
//! decode's second batch: decode's READ ends with the typed remote revoke and decode is told
//! (`Event::PeerRegionGone`); prefill sees its own `Event::Freed`. The second batch is held half
//! done (`Agent::hold_transfers`), so the free meets it every run.
//!
//!     cargo run --release --example disagg_kv            # both on the built-in testbed
//!     cargo run --release --example disagg_kv -- --tcp   # two processes, TCP backend
//!
//! On the testbed prefill's pool is on gpu0 (reached by nic0 peer to peer) and decode's on
//! gpu2 (nic1), so the READ moves GPU memory to GPU memory. Over TCP both pools are host memory
//! of two processes of this host (the metadata blob goes from the prefill process to the decode
//! process on its stdout; on two hosts it would travel by any side channel).
use std::error::Error as StdError;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dmaplane::{Agent, Error, Event, Memory, Notify, NotifyFilter, Peer, Side, Testbed};

type Result<T> = std::result::Result<T, Box<dyn StdError + Send + Sync>>;

const BLOCK: u64 = 64 << 10;
const PREFILL_BLOCKS: u64 = 64;
const DECODE_BLOCKS: u64 = 80;
const PER_REQUEST: usize = 17;
const T: Duration = Duration::from_secs(30);

/// The bytes of KV block `id` as prefill wrote it for request `req`.
fn kv_bytes(req: u64, id: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i.wrapping_mul(31) ^ id.wrapping_mul(131) ^ req.wrapping_mul(7919)) as u8)
        .collect()
}

/// A small random generator (xorshift), seeded from the clock: a different set of block ids
/// every run.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng(t | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// `k` distinct numbers below `n`.
    fn distinct(&mut self, k: usize, n: u64) -> Vec<usize> {
        let mut v: Vec<usize> = Vec::with_capacity(k);
        while v.len() < k {
            let x = self.below(n) as usize;
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn ids_text(ids: &[usize]) -> String {
    ids.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_ids(bytes: &[u8]) -> Result<Vec<usize>> {
    let text = std::str::from_utf8(bytes)?;
    Ok(text
        .split(',')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?)
}

/// The next notification tagged `tag` from `from`, or an error saying which was missing.
fn expect_note(agent: &Agent, from: &str, tag: &str) -> Result<dmaplane::Notification> {
    agent
        .next_notification_matching(&NotifyFilter::any().from(from).tag(tag), T)
        .ok_or_else(|| format!("{}: no {tag:?} from {from} within {T:?}", agent.name()).into())
}

/// The first event `want` takes, waiting up to `T`.
fn expect_event(agent: &Agent, want: impl Fn(&Event) -> bool) -> Result<Event> {
    let due = Instant::now() + T;
    while Instant::now() < due {
        if let Some(e) = agent.events().into_iter().find(|e| want(e)) {
            return Ok(e);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("{}: the event did not come within {T:?}", agent.name()).into())
}

/// Prefill: the pool, the blob out through `publish`, then two requests.
fn prefill(agent: &Agent, pool: Memory, publish: impl FnOnce(Vec<u8>)) -> Result<()> {
    let say = |s: String| println!("prefill: {s}");
    for id in 0..PREFILL_BLOCKS {
        pool.write(id * BLOCK, &kv_bytes(1, id))?;
    }
    let region = agent.register(&pool)?;
    let blob = agent.metadata_blob()?;
    say(format!(
        "pool \"kv\": {PREFILL_BLOCKS} blocks of {} KiB on {}, {:?}; metadata blob {} bytes",
        BLOCK >> 10,
        pool.location(),
        region.paths()[0],
        blob.len()
    ));
    publish(blob);
    let decode = loop {
        if let Some(p) = agent.peer("decode") {
            break p;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut rng = Rng::new();

    // Request 1: its blocks, to decode; reused only once decode says it READ them.
    let ids = rng.distinct(PER_REQUEST, PREFILL_BLOCKS);
    agent.notify(&decode, Notify::new("kv-ready:req-1", ids_text(&ids)))?;
    say(format!(
        "req-1: KV in blocks [{}], told decode",
        ids_text(&ids)
    ));
    let done = expect_note(agent, "decode", "done:req-1")?;
    let got_done = now_ns();
    let posted: u128 = std::str::from_utf8(&done.bytes)?.parse()?;
    // Decode says when it saw its READ complete: the notification's latency is from then.
    let completed: u128 =
        std::str::from_utf8(&expect_note(agent, "decode", "completed")?.bytes)?.parse()?;
    say(format!(
        "req-1: \"done\" from decode (its READ's notification, transfer {}) {:.1} µs after \
         decode posted the READ, {:.1} µs after decode saw it complete; reusing the {} blocks",
        done.transfer.map_or_else(|| "-".into(), |t| t.to_string()),
        got_done.saturating_sub(posted) as f64 / 1e3,
        got_done as f64 / 1e3 - completed as f64 / 1e3,
        ids.len()
    ));
    let ping = expect_note(agent, "decode", "ping")?;
    let sent: u128 = std::str::from_utf8(&ping.bytes)?.parse()?;
    say(format!(
        "a notification on its own from decode: {:.1} µs from Agent::notify to here",
        now_ns().saturating_sub(sent) as f64 / 1e3
    ));
    for &id in &ids {
        pool.write(id as u64 * BLOCK, &kv_bytes(2, id as u64))?;
    }

    // Request 2: freed under decode's READ.
    let ids = rng.distinct(PER_REQUEST, PREFILL_BLOCKS);
    agent.notify(&decode, Notify::new("kv-ready:req-2", ids_text(&ids)))?;
    expect_note(agent, "decode", "reading:req-2")?;
    let report = pool.free(Duration::from_secs(5))?;
    say(format!(
        "freed the pool under decode's req-2: revoke acknowledged by {} importers in {} µs \
         (epoch {})",
        report.importers.len(),
        report.elapsed_us,
        report.epoch
    ));
    let freed = expect_event(agent, |e| matches!(e, Event::Freed { .. }))?;
    say(format!("event: {freed:?}"));
    expect_note(agent, "decode", "bye")?;
    Ok(())
}

/// Decode: connect with prefill's blob, find its pool by name, two requests.
fn decode(agent: &Agent, pool: Memory, blob: &[u8]) -> Result<()> {
    let say = |s: String| println!("decode: {s}");
    let peer: Peer = agent.connect(blob)?;
    let kv = peer.wait_region("kv", T)?;
    say(format!(
        "connected to {}; found its \"kv\" (region {}, {} KiB on {})",
        peer.name(),
        kv.id,
        kv.len >> 10,
        kv.location
    ));
    // Both pools split into blocks once.
    let theirs = peer.blocks(kv.id, BLOCK)?;
    let region = agent.register(&pool)?;
    let mine = region.blocks(BLOCK)?;
    let mut rng = Rng::new();

    // Request 1: READ the blocks by id into random slots, "done" attached.
    let ready = expect_note(agent, "prefill", "kv-ready:req-1")?;
    let ids = parse_ids(&ready.bytes)?;
    let slots = rng.distinct(ids.len(), DECODE_BLOCKS);
    let read = agent.prepare_read(&peer, &mine, &slots, &theirs, &ids)?;
    let start = Instant::now();
    // The notification carries when the READ was posted; prefill gets it once it completed.
    let t = read.post(Some(Notify::new("done:req-1", now_ns().to_string())))?;
    t.wait(T)?;
    let took = start.elapsed();
    agent.notify(&peer, Notify::new("completed", now_ns().to_string()))?;
    let mut verified = 0;
    for (&id, &slot) in ids.iter().zip(&slots) {
        let mut got = vec![0u8; BLOCK as usize];
        pool.read(slot as u64 * BLOCK, &mut got)?;
        if got != kv_bytes(1, id as u64) {
            return Err(format!("req-1: block {id} in slot {slot} is not prefill's").into());
        }
        verified += 1;
    }
    say(format!(
        "req-1: READ blocks [{}] into slots [{}]: {} KiB in {:.2} ms ({:.2} GB/s), \
         {verified}/{} blocks verified",
        ids_text(&ids),
        ids_text(&slots),
        read.bytes() >> 10,
        took.as_secs_f64() * 1e3,
        read.bytes() as f64 / took.as_secs_f64() / 1e9,
        ids.len()
    ));

    agent.notify(&peer, Notify::new("ping", now_ns().to_string()))?;

    // Request 2: held after 4 of its requests, so prefill's free meets it half done.
    let ready = expect_note(agent, "prefill", "kv-ready:req-2")?;
    let ids = parse_ids(&ready.bytes)?;
    let slots = rng.distinct(ids.len(), DECODE_BLOCKS);
    let hold = agent.hold_transfers(4);
    let t = agent.read_blocks(
        &peer,
        &mine,
        &slots,
        &theirs,
        &ids,
        Some(Notify::tag_only("done:req-2")),
    )?;
    hold.wait_held(&t, T)?;
    say(format!(
        "req-2: READ of {} blocks held after 4 requests (Agent::hold_transfers); prefill \
         frees its pool now",
        ids.len()
    ));
    agent.notify(&peer, Notify::tag_only("reading:req-2"))?;
    match t.wait(T) {
        Err(
            e @ Error::Revoked {
                side: Side::Remote, ..
            },
        ) => say(format!("req-2 ended typed: {e}")),
        other => return Err(format!("req-2 ended with {other:?}, not a remote revoke").into()),
    }
    drop(hold);
    let gone = expect_event(agent, |e| matches!(e, Event::PeerRegionGone { .. }))?;
    say(format!("event: {gone:?}"));
    match agent.read_blocks(&peer, &mine, &[0], &theirs, &[0], None) {
        Err(e) => say(format!("a new READ of the freed pool is refused: {e}")),
        Ok(_) => return Err("a READ of the freed pool was accepted".into()),
    }
    agent.notify(&peer, Notify::tag_only("bye"))?;
    Ok(())
}

fn on_testbed() -> Result<()> {
    let tb = Testbed::builtin()?;
    let p = Agent::builder("prefill")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()?;
    let d = Agent::builder("decode")
        .testbed(tb)
        .nics(["nic1"])
        .build()?;
    let (tx, rx) = mpsc::channel();
    let pool = p.alloc_gpu("kv", "gpu0", PREFILL_BLOCKS * BLOCK)?;
    let prefill_side = std::thread::spawn(move || {
        prefill(&p, pool, |blob| {
            let _ = tx.send(blob);
        })
        .map_err(|e| e.to_string())
    });
    let blob = rx.recv()?;
    let mine = d.alloc_gpu("kv", "gpu2", DECODE_BLOCKS * BLOCK)?;
    decode(&d, mine, &blob)?;
    prefill_side.join().map_err(|_| "prefill panicked")??;
    Ok(())
}

fn tcp_agent(name: &str) -> Result<Agent> {
    Ok(Agent::builder(name).tcp().build()?)
}

/// The decode process: start the prefill process, read its blob from its stdout.
fn over_tcp() -> Result<()> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--tcp", "--prefill"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or("no stdout from the prefill process")?;
    let (tx, rx) = mpsc::channel();
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(out)
            .lines()
            .map_while(std::result::Result::ok)
        {
            match line.strip_prefix("BLOB ") {
                Some(hex) => {
                    let _ = tx.send(hex.to_string());
                }
                None => println!("{line}"),
            }
        }
    });
    let hex = rx.recv_timeout(T)?;
    let blob = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<std::result::Result<Vec<u8>, _>>()?;
    let d = tcp_agent("decode")?;
    let mine = d.alloc_host("kv", DECODE_BLOCKS * BLOCK)?;
    let r = decode(&d, mine, &blob);
    let status = child.wait()?;
    let _ = echo.join();
    r?;
    if !status.success() {
        return Err(format!("the prefill process ended with {status}").into());
    }
    Ok(())
}

/// The prefill process: its blob, hex, on a line of its own.
fn prefill_process() -> Result<()> {
    let p = tcp_agent("prefill")?;
    let pool = p.alloc_host("kv", PREFILL_BLOCKS * BLOCK)?;
    prefill(&p, pool, |blob| {
        let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
        println!("BLOB {hex}");
        let _ = std::io::stdout().flush();
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tcp = args.iter().any(|a| a == "--tcp");
    match (tcp, args.iter().any(|a| a == "--prefill")) {
        (true, true) => prefill_process(),
        (true, false) => {
            println!("disagg_kv: prefill and decode in two processes, TCP backend");
            over_tcp()
        }
        (false, _) => {
            println!("disagg_kv: prefill and decode on the built-in testbed");
            on_testbed()
        }
    }
}
