//! `dmaplane topo`: show a topology as a tree and the P2P route between every pair of devices.

use std::fmt::Write as _;

use dmaplane_core::hints::Route;
use dmaplane_core::topology::{NodeRef, Topology, builtin, format_size};

#[derive(Debug, clap::Args)]
pub struct TopoArgs {
    /// TOML file; default: the built-in example testbed
    #[arg(long)]
    pub topology: Option<std::path::PathBuf>,
    /// Discover this machine with hwloc (feature `hwloc`)
    #[arg(long, conflicts_with = "topology")]
    pub discover: bool,
}

pub fn run(args: &TopoArgs, json: bool) -> anyhow::Result<()> {
    let topo = load(args)?;
    let out = if json {
        let mut s = serde_json::to_string_pretty(&to_json(&topo))?;
        s.push('\n');
        s
    } else {
        render(&topo)
    };
    print!("{out}");
    Ok(())
}

fn load(args: &TopoArgs) -> anyhow::Result<Topology> {
    if args.discover {
        return discover();
    }
    Ok(match &args.topology {
        Some(path) => Topology::from_file(path)?,
        None => builtin::testbed(),
    })
}

#[cfg(feature = "hwloc")]
fn discover() -> anyhow::Result<Topology> {
    Ok(dmaplane_core::topology::discover::discover()?)
}

#[cfg(not(feature = "hwloc"))]
fn discover() -> anyhow::Result<Topology> {
    anyhow::bail!(
        "this dmaplane binary was built without the `hwloc` feature; rebuild with: \
         cargo run --release --features hwloc -- topo --discover"
    )
}

/// Short route names for the matrix; the legend printed under it spells them out.
fn short(route: Route) -> &'static str {
    match route {
        Route::Local => "local",
        Route::BusAddr => "bus",
        Route::ThruHostBridge => "thru-hb",
        Route::NotSupported => "none",
    }
}

/// One line describing a node (without the tree drawing).
fn describe(t: &Topology, node: NodeRef) -> String {
    match node {
        NodeRef::HostBridge(i) => match t.host_bridges().get(i) {
            Some(hb) => format!(
                "{}  host bridge  numa={}  p2p_allowed={}",
                hb.id, hb.numa, hb.p2p_allowed
            ),
            None => String::new(),
        },
        NodeRef::RootPort(_) | NodeRef::Switch(_) => format!(
            "{}  {}",
            t.node_id(node).unwrap_or_default(),
            node.kind_name()
        ),
        NodeRef::Device(i) => {
            let Some(d) = t.devices().get(i) else {
                return String::new();
            };
            let mut s = format!("{}  {}  numa={}", d.id, d.kind, d.numa);
            if let Some(size) = d.size {
                let _ = write!(s, "  size={}", format_size(size));
            }
            if !d.bars.is_empty() {
                let bars: Vec<String> = d
                    .bars
                    .iter()
                    .map(|b| format!("BAR{}={}", b.index, format_size(b.size)))
                    .collect();
                let _ = write!(s, "  {}", bars.join(" "));
            }
            if let Some(pci) = &d.pci {
                let _ = write!(s, "  pci={pci}");
            }
            s
        }
    }
}

fn render_tree(t: &Topology, node: NodeRef, prefix: &str, last: bool, top: bool, out: &mut String) {
    let (branch, next) = match (top, last) {
        (true, _) => ("", String::new()),
        (false, true) => ("└─ ", format!("{prefix}   ")),
        (false, false) => ("├─ ", format!("{prefix}│  ")),
    };
    let _ = writeln!(out, "{prefix}{branch}{}", describe(t, node));
    let children = t.children(node);
    let n = children.len();
    for (k, child) in children.into_iter().enumerate() {
        render_tree(t, child, &next, k + 1 == n, false, out);
    }
}

/// The human form: source, tree, route matrix and legend.
fn render(t: &Topology) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "topology: {}\n", t.source());
    for i in 0..t.host_bridges().len() {
        render_tree(t, NodeRef::HostBridge(i), "", true, true, &mut out);
    }
    let ids: Vec<&str> = t.devices().iter().map(|d| d.id.as_str()).collect();
    if ids.is_empty() {
        let _ = writeln!(out, "\nno devices");
        return out;
    }
    let w = ids
        .iter()
        .map(|s| s.chars().count())
        .max()
        .unwrap_or(0)
        .max(7)
        + 2;
    let _ = writeln!(out, "\nroutes:");
    let mut row = format!("{:w$}", "");
    for id in &ids {
        let _ = write!(row, "{id:w$}");
    }
    let _ = writeln!(out, "{}", row.trim_end());
    for (a, da) in t.device_indices().zip(&ids) {
        let mut row = format!("{da:w$}");
        for b in t.device_indices() {
            let _ = write!(row, "{:w$}", short(t.route(a, b)));
        }
        let _ = writeln!(out, "{}", row.trim_end());
    }
    let _ = writeln!(
        out,
        "\nlocal = same device or host memory (plain DMA); bus = bus-addr (common switch or root \
         port);\nthru-hb = thru-host-bridge (allow-listed root complex); none = not-supported \
         (bounce through host memory)"
    );
    out
}

fn tree_json(t: &Topology, node: NodeRef) -> serde_json::Value {
    let children: Vec<serde_json::Value> = t
        .children(node)
        .into_iter()
        .map(|c| tree_json(t, c))
        .collect();
    let id = t.node_id(node).unwrap_or_default();
    match node {
        NodeRef::HostBridge(i) => {
            let (numa, p2p) = t
                .host_bridges()
                .get(i)
                .map_or((0, false), |h| (h.numa, h.p2p_allowed));
            serde_json::json!({
                "id": id, "type": "host-bridge", "numa": numa, "p2p_allowed": p2p,
                "children": children,
            })
        }
        NodeRef::RootPort(_) => {
            serde_json::json!({ "id": id, "type": "root-port", "children": children })
        }
        NodeRef::Switch(_) => {
            serde_json::json!({ "id": id, "type": "switch", "children": children })
        }
        NodeRef::Device(i) => {
            let mut v = t
                .devices()
                .get(i)
                .and_then(|d| serde_json::to_value(d).ok())
                .unwrap_or_else(|| serde_json::json!({ "id": id }));
            if let Some(obj) = v.as_object_mut() {
                obj.remove("parent");
                obj.insert("type".into(), "device".into());
            }
            v
        }
    }
}

/// `{"source", "tree", "devices", "routes"}`; routes list each unordered pair once.
fn to_json(t: &Topology) -> serde_json::Value {
    let tree: Vec<serde_json::Value> = (0..t.host_bridges().len())
        .map(|i| tree_json(t, NodeRef::HostBridge(i)))
        .collect();
    let devices: Vec<serde_json::Value> = t
        .device_indices()
        .filter_map(|id| {
            let d = t.device_at(id)?;
            let mut v = serde_json::to_value(d).ok()?;
            if let (Some(obj), Some(hb)) = (v.as_object_mut(), t.host_bridge_of(id)) {
                obj.insert("host_bridge".into(), hb.id.clone().into());
            }
            Some(v)
        })
        .collect();
    let routes: Vec<serde_json::Value> = t
        .route_matrix()
        .into_iter()
        .map(|(a, b, r)| serde_json::json!({ "a": a, "b": b, "route": r.as_str() }))
        .collect();
    serde_json::json!({
        "source": t.source(),
        "tree": tree,
        "devices": devices,
        "routes": routes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn human_output_shows_tree_and_matrix() {
        let s = render(&builtin::testbed());
        assert!(
            s.contains("hb0  host bridge  numa=0  p2p_allowed=true"),
            "{s}"
        );
        assert!(s.contains("│  └─ sw0  switch"), "{s}");
        assert!(
            s.contains("gpu0  gpu  numa=0  BAR0=16 MiB BAR1=64 GiB BAR3=32 MiB"),
            "{s}"
        );
        assert!(s.contains("mem0  host-memory  numa=0  size=256 GiB"), "{s}");
        let row = s.lines().find(|l| l.starts_with("gpu0 ")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        // mem0 mem1 gpu0 nic0 gpu1 nvme0 gpu2 nic1 nic2
        assert_eq!(
            cells,
            [
                "gpu0", "local", "local", "local", "bus", "thru-hb", "thru-hb", "none", "none",
                "none"
            ]
        );
    }

    #[test]
    fn json_output_has_every_pair() {
        let t = builtin::testbed();
        let v = to_json(&t);
        let n = t.devices().len();
        assert_eq!(v["routes"].as_array().unwrap().len(), n * (n - 1) / 2);
        assert_eq!(v["devices"].as_array().unwrap().len(), n);
        assert_eq!(v["tree"][0]["id"], "hb0");
        assert_eq!(v["tree"][0]["children"][0]["children"][0]["type"], "switch");
        let gpu0_nic0 = v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["a"] == "gpu0" && r["b"] == "nic0")
            .unwrap();
        assert_eq!(gpu0_nic0["route"], "bus-addr");
        assert_eq!(v["devices"][2]["host_bridge"], "hb0");
    }

    #[cfg(not(feature = "hwloc"))]
    #[test]
    fn discover_without_feature_says_how_to_rebuild() {
        let args = TopoArgs {
            topology: None,
            discover: true,
        };
        let e = run(&args, false).unwrap_err().to_string();
        assert!(e.contains("`hwloc` feature"), "{e}");
        assert!(e.contains("cargo run --release --features hwloc -- topo --discover"));
        assert!(!e.contains('\n'));
    }
}
