#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------------------------
// An independent route oracle: works on the raw TOML value (not the loader's model), collects
// the full ancestor SET of each device and applies the kernel's rule to the set intersection.

struct Oracle {
    /// node id -> "host_bridge" | "root_port" | "switch" | device kind
    kind: BTreeMap<String, String>,
    parent: BTreeMap<String, String>,
    p2p: BTreeMap<String, bool>,
    devices: Vec<String>,
}

impl Oracle {
    fn new(text: &str) -> Oracle {
        let v: toml::Table = toml::from_str(text).unwrap();
        let mut o = Oracle {
            kind: BTreeMap::new(),
            parent: BTreeMap::new(),
            p2p: BTreeMap::new(),
            devices: Vec::new(),
        };
        for table in ["host_bridge", "root_port", "switch", "device"] {
            let Some(items) = v.get(table).and_then(|t| t.as_array()) else {
                continue;
            };
            for item in items {
                let id = item["id"].as_str().unwrap().to_string();
                let kind = if table == "device" {
                    o.devices.push(id.clone());
                    item["kind"].as_str().unwrap().to_string()
                } else {
                    table.to_string()
                };
                if let Some(p) = item.get("parent") {
                    o.parent.insert(id.clone(), p.as_str().unwrap().to_string());
                }
                if table == "host_bridge" {
                    let allowed = item.get("p2p_allowed").and_then(|b| b.as_bool());
                    o.p2p.insert(id.clone(), allowed.unwrap_or(false));
                }
                o.kind.insert(id, kind);
            }
        }
        o
    }

    fn ancestors(&self, id: &str) -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        let mut cur = id;
        while let Some(p) = self.parent.get(cur) {
            assert!(set.insert(p.clone()), "cycle at {p}");
            cur = p;
        }
        set
    }

    fn route(&self, a: &str, b: &str) -> Route {
        if a == b {
            return Route::Local;
        }
        if self.kind[a] == "host-memory" || self.kind[b] == "host-memory" {
            return Route::Local;
        }
        let common: BTreeSet<String> = self
            .ancestors(a)
            .intersection(&self.ancestors(b))
            .cloned()
            .collect();
        if common
            .iter()
            .any(|n| self.kind[n] == "switch" || self.kind[n] == "root_port")
        {
            return Route::BusAddr;
        }
        match common.iter().find(|n| self.kind[*n] == "host_bridge") {
            Some(hb) if self.p2p[hb] => Route::ThruHostBridge,
            _ => Route::NotSupported,
        }
    }
}

/// Checks every ordered pair against the oracle, symmetry, and the unordered matrix.
fn check_against_oracle(text: &str, topo: &Topology) {
    let o = Oracle::new(text);
    let ids: Vec<&str> = topo.devices().iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        o.devices.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for a in &ids {
        for b in &ids {
            let got = topo.route_by_id(a, b).unwrap();
            assert_eq!(got, o.route(a, b), "{}: route {a} -> {b}", topo.source());
            assert_eq!(got, topo.route_by_id(b, a).unwrap(), "symmetry {a} {b}");
        }
    }
    let m = topo.route_matrix();
    let n = ids.len();
    assert_eq!(m.len(), n * n.saturating_sub(1) / 2);
    for (a, b, r) in m {
        assert_ne!(a, b);
        assert_eq!(r, o.route(a, b));
    }
}

fn topologies_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../topologies"))
}

fn shipped_files() -> Vec<(PathBuf, String)> {
    let mut v: Vec<(PathBuf, String)> = std::fs::read_dir(topologies_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_pair_of_every_shipped_file_matches_the_oracle() {
    let files = shipped_files();
    assert!(files.len() >= 3, "topologies/ has the shipped files");
    let mut seen = BTreeSet::new();
    for (path, text) in &files {
        let topo = Topology::from_file(path).unwrap();
        check_against_oracle(text, &topo);
        for (_, _, r) in topo.route_matrix() {
            seen.insert(r);
        }
    }
    for r in [
        Route::Local,
        Route::BusAddr,
        Route::ThruHostBridge,
        Route::NotSupported,
    ] {
        assert!(seen.contains(&r), "no shipped topology shows {r}");
    }
}

#[test]
fn testbed_routes_by_hand() {
    let t = builtin::testbed();
    let r = |a: &str, b: &str| t.route_by_id(a, b).unwrap();
    // Same switch.
    assert_eq!(r("gpu0", "nic0"), Route::BusAddr);
    // Below one upstream switch port, different downstream ports.
    assert_eq!(r("gpu2", "nic1"), Route::BusAddr);
    // Different root ports of one allow-listed host bridge.
    assert_eq!(r("gpu1", "nic0"), Route::ThruHostBridge);
    assert_eq!(r("gpu0", "gpu1"), Route::ThruHostBridge);
    assert_eq!(r("nvme0", "gpu0"), Route::ThruHostBridge);
    assert_eq!(r("gpu2", "nic2"), Route::ThruHostBridge);
    // Across sockets.
    assert_eq!(r("gpu0", "gpu2"), Route::NotSupported);
    assert_eq!(r("nic0", "nic1"), Route::NotSupported);
    assert_eq!(r("nvme0", "nic2"), Route::NotSupported);
    // Host memory: ordinary DMA, from either socket.
    assert_eq!(r("gpu0", "mem0"), Route::Local);
    assert_eq!(r("gpu0", "mem1"), Route::Local);
    assert_eq!(r("mem1", "nic0"), Route::Local);
    assert_eq!(r("mem0", "mem1"), Route::Local);
    // Same device.
    for d in t.devices() {
        assert_eq!(r(&d.id, &d.id), Route::Local);
    }
}

#[test]
fn other_shipped_files_by_hand() {
    let t = builtin::shipped("no-p2p-bridge").unwrap().unwrap();
    let r = |a: &str, b: &str| t.route_by_id(a, b).unwrap();
    assert_eq!(r("gpu0", "nic0"), Route::NotSupported);
    assert_eq!(r("gpu1", "nic0"), Route::NotSupported);
    assert_eq!(r("nvme0", "gpu0"), Route::NotSupported);
    assert_eq!(r("gpu1", "nic1"), Route::BusAddr);
    assert_eq!(r("gpu0", "mem0"), Route::Local);

    let t = builtin::shipped("two-socket").unwrap().unwrap();
    let r = |a: &str, b: &str| t.route_by_id(a, b).unwrap();
    assert_eq!(r("gpu0", "nic0"), Route::BusAddr);
    assert_eq!(r("gpu1", "nic1"), Route::BusAddr);
    assert_eq!(r("gpu0", "nic1"), Route::NotSupported);
    assert_eq!(r("gpu0", "gpu1"), Route::NotSupported);

    let t = builtin::shipped("dgx-like").unwrap().unwrap();
    let r = |a: &str, b: &str| t.route_by_id(a, b).unwrap();
    assert_eq!(r("gpu0", "nic0"), Route::BusAddr);
    assert_eq!(r("gpu0", "gpu1"), Route::BusAddr);
    assert_eq!(r("gpu0", "gpu2"), Route::ThruHostBridge);
    assert_eq!(r("gpu0", "gpu7"), Route::NotSupported);
    assert_eq!(t.devices_of_kind(DeviceKind::Gpu).count(), 8);
}

#[test]
fn helpers() {
    let t = builtin::testbed();
    assert_eq!(t.bar_size("gpu0", 1).unwrap(), 64 << 30);
    let e = t.bar_size("gpu0", 2).unwrap_err().to_string();
    assert!(
        e.contains("gpu0") && e.contains("BAR 2") && e.contains("1 (64 GiB)"),
        "{e}"
    );
    assert_eq!(t.numa_of("gpu2").unwrap(), 1);
    assert_eq!(t.numa_of("mem0").unwrap(), 0);
    assert_eq!(t.devices_of_kind(DeviceKind::Nic).count(), 3);
    assert_eq!(t.devices_of_kind(DeviceKind::HostMemory).count(), 2);
    assert_eq!(t.host_memory_for_numa(1).unwrap().id, "mem1");
    let e = t.device("gpu9").unwrap_err().to_string();
    assert!(e.contains("\"gpu9\"") && e.contains("gpu0, nic0"), "{e}");
    let e = t.route_by_id("gpu0", "nope").unwrap_err().to_string();
    assert!(e.contains("\"nope\""), "{e}");
    let g = t.device_index("gpu2").unwrap();
    assert_eq!(t.host_bridge_of(g).unwrap().id, "hb1");
    let hb0 = t.node("hb0").unwrap();
    let kids: Vec<&str> = t
        .children(hb0)
        .into_iter()
        .map(|n| t.node_id(n).unwrap())
        .collect();
    assert_eq!(kids, ["rp0", "rp1", "rp2", "mem0"]);
    // A foreign, out-of-range id never panics and never claims a P2P path.
    assert_eq!(t.route(DeviceIndex(999), g), Route::NotSupported);
}

#[test]
fn serializes_for_dumps() {
    let v = serde_json::to_value(builtin::testbed()).unwrap();
    assert_eq!(v["host_bridges"][1]["id"], "hb1");
    assert_eq!(v["devices"][2]["kind"], "gpu");
    assert_eq!(v["devices"][2]["bars"][1]["size"], 64u64 << 30);
    assert_eq!(v["devices"][0]["kind"], "host-memory");
    assert!(v["devices"][2].get("size").is_none());
}

#[test]
fn explicit_numa_is_kept() {
    let text = r#"
[[host_bridge]]
id = "hb0"
numa = 0
[[root_port]]
id = "rp0"
parent = "hb0"
[[device]]
id = "nic0"
kind = "nic"
parent = "rp0"
numa = 3
pci = "0000:3B:00.1"
"#;
    let t = Topology::from_toml_str(text, "x.toml").unwrap();
    assert_eq!(t.numa_of("nic0").unwrap(), 3);
    assert_eq!(
        t.device("nic0").unwrap().pci.as_deref(),
        Some("0000:3B:00.1")
    );
    let back = Topology::from_toml_str(&t.to_toml(), "dump").unwrap();
    assert_eq!(back.devices(), t.devices());
    // No allow-list entry: default false.
    assert!(!t.host_bridges()[0].p2p_allowed);
}

#[test]
fn to_toml_round_trips() {
    for (name, text) in builtin::SHIPPED {
        let t = Topology::from_toml_str(text, name).unwrap();
        let dumped = t.to_toml();
        let back = Topology::from_toml_str(&dumped, name).unwrap();
        assert_eq!(t.devices(), back.devices(), "{name}:\n{dumped}");
        assert_eq!(t.host_bridges(), back.host_bridges());
        assert_eq!(t.route_matrix(), back.route_matrix());
    }
}

#[test]
fn builder_matches_loader() {
    let mut b = Topology::builder("code");
    b.host_bridge("hb0", 0, true)
        .root_port("rp0", "hb0")
        .root_port("rp1", "hb0")
        .switch("sw0", "rp0")
        .device(DeviceSpec::new("gpu0", DeviceKind::Gpu, "sw0").with_bar(1, 1 << 30))
        .device(DeviceSpec::new("nic0", DeviceKind::Nic, "sw0"))
        .device(DeviceSpec::new("nic1", DeviceKind::Nic, "rp1"))
        .device(DeviceSpec::new("mem0", DeviceKind::HostMemory, "hb0").with_size(1 << 30));
    let t = b.build().unwrap();
    assert_eq!(t.route_by_id("gpu0", "nic0").unwrap(), Route::BusAddr);
    assert_eq!(
        t.route_by_id("gpu0", "nic1").unwrap(),
        Route::ThruHostBridge
    );
    let e = Topology::builder("code")
        .host_bridge("hb0", 0, true)
        .device(DeviceSpec::new("gpu0", DeviceKind::Gpu, "hb0"))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("code: "), "{e}");
    let e = Topology::builder("code")
        .host_bridge("hb0", 0, true)
        .root_port("rp0", "hb0")
        .device(DeviceSpec::new("gpu0", DeviceKind::Gpu, "rp0").with_bar(1, 3 << 20))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("powers of two"), "{e}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("64GiB"), Ok(64 << 30));
    assert_eq!(parse_size("256MiB"), Ok(256 << 20));
    assert_eq!(parse_size("4KiB"), Ok(4096));
    assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    assert_eq!(parse_size("1024"), Ok(1024));
    assert_eq!(parse_size("1_024 B"), Ok(1024));
    assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
    assert_eq!(parse_size("2 kb"), Ok(2000));
    assert_eq!(parse_size(" 8 gib "), Ok(8 << 30));
    for bad in [
        "64GB?",
        "0",
        "0GiB",
        "12XiB",
        "",
        "GiB",
        "1.5GiB",
        "-1",
        "99999999999TiB",
        "1e9",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?} must be rejected");
    }
    assert!(parse_size("12XiB").unwrap_err().contains("\"XiB\""));
    assert_eq!(format_size(64 << 30), "64 GiB");
    assert_eq!(format_size(16 << 10), "16 KiB");
    assert_eq!(format_size(1000), "1000 B");
    assert_eq!(format_size(3 << 29), "1.5 GiB");
}

#[test]
fn line_col_never_panics() {
    let text = "ab\ncdé\nf";
    assert_eq!(load::line_col(text, 0), (1, 1));
    assert_eq!(load::line_col(text, 3), (2, 1));
    assert_eq!(load::line_col(text, 7), (2, 4)); // inside 'é': lossy, still a column
    assert_eq!(load::line_col(text, 1000), (3, 2));
}

// ---------------------------------------------------------------------------------------------
// Errors: every kind names the line, the field and the value.

const BASE: &str = r#"[[host_bridge]]
id = "hb0"
numa = 0
p2p_allowed = true

[[root_port]]
id = "rp0"
parent = "hb0"

[[root_port]]
id = "rp1"
parent = "hb0"

[[switch]]
id = "sw0"
parent = "rp0"
"#;

/// The loader's error for BASE + `extra`, and the 1-based line of `marker` in the whole text.
fn err_at(extra: &str, marker: &str) -> (String, usize) {
    let text = format!("{BASE}{extra}");
    let e = Topology::from_toml_str(&text, "topologies/x.toml")
        .expect_err("must be rejected")
        .to_string();
    let line = text
        .lines()
        .position(|l| l.contains(marker))
        .expect("marker present")
        + 1;
    if std::env::var_os("DMAPLANE_SHOW_ERRORS").is_some() {
        eprintln!("{e}");
    }
    (e, line)
}

fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "error {e:?} lacks {p:?}");
    }
}

#[test]
fn error_unknown_parent() {
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw9\"\n",
        "sw9",
    );
    assert_eq!(
        e,
        format!(
            "topologies/x.toml:{line}: device \"gpu0\" field parent: unknown parent \"sw9\" \
             (known switches and root ports: rp0, rp1, sw0)"
        )
    );
    let (e, line) = err_at("\n[[root_port]]\nid = \"rp9\"\nparent = \"hbX\"\n", "hbX");
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "parent",
            "\"hbX\"",
            "host bridges: hb0",
        ],
    );
}

#[test]
fn error_duplicate_id() {
    let (e, line) = err_at(
        "\n[[switch]]\nid = \"rp1\" # dup\nparent = \"rp0\"\n",
        "# dup",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field id",
            "\"rp1\"",
            "first defined at line 11, as a root port",
        ],
    );
}

#[test]
fn error_cycle() {
    let (e, line) = err_at(
        "\n[[switch]]\nid = \"swA\"\nparent = \"swB\" # a\n\n[[switch]]\nid = \"swB\"\nparent = \"swA\"\n",
        "# a",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field parent",
            "cycle among switches: swA -> swB -> swA",
        ],
    );
    let (e, line) = err_at(
        "\n[[switch]]\nid = \"self\"\nparent = \"self\"\n",
        "parent = \"self\"",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "switch \"self\" field parent",
            "cycle among switches: self -> self",
        ],
    );
}

#[test]
fn error_bad_size() {
    for (value, why) in [
        ("\"64GB?\"", "unknown unit"),
        ("\"0\"", "greater than zero"),
        ("0", "greater than zero"),
        ("\"12XiB\"", "unknown unit \"XiB\""),
        ("\"3MiB\"", "powers of two"),
        ("-4096", "negative"),
    ] {
        let (e, line) = err_at(
            &format!(
                "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\nbars = [{{ index = 1, size = {value} }}]\n"
            ),
            "bars",
        );
        let shown = value.trim_matches('"');
        assert_has(
            &e,
            &[
                &format!("x.toml:{line}:"),
                "device \"gpu0\" field bars[0].size",
                &format!("\"{shown}\""),
                why,
            ],
        );
    }
    let (e, line) = err_at(
        "\n[[device]]\nid = \"mem0\"\nkind = \"host-memory\"\nparent = \"hb0\"\nsize = \"1.5TiB\"\n",
        "1.5TiB",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field size",
            "\"1.5TiB\"",
            "fractional",
        ],
    );
}

#[test]
fn error_wrong_parent_kind() {
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"hb0\" # g\n",
        "# g",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "gpu device \"gpu0\" field parent",
            "\"hb0\" is a host bridge",
            "only host-memory",
        ],
    );
    let (e, line) = err_at(
        "\n[[device]]\nid = \"mem0\"\nkind = \"host-memory\"\nparent = \"sw0\" # m\n",
        "# m",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "host-memory device \"mem0\" field parent",
            "\"sw0\" is a switch",
        ],
    );
    let (e, line) = err_at(
        "\n[[root_port]]\nid = \"rp9\"\nparent = \"sw0\" # r\n",
        "# r",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "root port \"rp9\"",
            "\"sw0\" is a switch",
        ],
    );
    let (e, line) = err_at(
        "\n[[device]]\nid = \"nic0\"\nkind = \"nic\"\nparent = \"sw0\"\n[[switch]]\nid = \"sw5\"\nparent = \"nic0\" # d\n",
        "# d",
    );
    assert_has(&e, &[&format!("x.toml:{line}:"), "\"nic0\" is a device"]);
}

#[test]
fn error_unknown_kind() {
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpux\"\nparent = \"sw0\"\n",
        "gpux",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field kind",
            "\"gpux\"",
            "gpu, nic, nvme, host-memory",
        ],
    );
}

#[test]
fn error_unknown_field() {
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\ncolour = \"red\"\n",
        "colour",
    );
    assert_has(&e, &[&format!("x.toml:{line}:"), "colour"]);
    let (e, line) = err_at("\n[[devices]]\nid = \"gpu0\"\n", "[[devices]]");
    assert_has(&e, &[&format!("x.toml:{line}:"), "devices"]);
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\nbars = [{ index = 1, size = 4096, wc = true }]\n",
        "wc",
    );
    assert_has(&e, &[&format!("x.toml:{line}:"), "wc"]);
}

#[test]
fn error_syntax() {
    let (e, line) = err_at("\n[[device]\nid = \"gpu0\"\n", "[[device]");
    assert!(e.starts_with(&format!("topologies/x.toml:{line}:")), "{e}");
    let (e, line) = err_at("\n[[device]]\nid = gpu0\n", "id = gpu0");
    assert!(e.starts_with(&format!("topologies/x.toml:{line}:")), "{e}");
}

#[test]
fn error_other_values() {
    let (e, line) = err_at("\n[[host_bridge]]\nid = \"hb1\"\nnuma = -1\n", "numa = -1");
    assert_has(&e, &[&format!("x.toml:{line}:"), "field numa", "\"-1\""]);
    let (e, line) = err_at(
        "\n[[host_bridge]]\nid = \"hb1\"\nnuma = \"zero\"\n",
        "\"zero\"",
    );
    assert_has(&e, &[&format!("x.toml:{line}:"), "numa"]);
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\nbars = [{ index = 7, size = 4096 }]\n",
        "bars",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "bars[0].index",
            "\"7\"",
            "0 to 5",
        ],
    );
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\nbars = [{ index = 1, size = 4096 },\n  { index = 1, size = 8192 }]\n",
        "8192",
    );
    assert_has(&e, &[&format!("x.toml:{line}:"), "bars[1].index", "twice"]);
    let (e, line) = err_at(
        "\n[[device]]\nid = \"gpu0\"\nkind = \"gpu\"\nparent = \"sw0\"\nsize = \"1GiB\"\n",
        "size",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field size",
            "\"1GiB\"",
            "host-memory",
        ],
    );
    let (e, line) = err_at(
        "\n[[device]]\nid = \"mem0\"\nkind = \"host-memory\"\nparent = \"hb0\"\nbars = [{ index = 0, size = 4096 }]\n",
        "bars",
    );
    assert_has(
        &e,
        &[
            &format!("x.toml:{line}:"),
            "field bars",
            "\"[{ index = 0, size = 4096 }]\"",
            "no BARs",
        ],
    );
    let (e, line) = err_at("\n[[switch]]\nid = \"sw 1\"\nparent = \"rp0\"\n", "sw 1");
    assert_has(&e, &[&format!("x.toml:{line}:"), "field id", "\"sw 1\""]);
    let (e, line) = err_at(
        "\n[[device]]\nid = \"nic0\"\nkind = \"nic\"\nparent = \"sw0\"\npci = \"3b:00.0\"\n",
        "pci",
    );
    assert_has(
        &e,
        &[&format!("x.toml:{line}:"), "field pci", "\"3b:00.0\""],
    );
    let (e, _) = err_at("\n[[switch]]\nparent = \"rp0\"\n", "");
    assert_has(&e, &["in [[switch]]: missing field", "id"]);
}

#[test]
fn io_error_names_path() {
    let e = Topology::from_file("/nonexistent/t.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/t.toml"), "{e}");
}

#[test]
fn empty_file_is_an_empty_topology() {
    let t = Topology::from_toml_str("", "empty.toml").unwrap();
    assert!(t.devices().is_empty());
    assert!(t.route_matrix().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Property tests.

#[derive(Debug, Clone)]
struct Shape {
    p2p: Vec<bool>,
    /// root port i -> host bridge choice
    rps: Vec<usize>,
    /// switch i -> parent choice among root ports and switches 0..i
    sws: Vec<usize>,
    /// device -> (kind, parent choice)
    devs: Vec<(u8, usize)>,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop::collection::vec(any::<bool>(), 1..4),
        prop::collection::vec(any::<usize>(), 1..6),
        prop::collection::vec(any::<usize>(), 0..8),
        prop::collection::vec((0u8..4, any::<usize>()), 0..12),
    )
        .prop_map(|(p2p, rps, sws, devs)| Shape {
            p2p,
            rps,
            sws,
            devs,
        })
}

impl Shape {
    fn to_toml(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.p2p.iter().enumerate() {
            s += &format!("[[host_bridge]]\nid = \"hb{i}\"\nnuma = {i}\np2p_allowed = {p}\n");
        }
        for (i, c) in self.rps.iter().enumerate() {
            s += &format!(
                "[[root_port]]\nid = \"rp{i}\"\nparent = \"hb{}\"\n",
                c % self.p2p.len()
            );
        }
        let port = |c: usize, nsw: usize| {
            let n = self.rps.len() + nsw;
            let k = c % n;
            if k < self.rps.len() {
                format!("rp{k}")
            } else {
                format!("sw{}", k - self.rps.len())
            }
        };
        for (i, c) in self.sws.iter().enumerate() {
            s += &format!("[[switch]]\nid = \"sw{i}\"\nparent = \"{}\"\n", port(*c, i));
        }
        for (i, (k, c)) in self.devs.iter().enumerate() {
            let kind = DeviceKind::ALL[usize::from(*k)];
            let parent = if kind == DeviceKind::HostMemory {
                format!("hb{}", c % self.p2p.len())
            } else {
                port(*c, self.sws.len())
            };
            s += &format!("[[device]]\nid = \"d{i}\"\nkind = \"{kind}\"\nparent = \"{parent}\"\n");
            if kind != DeviceKind::HostMemory {
                s += &format!(
                    "bars = [{{ index = {}, size = \"{}MiB\" }}]\n",
                    c % 6,
                    1u64 << (c % 8)
                );
            }
        }
        s
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_trees_match_the_oracle(shape in shape()) {
        let text = shape.to_toml();
        let topo = Topology::from_toml_str(&text, "random.toml").unwrap();
        check_against_oracle(&text, &topo);
        let back = Topology::from_toml_str(&topo.to_toml(), "dump").unwrap();
        prop_assert_eq!(back.route_matrix(), topo.route_matrix());
    }

    #[test]
    fn garbage_never_panics(text in any::<String>()) {
        let _ = Topology::from_toml_str(&text, "garbage.toml");
    }

    #[test]
    fn toml_like_garbage_never_panics(text in "[\\[\\]a-z_=\" 0-9\n{},.#-]{0,200}") {
        let _ = Topology::from_toml_str(&text, "garbage.toml");
    }

    #[test]
    fn mutated_testbed_never_panics(pos in any::<usize>(), cut in 0usize..40, insert in "[\\[\\]a-z_=\" 0-9\n{},.#-]{0,12}") {
        let base = builtin::TESTBED_TOML;
        let mut at = pos % (base.len() + 1);
        while !base.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + cut).min(base.len());
        while !base.is_char_boundary(end) {
            end -= 1;
        }
        let text = format!("{}{}{}", &base[..at], insert, &base[end..]);
        if let Err(e) = Topology::from_toml_str(&text, "m.toml") {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("m.toml"), "{}", msg);
        }
    }
}
