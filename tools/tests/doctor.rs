//! `dmaplane doctor`, end to end. What this machine has is not assumed: only the schema, that
//! every component is checked, and that every row that is not ok says why and what to do.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const STATUSES: [&str; 4] = ["ok", "missing", "error", "unsupported"];
const COMPONENTS: [&str; 6] = ["rdma", "udmabuf", "dma-heap", "io_uring", "storage", "cuda"];

fn dmaplane(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn json_has_a_row_per_component_and_every_problem_has_a_fix() {
    let (code, out, err) = dmaplane(&["doctor", "--json"]);
    assert_eq!(code, Some(0), "doctor reports, it does not fail: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kernel = v["kernel"].as_str().unwrap();
    assert!(!kernel.is_empty());
    let checks = v["checks"].as_array().unwrap();
    for component in COMPONENTS {
        assert!(
            checks.iter().any(|c| c["component"] == component),
            "no row for {component}: {out}"
        );
    }
    for c in checks {
        let component = c["component"].as_str().unwrap();
        assert!(
            COMPONENTS.contains(&component) || ["gpu", "p2p"].contains(&component),
            "{c}"
        );
        assert!(!c["name"].as_str().unwrap().is_empty(), "{c}");
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
        let status = c["status"].as_str().unwrap();
        assert!(STATUSES.contains(&status), "{c}");
        if status == "ok" {
            assert!(c["fix"].is_null(), "{c}");
        } else {
            let fix = c["fix"].as_str().unwrap_or_default();
            assert!(!fix.trim().is_empty(), "a {status} row without a fix: {c}");
        }
    }
}

#[test]
fn the_storage_rows_say_o_direct_the_ring_and_the_memlock_limit() {
    let (_, out, _) = dmaplane(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows: Vec<&serde_json::Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["component"] == "storage")
        .collect();
    let names: Vec<&str> = rows.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["O_DIRECT", "ring", "RLIMIT_MEMLOCK"], "{out}");
    let memlock = rows[2]["detail"].as_str().unwrap();
    assert!(
        memlock.contains("soft") && memlock.contains("hard"),
        "{memlock}"
    );
    // Where the working directory takes O_DIRECT the row gives its alignment.
    if rows[0]["status"] == "ok" {
        let d = rows[0]["detail"].as_str().unwrap();
        assert!(d.contains("aligned to") && d.contains(" B"), "{d}");
    }
}

#[test]
fn human_output_has_the_kernel_and_one_aligned_line_per_row() {
    let (code, out, err) = dmaplane(&["doctor"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, json, _) = dmaplane(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v["checks"].as_array().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("kernel  "), "{out}");
    let header = lines
        .iter()
        .position(|l| l.starts_with("COMPONENT"))
        .unwrap();
    let body = &lines[header + 1..];
    assert_eq!(body.len(), rows.len(), "one line a row:\n{out}");
    let status_col = lines[header].find("STATUS").unwrap();
    for (line, row) in body.iter().zip(rows) {
        let status = row["status"].as_str().unwrap();
        assert!(
            line.starts_with(row["component"].as_str().unwrap()),
            "{line}"
        );
        assert_eq!(
            line.get(status_col..status_col + status.len()),
            Some(status),
            "{line}"
        );
        assert_eq!(
            line.contains("; fix: "),
            status != "ok",
            "fix shown exactly when not ok: {line}"
        );
    }
}

#[test]
fn a_malformed_flag_is_a_usage_error() {
    let (code, _, err) = dmaplane(&["doctor", "--no-such-flag"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}

/// Built without `verbs`, the RDMA row says so and how to rebuild.
#[cfg(not(feature = "verbs"))]
#[test]
fn without_verbs_the_rdma_row_says_how_to_rebuild() {
    let (_, out, _) = dmaplane(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rdma: Vec<_> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["component"] == "rdma")
        .collect();
    assert_eq!(rdma.len(), 1, "{out}");
    assert_eq!(rdma[0]["status"], "unsupported");
    assert!(
        rdma[0]["fix"]
            .as_str()
            .unwrap()
            .contains("--features verbs"),
        "{out}"
    );
}

#[test]
fn without_cuda_the_gpu_part_is_one_line() {
    let (code, out, err) = dmaplane(&["doctor"]);
    assert_eq!(code, Some(0), "{err}");
    let cuda: Vec<&str> = out.lines().filter(|l| l.starts_with("cuda")).collect();
    assert_eq!(cuda.len(), 1, "{out}");
    if cuda[0].contains("missing") {
        assert!(cuda[0].contains("not available"), "{}", cuda[0]);
        assert!(
            !out.lines()
                .any(|l| l.starts_with("gpu ") || l.starts_with("p2p ")),
            "{out}"
        );
    }
}
