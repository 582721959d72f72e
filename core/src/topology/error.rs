//! What can go wrong building, loading or querying a topology, in words that name the file,
//! the line, the item and the field.

use std::path::PathBuf;

use super::SourceLine;

/// An error building, loading or querying a topology; see [`TopologyErrorKind`]. Boxed so
/// `Result<Topology, TopologyError>` stays one pointer wide on the error side.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TopologyError(Box<TopologyErrorKind>);

impl TopologyError {
    pub fn kind(&self) -> &TopologyErrorKind {
        &self.0
    }
}

impl From<TopologyErrorKind> for TopologyError {
    fn from(kind: TopologyErrorKind) -> Self {
        TopologyError(Box::new(kind))
    }
}

/// Everything that can go wrong building, loading or querying a topology. Messages name the
/// file, the line, the item and the field, so a user can fix a hand-written file at once.
#[derive(Debug, thiserror::Error)]
pub enum TopologyErrorKind {
    #[error("{}: cannot read topology: {err}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// TOML syntax, wrong value types, unknown or missing fields (from the toml parser).
    #[error("{file}:{line}:{col}: {message}")]
    Toml {
        file: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "{at}: {item} \"{id}\" field parent: unknown parent \"{parent}\" (known {expected}: {known})"
    )]
    UnknownParent {
        at: SourceLine,
        item: &'static str,
        id: String,
        parent: String,
        expected: &'static str,
        known: String,
    },
    #[error("{at}: {item} field parent: \"{parent}\" is a {parent_kind}; {rule}")]
    WrongParentKind {
        at: SourceLine,
        item: String,
        id: String,
        parent: String,
        parent_kind: &'static str,
        rule: &'static str,
    },
    #[error("{at}: {item} field id: duplicate id \"{id}\" (first defined {first})")]
    DuplicateId {
        at: SourceLine,
        item: &'static str,
        id: String,
        first: String,
    },
    #[error(
        "{at}: switch \"{}\" field parent: cycle among switches: {}",
        ids.first().map(String::as_str).unwrap_or(""),
        cycle_text(ids)
    )]
    Cycle { at: SourceLine, ids: Vec<String> },
    #[error("{at}: {item} \"{id}\" field {field}: bad size \"{value}\": {reason}")]
    BadSize {
        at: SourceLine,
        item: &'static str,
        id: String,
        field: String,
        value: String,
        reason: String,
    },
    #[error(
        "{at}: device \"{id}\" field kind: unknown kind \"{value}\" (expected one of: gpu, nic, nvme, host-memory)"
    )]
    UnknownKind {
        at: SourceLine,
        id: String,
        value: String,
    },
    /// Any other bad value (BAR index, id syntax, a field that does not fit the device kind).
    #[error("{at}: {item} \"{id}\" field {field}: bad value \"{value}\": {reason}")]
    Invalid {
        at: SourceLine,
        item: &'static str,
        id: String,
        field: String,
        value: String,
        reason: String,
    },
    #[error("unknown device \"{id}\" in {file} (known devices: {known})")]
    UnknownDevice {
        file: String,
        id: String,
        known: String,
    },
    #[error("device \"{device}\" has no BAR {index} (its BARs: {bars})")]
    NoSuchBar {
        device: String,
        index: u8,
        bars: String,
    },
    #[error("topology discovery failed: {0}")]
    Discover(String),
}

fn cycle_text(ids: &[String]) -> String {
    let mut s = ids.join(" -> ");
    if let Some(first) = ids.first() {
        s.push_str(" -> ");
        s.push_str(first);
    }
    s
}

/// Joins ids for an error message, cut short so a discovered machine with hundreds of
/// devices still gives a readable line.
pub(crate) fn list_ids<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    const MAX: usize = 16;
    let all: Vec<&str> = ids.collect();
    if all.is_empty() {
        return "none".to_string();
    }
    let mut s = all.iter().take(MAX).copied().collect::<Vec<_>>().join(", ");
    if all.len() > MAX {
        s.push_str(&format!(", ... ({} more)", all.len() - MAX));
    }
    s
}
