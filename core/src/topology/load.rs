//! Loading topologies from TOML, with errors that point at the line and field to fix.
//!
//! ```toml
//! [[host_bridge]]
//! id = "hb0"
//! numa = 0
//! p2p_allowed = true      # optional, default false (the kernel's answer for unknown bridges)
//!
//! [[root_port]]
//! id = "rp0"
//! parent = "hb0"
//!
//! [[switch]]
//! id = "sw0"
//! parent = "rp0"          # a root port or another switch
//!
//! [[device]]
//! id = "gpu0"
//! kind = "gpu"            # gpu | nic | nvme | host-memory
//! parent = "sw0"          # a switch or root port; a host bridge for host-memory
//! bars = [{ index = 1, size = "64GiB" }]
//! numa = 0                # optional; default: the host bridge's
//! pci = "0000:3b:00.0"    # optional: the real PCI function (discovered machines)
//!
//! [[device]]
//! id = "mem0"
//! kind = "host-memory"
//! parent = "hb0"
//! size = "256GiB"         # optional, host-memory only
//! ```
//!
//! Sizes are bytes as a TOML integer, or strings: a whole number with an optional unit.
//! `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024; `KB`, `MB`, `GB`, `TB` are powers of 1000
//! (as on disk labels; PCI BARs are binary so files should say `MiB`/`GiB`); `B` or no unit
//! means bytes. Units are case-insensitive; `_` may separate digits.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Bar, DeviceKind, DeviceSpec, HostBridge, Lines, RootPort, SourceLine, Switch, Topology,
    TopologyBuilder, TopologyError, TopologyErrorKind,
};

/// The largest NUMA node id Linux can have (`MAX_NUMNODES` with `NODES_SHIFT` = 10).
const MAX_NUMA: i64 = 1023;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    host_bridge: Vec<RawHostBridge>,
    #[serde(default)]
    root_port: Vec<RawPort>,
    #[serde(default)]
    switch: Vec<RawPort>,
    #[serde(default)]
    device: Vec<RawDevice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostBridge {
    id: Spanned<String>,
    numa: Spanned<i64>,
    #[serde(default)]
    p2p_allowed: bool,
}

/// A root port or a switch: both are just an id and a parent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    id: Spanned<String>,
    parent: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: Spanned<String>,
    kind: Spanned<String>,
    parent: Spanned<String>,
    #[serde(default)]
    bars: Option<Spanned<Vec<RawBar>>>,
    #[serde(default)]
    size: Option<Spanned<RawSize>>,
    #[serde(default)]
    numa: Option<Spanned<i64>>,
    #[serde(default)]
    pci: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBar {
    index: Spanned<i64>,
    size: Spanned<RawSize>,
}

/// A size as written: a TOML integer or a string with a unit.
enum RawSize {
    Int(i64),
    Str(String),
}

impl RawSize {
    fn text(&self) -> String {
        match self {
            RawSize::Int(n) => n.to_string(),
            RawSize::Str(s) => s.clone(),
        }
    }

    fn bytes(&self) -> Result<u64, String> {
        match self {
            RawSize::Int(n) if *n > 0 => u64::try_from(*n).map_err(|e| e.to_string()),
            RawSize::Int(0) => Err("size must be greater than zero".to_string()),
            RawSize::Int(_) => Err("size must not be negative".to_string()),
            RawSize::Str(s) => parse_size(s),
        }
    }
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: an integer number of bytes or a string like \"64GiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Int)
                    .map_err(|_| E::custom("size too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Str(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

const UNITS_HELP: &str = "use a whole number of bytes, optionally with a unit: B, KiB, MiB, GiB, TiB (binary) or KB, MB, GB, TB (decimal)";

/// Parses "64GiB", "256 MiB", "4KiB", "1TiB", "1_024", "10GB" (decimal) into bytes.
/// Zero, fractions, unknown units and overflow are errors; the message says which.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();
    let digits: String = num.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() {
        return Err(format!("no number; {UNITS_HELP}"));
    }
    if unit.starts_with('.') || unit.starts_with(',') {
        return Err("fractional sizes are not supported; use a smaller unit".to_string());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| "number too large for 64 bits".to_string())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit \"{unit}\"; {UNITS_HELP}")),
    };
    if n == 0 {
        return Err("size must be greater than zero".to_string());
    }
    n.checked_mul(mult)
        .ok_or_else(|| "size too large for 64 bits".to_string())
}

/// Bytes in the largest binary unit that keeps it readable: "64 GiB", "16 KiB", "1000 B",
/// "1.5 GiB" (one decimal when not exact).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            return if bytes.is_multiple_of(unit) {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end or inside
/// a character are clamped, never a panic.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let end = offset.min(bytes.len());
    let before = bytes.get(..end).unwrap_or(bytes);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(before.get(line_start..).unwrap_or_default())
        .chars()
        .count()
        + 1;
    (line, col)
}

/// The key whose value starts at `offset` (`numa` in `numa = "zero"`, `size` in
/// `bars = [{ index = 1, size = "x" }]`), so type errors from the parser name their field.
fn key_before(text: &str, offset: usize) -> Option<&str> {
    let before = text.get(..offset)?;
    let line = before.rsplit('\n').next()?;
    let (lhs, _) = line.rsplit_once('=')?;
    let key = lhs
        .trim_end()
        .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .next()?;
    (!key.is_empty()).then_some(key)
}

/// The `[[table]]` header on the line at `offset`, for errors the parser reports against a
/// whole table ("missing field `id`").
fn header_at(text: &str, offset: usize) -> Option<&str> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |p| p + 1);
    let line = text.get(start..)?.lines().next()?.trim();
    let header = line.split('#').next()?.trim_end();
    (header.starts_with('[') && header.ends_with(']')).then_some(header)
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line<T>(&self, s: &Spanned<T>) -> usize {
        line_col(self.text, s.span().start).0
    }

    fn at<T>(&self, s: &Spanned<T>) -> SourceLine {
        SourceLine {
            file: self.file.to_string(),
            line: Some(self.line(s)),
        }
    }

    fn numa(&self, item: &'static str, id: &str, n: &Spanned<i64>) -> Result<u32, TopologyError> {
        let v = *n.get_ref();
        match u32::try_from(v) {
            Ok(x) if v <= MAX_NUMA => Ok(x),
            _ => Err(TopologyErrorKind::Invalid {
                at: self.at(n),
                item,
                id: id.to_string(),
                field: "numa".to_string(),
                value: v.to_string(),
                reason: format!("a NUMA node is 0 to {MAX_NUMA}"),
            }
            .into()),
        }
    }

    fn size(&self, id: &str, field: String, s: &Spanned<RawSize>) -> Result<u64, TopologyError> {
        s.get_ref().bytes().map_err(|reason| {
            TopologyErrorKind::BadSize {
                at: self.at(s),
                item: "device",
                id: id.to_string(),
                field,
                value: s.get_ref().text(),
                reason,
            }
            .into()
        })
    }
}

impl Topology {
    /// Parses and validates a topology. `source_name` (usually the path) prefixes errors.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Topology, TopologyError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start);
            let (line, col) = start.map_or((1, 1), |s| line_col(text, s));
            let message = e.message().trim().to_string();
            let message = match start.and_then(|s| key_before(text, s)) {
                Some(key) if !message.contains(key) => format!("field {key}: {message}"),
                _ => match start.and_then(|s| header_at(text, s)) {
                    Some(header) => format!("in {header}: {message}"),
                    None => message,
                },
            };
            TopologyErrorKind::Toml {
                file: source_name.to_string(),
                line,
                col,
                message,
            }
        })?;
        let cx = Ctx {
            file: source_name,
            text,
        };
        let mut b = TopologyBuilder::new(source_name);
        for hb in &raw.host_bridge {
            let numa = cx.numa("host bridge", hb.id.get_ref(), &hb.numa)?;
            let lines = Lines {
                id: Some(cx.line(&hb.id)),
                ..Lines::default()
            };
            b.push_host_bridge(
                HostBridge {
                    id: hb.id.get_ref().clone(),
                    numa,
                    p2p_allowed: hb.p2p_allowed,
                },
                lines,
            );
        }
        for rp in &raw.root_port {
            b.push_root_port(
                RootPort {
                    id: rp.id.get_ref().clone(),
                    parent: rp.parent.get_ref().clone(),
                },
                port_lines(&cx, rp),
            );
        }
        for sw in &raw.switch {
            b.push_switch(
                Switch {
                    id: sw.id.get_ref().clone(),
                    parent: sw.parent.get_ref().clone(),
                },
                port_lines(&cx, sw),
            );
        }
        for d in &raw.device {
            let (spec, lines) = device_spec(&cx, d)?;
            b.push_device(spec, lines);
        }
        b.build()
    }

    /// Reads and parses a topology file; errors name the path as given.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Topology, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|err| TopologyErrorKind::Io {
            path: path.to_path_buf(),
            err,
        })?;
        Topology::from_toml_str(&text, &path.display().to_string())
    }

    /// The topology in the file format, so a discovered machine can be saved, edited and
    /// loaded back (`from_toml_str(to_toml())` gives an equal topology).
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = format!("# topology from {}\n", self.source());
        for hb in self.host_bridges() {
            let _ = write!(
                out,
                "\n[[host_bridge]]\nid = {}\nnuma = {}\np2p_allowed = {}\n",
                q(&hb.id),
                hb.numa,
                hb.p2p_allowed
            );
        }
        for (table, ports) in [
            (
                "root_port",
                self.root_ports()
                    .iter()
                    .map(|r| (&r.id, &r.parent))
                    .collect::<Vec<_>>(),
            ),
            (
                "switch",
                self.switches().iter().map(|s| (&s.id, &s.parent)).collect(),
            ),
        ] {
            for (id, parent) in ports {
                let _ = write!(
                    out,
                    "\n[[{table}]]\nid = {}\nparent = {}\n",
                    q(id),
                    q(parent)
                );
            }
        }
        for d in self.devices() {
            let _ = write!(
                out,
                "\n[[device]]\nid = {}\nkind = {}\nparent = {}\n",
                q(&d.id),
                q(d.kind.as_str()),
                q(&d.parent)
            );
            if !d.bars.is_empty() {
                let bars: Vec<String> = d
                    .bars
                    .iter()
                    .map(|b| format!("{{ index = {}, size = {} }}", b.index, size_text(b.size)))
                    .collect();
                let _ = writeln!(out, "bars = [{}]", bars.join(", "));
            }
            if let Some(size) = d.size {
                let _ = writeln!(out, "size = {}", size_text(size));
            }
            if d.numa_explicit {
                let _ = writeln!(out, "numa = {}", d.numa);
            }
            if let Some(pci) = &d.pci {
                let _ = writeln!(out, "pci = {}", q(pci));
            }
        }
        out
    }
}

/// A size as TOML: a binary-unit string when exact ("64GiB"), else the integer.
fn size_text(bytes: u64) -> String {
    let s = format_size(bytes).replace(' ', "");
    if !s.contains('.') && s.ends_with("iB") {
        format!("\"{s}\"")
    } else if let Ok(i) = i64::try_from(bytes) {
        i.to_string()
    } else {
        format!("\"{bytes}\"")
    }
}

fn port_lines(cx: &Ctx<'_>, p: &RawPort) -> Lines {
    Lines {
        id: Some(cx.line(&p.id)),
        parent: Some(cx.line(&p.parent)),
        ..Lines::default()
    }
}

fn device_spec(cx: &Ctx<'_>, d: &RawDevice) -> Result<(DeviceSpec, Lines), TopologyError> {
    let id = d.id.get_ref();
    let kind =
        DeviceKind::parse(d.kind.get_ref()).ok_or_else(|| TopologyErrorKind::UnknownKind {
            at: cx.at(&d.kind),
            id: id.clone(),
            value: d.kind.get_ref().clone(),
        })?;
    let mut lines = Lines {
        id: Some(cx.line(&d.id)),
        parent: Some(cx.line(&d.parent)),
        size: d.size.as_ref().map(|s| cx.line(s)),
        bars: d.bars.as_ref().map(|b| cx.line(b)),
        pci: d.pci.as_ref().map(|p| cx.line(p)),
        bar: Vec::new(),
    };
    // Checked here too (the builder repeats it) to quote the value as written.
    let misplaced = match (kind, &d.bars, &d.size) {
        (DeviceKind::HostMemory, Some(b), _) => Some((
            cx.at(b),
            "bars",
            cx.text.get(b.span()).unwrap_or("").to_string(),
            "host-memory devices have no BARs; give their size with `size`",
        )),
        (DeviceKind::Gpu | DeviceKind::Nic | DeviceKind::Nvme, _, Some(sz)) => Some((
            cx.at(sz),
            "size",
            sz.get_ref().text(),
            "only host-memory devices have a size; describe device memory with bars",
        )),
        _ => None,
    };
    if let Some((at, field, value, reason)) = misplaced {
        return Err(TopologyErrorKind::Invalid {
            at,
            item: "device",
            id: id.clone(),
            field: field.to_string(),
            value,
            reason: reason.to_string(),
        }
        .into());
    }
    let mut bars = Vec::new();
    if let Some(raw_bars) = &d.bars {
        for (i, rb) in raw_bars.get_ref().iter().enumerate() {
            let idx = *rb.index.get_ref();
            let index = match u8::try_from(idx) {
                Ok(x) if x <= 5 => x,
                _ => {
                    return Err(TopologyErrorKind::Invalid {
                        at: cx.at(&rb.index),
                        item: "device",
                        id: id.clone(),
                        field: format!("bars[{i}].index"),
                        value: idx.to_string(),
                        reason: "a PCI device has BARs 0 to 5".to_string(),
                    }
                    .into());
                }
            };
            let size = cx.size(id, format!("bars[{i}].size"), &rb.size)?;
            if let Err(reason) = super::check_bar_size(size) {
                return Err(TopologyErrorKind::BadSize {
                    at: cx.at(&rb.size),
                    item: "device",
                    id: id.clone(),
                    field: format!("bars[{i}].size"),
                    value: rb.size.get_ref().text(),
                    reason: reason.to_string(),
                }
                .into());
            }
            bars.push(Bar { index, size });
            lines.bar.push(Some(cx.line(&rb.size)));
        }
    }
    let size = match &d.size {
        Some(s) => Some(cx.size(id, "size".to_string(), s)?),
        None => None,
    };
    let numa = match &d.numa {
        Some(n) => Some(cx.numa("device", id, n)?),
        None => None,
    };
    Ok((
        DeviceSpec {
            id: id.clone(),
            kind,
            parent: d.parent.get_ref().clone(),
            bars,
            size,
            numa,
            pci: d.pci.as_ref().map(|p| p.get_ref().clone()),
        },
        lines,
    ))
}
