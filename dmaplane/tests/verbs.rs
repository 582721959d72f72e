#![cfg(feature = "verbs")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Agent on a real RDMA device (Soft-RoCE in the qemu testbed), between two processes.
//!
//! `two_agents_in_two_processes` runs this test binary a second time as the peer
//! (`DMAPLANE_AGENT_ROLE=peer`): the peer builds its agent on the same device, allocates and
//! registers 64 MiB, and prints its handshake address and region id; this side connects over
//! TCP, WRITEs 64 MiB with a notification (the peer verifies every byte when it arrives), READs
//! it back into a caller's buffer (`Agent::adopt`, handed back by `Memory::reclaim` at the end)
//! and verifies, then deregisters its own source a quarter into a second WRITE: a typed
//! error, and the peer's memory still answers a READ after it.
//!
//! Without a device the test prints why and passes, unless `DMAPLANE_REQUIRE_RDMA=1`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dmaplane::{Agent, Error, Side, Status};

const LEN: u64 = 64 << 20;
const T: Duration = Duration::from_secs(240);

fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect()
}

fn agent(name: &str) -> Option<Agent> {
    let b = Agent::builder(name)
        .verbs()
        .stall_timeout(Duration::from_secs(60));
    let b = match std::env::var("DMAPLANE_RDMA_DEVICE") {
        Ok(d) => b.nics([d]),
        Err(_) => b,
    };
    match b.build() {
        Ok(a) => Some(a),
        Err(e) => {
            assert!(
                std::env::var("DMAPLANE_REQUIRE_RDMA").as_deref() != Ok("1"),
                "DMAPLANE_REQUIRE_RDMA=1 but no agent on verbs: {e}"
            );
            eprintln!("skipped: no RDMA device: {e}");
            None
        }
    }
}

/// The peer process: serve 64 MiB, verify what is written when told, exit when told.
#[test]
#[ignore = "run by two_agents_in_two_processes as its peer"]
fn helper_agent_peer() {
    if std::env::var("DMAPLANE_AGENT_ROLE").as_deref() != Ok("peer") {
        return;
    }
    let b = agent("peer").expect("the peer needs a device");
    let dst = b.alloc_host("peer-pool", LEN).unwrap();
    dst.write(0, &vec![0; LEN as usize]).unwrap();
    let r = b.register(&dst).unwrap();
    println!("LISTEN {} {}", b.listen_addr(), r.id());
    let want = pattern(LEN);
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < T, "the peer was never told to stop");
        let Some(n) = b.next_notification(Duration::from_secs(1)) else {
            continue;
        };
        match n.bytes.as_slice() {
            b"written" => {
                let mut got = vec![0u8; LEN as usize];
                dst.read(0, &mut got).unwrap();
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                println!(
                    "VERIFIED {}",
                    bad.map_or("ok".to_string(), |i| format!("byte {i} differs"))
                );
            }
            b"bye" => return,
            other => panic!("unexpected notification {other:?}"),
        }
    }
}

#[test]
fn two_agents_in_two_processes() {
    let Some(a) = agent("main") else { return };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_agent_peer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DMAPLANE_AGENT_ROLE", "peer")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| -> String {
        for l in lines.by_ref() {
            let l = l.unwrap();
            eprintln!("peer: {l}");
            // libtest prints "test NAME ... " without a newline first: look inside the line.
            if let Some(i) = l.find(prefix) {
                return l[i + prefix.len()..].trim().to_string();
            }
        }
        panic!("the peer ended before saying {prefix}");
    };
    let listen = next("LISTEN");
    let (addr, region) = listen.split_once(' ').unwrap();
    let region: u32 = region.parse().unwrap();
    let peer = a.connect_to(addr).unwrap();
    let data = pattern(LEN);
    let src = a.alloc_host("main-src", LEN).unwrap();
    src.write(0, &data).unwrap();
    let ra = a.register(&src).unwrap();
    eprintln!("registration: {:?}", ra.paths());
    let remote = peer.desc(region, 0, LEN).unwrap();

    // 64 MiB WRITE, the notification after it, verified by the peer.
    let start = Instant::now();
    a.write(
        &peer,
        &[ra.all()],
        std::slice::from_ref(&remote),
        Some(dmaplane::Notify::new("", b"written".to_vec())),
    )
    .unwrap()
    .wait(T)
    .unwrap();
    eprintln!("64 MiB WRITE in {:?}", start.elapsed());
    assert_eq!(next("VERIFIED"), "ok");

    // READ it back into a caller's buffer (registered in place by its process VA).
    let buf = vec![0u8; LEN as usize];
    let buf_at = buf.as_ptr();
    let back = a.adopt("main-back", buf).unwrap();
    let rback = a.register(&back).unwrap();
    eprintln!("caller's buffer: {:?}", rback.paths());
    let start = Instant::now();
    a.read(&peer, &[rback.all()], std::slice::from_ref(&remote), None)
        .unwrap()
        .wait(T)
        .unwrap();
    eprintln!("64 MiB READ in {:?}", start.elapsed());
    let mut got = vec![0u8; LEN as usize];
    back.read(0, &mut got).unwrap();
    assert!(got == data, "the READ differs");

    // Deregister the source a quarter into a second WRITE: a typed error.
    let t = a
        .write(&peer, &[ra.all()], std::slice::from_ref(&remote), None)
        .unwrap();
    let quarter = t.requests() as u64 / 4;
    while matches!(t.status(), Status::InProgress { done, .. } if done < quarter) {
        std::thread::sleep(Duration::from_micros(200));
    }
    a.deregister(&ra, Duration::from_secs(30)).unwrap();
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local,
            region,
            why,
            ..
        }) => {
            assert_eq!(region, ra.id());
            assert!(why.contains("deregistered"), "{why}");
        }
        other => panic!("expected a local revoke, got {other:?}"),
    }
    // The connection and the peer's memory live on.
    a.read(
        &peer,
        &[rback.desc(0, 1 << 20).unwrap()],
        &[peer.desc(region, 0, 1 << 20).unwrap()],
        None,
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let s = a.stats();
    eprintln!("stats: {s:?}");
    assert_eq!((s.transfers_done, s.transfers_failed), (3, 1), "{s:?}");

    // Tell the peer to stop (a notification needs a completed WRITE).
    a.write(
        &peer,
        &[rback.desc(0, 4096).unwrap()],
        &[peer.desc(region, 0, 4096).unwrap()],
        Some(dmaplane::Notify::new("", b"bye".to_vec())),
    )
    .unwrap()
    .wait(T)
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the peer failed: {status}");

    // The caller's buffer back: the same allocation, with what the READs put in it.
    let got = back.reclaim(Duration::from_secs(30)).unwrap();
    assert_eq!(
        got.as_ptr(),
        buf_at,
        "the NIC worked on the caller's allocation"
    );
    assert!(got == data, "the reclaimed buffer differs");
}

/// A dma-buf fd made elsewhere (here a udmabuf, handed over as a bare fd): registered as the
/// dma-buf where the provider has dma-buf MRs and then written by a peer and verified through
/// the exporter's own view; refused with the reason where it has none (rxe: no dma-buf MRs,
/// and the udmabuf's own mapping is `VM_PFNMAP`, which `ibv_reg_mr` cannot pin).
#[test]
fn a_dma_buf_fd_from_elsewhere_is_registered_or_refused_saying_why() {
    let (Some(a), Some(b)) = (agent("dmabuf-a"), agent("dmabuf-b")) else {
        return;
    };
    const N: u64 = 1 << 20;
    let buf = match dmaplane_core::dmabuf::UdmaBuf::new("elsewhere", N) {
        Ok(b) => b,
        Err(e) => {
            assert!(
                std::env::var("DMAPLANE_REQUIRE_DMABUF").as_deref() != Ok("1"),
                "DMAPLANE_REQUIRE_DMABUF=1 but no udmabuf: {e}"
            );
            eprintln!("skipped: no udmabuf: {e}");
            return;
        }
    };
    let fd = buf.fd().try_clone_to_owned().unwrap();
    let mem = b.import_dmabuf("elsewhere", fd).unwrap();
    assert_eq!(mem.len(), N);
    mem.write(0, b"through the agent").unwrap();
    let mut seen = [0u8; 17];
    buf.read(0, &mut seen).unwrap();
    assert_eq!(
        &seen, b"through the agent",
        "the agent's view is the exporter's pages"
    );
    match b.register(&mem) {
        Ok(rb) => {
            eprintln!("imported dma-buf registered: {:?}", rb.paths());
            let src = a.alloc_host("dmabuf-src", N).unwrap();
            let data = pattern(N);
            src.write(0, &data).unwrap();
            let ra = a.register(&src).unwrap();
            let peer = a.connect_to(&b.listen_addr().to_string()).unwrap();
            a.write(
                &peer,
                &[ra.all()],
                &[peer.desc(rb.id(), 0, N).unwrap()],
                None,
            )
            .unwrap()
            .wait(T)
            .unwrap();
            let mut got = vec![0u8; N as usize];
            buf.read(0, &mut got).unwrap();
            assert!(got == data, "the WRITE differs in the exporter's view");
        }
        Err(e) => {
            let why = e.to_string();
            eprintln!("imported dma-buf refused: {why}");
            assert!(why.contains("dma-buf") || why.contains("dmabuf"), "{why}");
        }
    }
    mem.free(Duration::from_secs(5)).unwrap();
}

/// Files on verbs go through this host's kernel: O_DIRECT reads with io_uring straight into
/// the agent's udmabuf memory (by its process address), written back, every byte checked; a
/// caller's Vec (16-byte aligned, as the allocator gives it) refused with the alignment named;
/// then the udmabuf freed under a read ends it with the typed revoke.
#[test]
fn files_are_read_into_udmabuf_memory_through_io_uring() {
    let Some(a) = agent("files") else { return };
    const N: u64 = 16 << 20;
    let dir = std::env::temp_dir().join(format!("dmaplane-verbs-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shard.bin");
    let data = pattern(N);
    std::fs::write(&path, &data).unwrap();
    let f = a
        .register_file(
            &dmaplane::FileSpec::new(&path)
                .writable()
                .buffered_fallback(),
        )
        .unwrap();
    eprintln!(
        "{}: O_DIRECT {}, alignment {:?}",
        path.display(),
        f.is_direct(),
        f.align()
    );
    let host = a.alloc_host("files-host", N).unwrap();
    let h = a.register(&host).unwrap();
    let t = a.read_file(&[f.all()], &[h.all()]).unwrap();
    assert_eq!(t.wait(T).unwrap(), N);
    eprintln!("paths: {:?}", t.paths());
    let mut got = vec![0u8; N as usize];
    host.read(0, &mut got).unwrap();
    assert!(got == data, "udmabuf memory");
    // Back: the first MiB, changed, written into the file.
    host.write(0, &[0xa5; 1 << 20]).unwrap();
    a.write_file(
        &[h.desc(0, 1 << 20).unwrap()],
        &[f.desc(0, 1 << 20).unwrap()],
    )
    .unwrap()
    .wait(T)
    .unwrap();
    assert_eq!(
        &std::fs::read(&path).unwrap()[..1 << 20],
        &[0xa5; 1 << 20][..]
    );
    if f.is_direct() {
        let mine = a.adopt("files-mine", vec![0u8; N as usize]).unwrap();
        let m = a.register(&mine).unwrap();
        let e = a
            .read_file(&[f.all()], &[m.all()])
            .unwrap()
            .wait(T)
            .unwrap_err()
            .to_string();
        eprintln!("an unaligned Vec: {e}");
        assert!(e.contains("`buffer`") && e.contains("aligned to"), "{e}");
        drop(mine.reclaim(Duration::from_secs(10)).unwrap());
    }
    // The udmabuf freed under a read of the whole file.
    let t = a.read_file(&[f.all()], &[h.all()]).unwrap();
    host.free(Duration::from_secs(10)).unwrap();
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local, ..
        }) => {}
        // On a fast disk the read may end before the free reaches it.
        Ok(n) => assert_eq!(n, N),
        Err(e) => panic!("the read under the free: {e}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// CUDA memory and files, through this host's kernel: the CUDA bounce pipeline — O_DIRECT reads
/// with io_uring into page-aligned host memory registered with the copy engine
/// (`cuMemHostRegister`), each piece copied on by the copy engine while the next is read (two
/// pieces) — and back; then the GPU memory freed under a read ends it with the typed revoke.
/// Needs a CUDA driver (the qemu testbed runs it against its fake libcuda); without one it
/// says so and passes, unless `DMAPLANE_REQUIRE_CUDA=1`.
#[test]
fn files_are_read_into_cuda_memory_through_a_registered_bounce() {
    let Some(a) = agent("cuda-files") else { return };
    const N: u64 = 8 << 20;
    let w = match a.alloc_cuda("cuda-weights", 0, N) {
        Ok(w) => w,
        Err(e) => {
            assert!(
                std::env::var("DMAPLANE_REQUIRE_CUDA").as_deref() != Ok("1"),
                "DMAPLANE_REQUIRE_CUDA=1 but no CUDA memory: {e}"
            );
            eprintln!("skipped: no CUDA: {e}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("dmaplane-verbs-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shard.bin");
    let data = pattern(N);
    std::fs::write(&path, &data).unwrap();
    let f = a
        .register_file(
            &dmaplane::FileSpec::new(&path)
                .writable()
                .buffered_fallback(),
        )
        .unwrap();
    let r = a.register(&w).unwrap();
    let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
    assert_eq!(t.wait(T).unwrap(), N);
    eprintln!("paths: {:?}", t.paths());
    assert!(t.paths()[0].is_bounced(), "{:?}", t.paths());
    let mut got = vec![0u8; N as usize];
    w.read(0, &mut got).unwrap();
    assert!(got == data, "the file's bytes did not land in CUDA memory");
    w.write(0, &[0x3c; 1 << 20]).unwrap();
    a.write_file(
        &[r.desc(0, 1 << 20).unwrap()],
        &[f.desc(0, 1 << 20).unwrap()],
    )
    .unwrap()
    .wait(T)
    .unwrap();
    assert_eq!(
        &std::fs::read(&path).unwrap()[..1 << 20],
        &[0x3c; 1 << 20][..]
    );
    let t = a.read_file(&[f.all()], &[r.all()]).unwrap();
    w.free(Duration::from_secs(10)).unwrap();
    match t.wait(T) {
        Err(Error::Revoked {
            side: Side::Local, ..
        }) => {}
        Ok(n) => assert_eq!(n, N),
        Err(e) => panic!("the read under the free: {e}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
