//! `dmaplane agent serve|write|read` as separate processes on loopback, on TCP NICs: verified
//! bytes both ways, a notification, a clean leave on Ctrl-C, and a server killed (`kill -9`)
//! during a transfer, which the client reports as the peer lost — nothing hangs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: String,
    out: std::sync::mpsc::Receiver<String>,
}

fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(["agent", "serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first.strip_prefix("LISTEN ").expect(&first).to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Server {
        child,
        addr,
        out: rx,
    }
}

fn client(args: &[&str]) -> (bool, String, String, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(["--json", "agent"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed(),
    )
}

fn interrupt(c: &Child) {
    let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
}

#[test]
fn write_and_read_between_two_processes_are_verified_and_ctrl_c_leaves_cleanly() {
    let mut s = serve(&["--fill", "--mem", "pool=8m", "--mem", "spare=1m"]);
    // The filled pattern, READ and checked by the client.
    let (ok, out, err, _) = client(&["read", "--connect", &s.addr, "--region", "pool", "--verify"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["verified"], true, "{out}");
    assert_eq!(v["bytes"], 8 << 20);
    // Both on this host: every request through views of the server's memory.
    assert_eq!(v["path"], "shared-memory", "{out}");
    // The same over the socket when the client asks for it.
    let (ok, out, err, _) = client(&[
        "read",
        "--connect",
        &s.addr,
        "--region",
        "pool",
        "--verify",
        "--no-shm",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["verified"].clone(), v["path"].clone()),
        (true.into(), "socket".into()),
        "{out}"
    );
    // A WRITE with a notification, read back and compared by the client.
    let (ok, out, err, _) = client(&[
        "write",
        "--connect",
        &s.addr,
        "--region",
        "2",
        "--notify",
        "hello",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["verified"].clone(), v["region"].clone()),
        (true.into(), 2.into())
    );
    let due = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while Instant::now() < due && !seen {
        if let Ok(l) = s.out.recv_timeout(Duration::from_millis(100)) {
            seen = l.contains("notification from client") && l.contains("hello");
        }
    }
    assert!(seen, "the server never printed the notification");
    // A region that is not there is named with the ones that are.
    let (ok, _, err, _) = client(&["read", "--connect", &s.addr, "--region", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("has no region nope") && err.contains("pool"),
        "{err}"
    );
    // Ctrl-C: deregisters and leaves, exit 0.
    interrupt(&s.child);
    let st = s.child.wait().unwrap();
    let mut e = String::new();
    s.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut e)
        .unwrap();
    assert!(st.success(), "{st}: {e}");
    assert!(
        e.contains("deregistering 2 region(s)") && e.contains("bye"),
        "{e}"
    );
}

/// A server killed (`kill -9`) during a READ of 1 GiB, on the socket path: the client reports
/// the peer lost within its stall timeout.
#[test]
fn a_server_killed_during_a_transfer_fails_the_client_with_the_peer_lost_and_nothing_hangs() {
    killed_during_a_read(false);
}

/// The same through shared memory: the server is killed once the client maps its memory (the
/// READ has begun), and the client still reports the peer lost — its views go with the lane,
/// and what is left of the READ meets the dead socket.
#[test]
fn a_server_killed_during_a_read_through_shared_memory_is_the_peer_lost_too() {
    killed_during_a_read(true);
}

fn killed_during_a_read(shm: bool) {
    let mut s = serve(&["--mem", "pool=1g"]);
    let mut args = vec![
        "--json",
        "agent",
        "read",
        "--connect",
        &s.addr,
        "--stall-s",
        "5",
        "--chunk",
        "1m",
    ];
    if !shm {
        args.push("--no-shm");
    }
    let c = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if shm {
        // The READ has begun once the client maps the server's memory (its view).
        let maps = format!("/proc/{}/maps", c.id());
        let due = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&maps)
            .unwrap_or_default()
            .contains("/memfd:dmaplane:pool ")
        {
            assert!(
                Instant::now() < due,
                "the client never mapped the server's memory"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    } else {
        // Let the READ start.
        std::thread::sleep(Duration::from_millis(400));
    }
    s.child.kill().unwrap();
    let killed = Instant::now();
    s.child.wait().unwrap();
    let out = c.wait_with_output().unwrap();
    let after = killed.elapsed();
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "the READ of 1 GiB finished before the kill: {stdout}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("peer serve was lost"),
        "not reported as the peer lost: {err}"
    );
    assert!(
        after < Duration::from_secs(5),
        "the client took {after:?} to give up"
    );
    eprintln!("client ended {after:?} after the kill: {last}");
}

/// A published file: its bytes READ by a client in another process are the file's; a WRITE into
/// it (published read-only) is refused, saying so.
#[test]
fn a_published_file_is_read_by_another_process_and_not_written() {
    let dir = std::env::temp_dir().join(format!("dmaplane-agent-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shard");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let mut s = serve(&["--file", file.to_str().unwrap()]);
    let out = dir.join("read-back");
    let (ok, _, err, _) = client(&["read", "--connect", &s.addr, "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the file's bytes differ"
    );
    let (ok, _, err, _) = client(&["write", "--connect", &s.addr, "--size", "4096"]);
    assert!(!ok, "a WRITE into a read-only published file succeeded");
    eprintln!(
        "the WRITE was refused: {}",
        err.lines().last().unwrap_or_default()
    );
    interrupt(&s.child);
    assert!(s.child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// CUDA memory on TCP agents: the NIC reaches only this process's memory, so the owner stages it
/// through host memory; freed under a second process's WRITEs (the stress), every block whole,
/// nothing after the ack. Runs against the fake driver built from `gpu/src/cuda/fake_libcuda.c`
/// with the system C compiler (skipped without one, except under CI).
#[test]
fn cuda_memory_on_tcp_agents_is_staged_and_freed_cleanly_under_writes() {
    let dir = std::env::temp_dir().join(format!("dmaplane-tcp-fakecuda-{}", std::process::id()));
    if let Err(why) = dmaplane_tests::build_fake_libcuda(&dir) {
        assert!(std::env::var_os("CI").is_none(), "CI is set and {why}");
        eprintln!("skipping: {why}");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .env("LD_LIBRARY_PATH", &dir)
        .args([
            "--json",
            "stress",
            "revoke",
            "--backend",
            "tcp",
            "--exporter",
            "cuda",
        ])
        .args(["--qps", "4", "--size", "65536", "--revokes", "20"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (
            v["lost"].clone(),
            v["corrupt"].clone(),
            v["post_ack_accesses"].clone()
        ),
        (0.into(), 0.into(), 0.into()),
        "{stdout}"
    );
    assert_eq!(v["revokes"], 20, "{stdout}");
    assert!(
        v["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap_or_default().contains("Staged")),
        "the owner's registration was not staged: {stdout}"
    );
}
