//! The `dmaplane` binary, end to end.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn dmaplane(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn topologies() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topologies");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn topo_json_for_every_shipped_file_has_a_symmetric_route_matrix() {
    for f in topologies() {
        let (ok, out, err) = dmaplane(&["topo", "--json", "--topology", f.to_str().unwrap()]);
        assert!(ok, "{}: {err}", f.display());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let routes = v["routes"].as_array().unwrap();
        assert!(!routes.is_empty());
        for r in routes {
            let (a, b, route) = (&r["a"], &r["b"], &r["route"]);
            let back = routes.iter().find(|x| &x["a"] == b && &x["b"] == a);
            if let Some(back) = back {
                assert_eq!(&back["route"], route);
            }
        }
    }
}

#[test]
fn builtin_testbed_has_every_route() {
    let (ok, out, err) = dmaplane(&["topo", "--json"]);
    assert!(ok, "{err}");
    for route in ["bus-addr", "thru-host-bridge", "not-supported"] {
        assert!(out.contains(route), "built-in testbed lacks {route}");
    }
    let (ok, human, _) = dmaplane(&["topo"]);
    assert!(ok);
    assert!(human.contains("bus-addr"));
}

#[test]
fn topo_rejects_a_broken_file_naming_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("dmaplane-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("broken.toml");
    std::fs::write(
        &f,
        "[[host_bridge]]\nid = \"hb0\"\nnuma = 0\np2p_allowed = true\n\n[[root_port]]\nid = \"rp0\"\nparent = \"hb9\"\n",
    )
    .unwrap();
    let (ok, _, err) = dmaplane(&["topo", "--topology", f.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("broken.toml:8"), "{err}");
    assert!(err.contains("parent"), "{err}");
    assert!(err.contains("hb9"), "{err}");
    let (ok, _, err) = dmaplane(&["topo", "--topology", "/nonexistent/x.toml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn bench_sgl_json_has_the_promised_fields() {
    let (ok, out, err) = dmaplane(&[
        "bench",
        "sgl",
        "--json",
        "--iters",
        "1",
        "--scenario",
        "bar-1g-contiguous",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = &v.as_array().unwrap()[0];
    for k in [
        "scenario",
        "addrlist_ns",
        "sgtable_ns",
        "addrlist_bytes",
        "sgtable_bytes",
        "addrlist_entries",
        "sgtable_entries",
    ] {
        assert!(!row[k].is_null(), "missing {k}: {row}");
    }
    assert_eq!(row["addrlist_entries"], 1);
    let (ok, _, err) = dmaplane(&["bench", "sgl", "--scenario", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("\"nope\"") && err.contains("bar-1g-contiguous"),
        "{err}"
    );
}

#[test]
fn stress_revoke_sim_loses_nothing_and_nothing_lands_after_the_ack() {
    for quiesce in ["flush", "drain"] {
        let (ok, out, err) = dmaplane(&[
            "stress",
            "revoke",
            "--backend",
            "sim",
            "--qps",
            "4",
            "--depth",
            "16",
            "--revokes",
            "10",
            "--seconds",
            "0.2",
            "--quiesce",
            quiesce,
            "--json",
        ]);
        assert!(ok, "{quiesce}: {out}\n{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["lost"], 0, "{out}");
        assert_eq!(v["post_ack_accesses"], 0, "{out}");
        assert_eq!(v["corrupt"], 0, "{out}");
        assert_eq!(v["revokes"], 10, "{out}");
        assert!(v["bytes_verified"].as_u64().unwrap() > 0, "{out}");
        let p = v["posted"].as_u64().unwrap();
        let done = ["completed_ok", "flushed", "failed"]
            .iter()
            .map(|k| v[k].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(p, done, "{out}");
    }
}

#[test]
fn stress_rejects_bad_arguments_naming_the_field() {
    let (ok, _, err) = dmaplane(&["stress", "revoke", "--qps", "0"]);
    assert!(!ok);
    assert!(err.contains("--qps"), "{err}");
    let (ok, _, err) = dmaplane(&["stress", "revoke", "--backend", "verbs", "--revokes", "1"]);
    assert!(!ok);
    assert!(err.contains("verbs"), "{err}");
}

#[test]
fn demo_moves_gpu_memory_over_every_route_through_a_free() {
    let (ok, out, err) = dmaplane(&["demo", "--json", "--size", "4194304", "--chunk", "262144"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["post_ack_accesses"], 0);
    let flows = v["flows"].as_array().unwrap();
    let routes: Vec<_> = flows
        .iter()
        .map(|f| f["src"]["route"].as_str().unwrap())
        .collect();
    assert_eq!(routes, ["bus-addr", "thru-host-bridge", "not-supported"]);
    let paths: Vec<_> = flows
        .iter()
        .map(|f| f["src"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["direct", "direct", "staged"]);
    for f in flows {
        assert_eq!(f["bytes_verified"], 4194304, "{f}");
        assert_eq!(
            f["completed"], f["posted"],
            "every WRITE completes exactly once: {f}"
        );
        assert_eq!(f["post_ack_accesses"], 0, "{f}");
    }
    let free = &flows[0]["free"];
    assert!(free["after_completions"].as_u64().unwrap() >= 4, "{free}");
    assert_eq!(free["importers_quiesced"], 1);
    let e = free["transfer_error"].as_str().unwrap();
    assert!(e.contains("revoked") && e.contains("gpu0-gpu2-dst"), "{e}");
    assert_eq!(v["oracle"]["dma_after_ack"], 0);
    assert!(v["oracle"]["acks"].as_u64().unwrap() >= 1);
}

#[test]
fn demo_prints_a_human_summary() {
    let (ok, out, err) = dmaplane(&["demo", "--size", "1048576", "--chunk", "65536"]);
    assert!(ok, "{err}");
    assert!(out.contains("every byte verified"), "{out}");
    for want in [
        "bus-addr",
        "thru-host-bridge",
        "not-supported",
        "direct, zero-copy",
        "staged through",
        "GPU free",
        "lost = 0, post_ack_accesses = 0",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[test]
fn demo_refuses_a_size_that_is_not_whole_chunks() {
    let (ok, _, err) = dmaplane(&["demo", "--size", "1048576", "--chunk", "3000"]);
    assert!(!ok);
    assert!(
        err.contains("--size 1048576") && err.contains("--chunk 3000"),
        "{err}"
    );
    let (ok, _, err) = dmaplane(&[
        "demo",
        "--size",
        "65536",
        "--chunk",
        "4096",
        "--free-after",
        "16",
    ]);
    assert!(!ok);
    assert!(err.contains("--free-after 16"), "{err}");
}

#[test]
fn bench_rdma_refuses_a_zero_size() {
    let (ok, _, err) = dmaplane(&["bench", "rdma", "--sizes", "64,0"]);
    assert!(!ok);
    assert!(err.contains("--sizes") && err.contains('0'), "{err}");
}

#[test]
fn load_verifies_every_byte_and_handles_a_free_mid_load() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-load");
    let (ok, out, err) = dmaplane(&[
        "load",
        "--shards",
        "4",
        "--shard-size",
        "4194304",
        "--dir",
        dir.to_str().unwrap(),
        "--free-at",
        "2",
        "--json",
    ]);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verified_bytes"], 16 << 20, "{out}");
    assert!(v["stages"]["ratio"].as_f64().unwrap() > 0.0, "{out}");
    let f = &v["free"];
    assert_eq!(f["lost"], 0, "{out}");
    assert_eq!(f["oracle_clean"], true, "{out}");
    assert!(f["changed_after_ack"].is_null(), "{out}");
    assert!(
        f["error"].as_str().unwrap().contains("remote region"),
        "{out}"
    );
    // Shard 2's WRITE may finish before the free takes it; none after it starts.
    assert!(
        f["shards_landed"].as_u64().unwrap() <= 3,
        "shards started after the free landed: {out}"
    );
    // The created shards are removed.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let (ok, _, err) = dmaplane(&[
        "load",
        "--shards",
        "2",
        "--shard-size",
        "4096",
        "--free-at",
        "5",
    ]);
    assert!(!ok && err.contains("--free-at 5"), "{err}");
}
