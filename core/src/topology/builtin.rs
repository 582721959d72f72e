//! The example topologies shipped in `topologies/`, embedded so tests, the sim fabric and the
//! `dmaplane topo` command work without any file at hand.

use super::Topology;

/// `topologies/testbed.toml`: one two-socket machine on which every route kind occurs.
pub const TESTBED_TOML: &str = include_str!("../../../topologies/testbed.toml");

/// Every shipped topology as `(name, TOML text)`; the name is the file stem.
pub const SHIPPED: &[(&str, &str)] = &[
    ("testbed", TESTBED_TOML),
    (
        "two-socket",
        include_str!("../../../topologies/two-socket.toml"),
    ),
    (
        "no-p2p-bridge",
        include_str!("../../../topologies/no-p2p-bridge.toml"),
    ),
    (
        "dgx-like",
        include_str!("../../../topologies/dgx-like.toml"),
    ),
];

/// Source name of the built-in testbed in messages and dumps.
pub const TESTBED_SOURCE: &str = "built-in testbed (topologies/testbed.toml)";

/// The built-in example testbed.
pub fn testbed() -> Topology {
    // The text is fixed at compile time and `builtin_topologies_parse` checks it, so this can
    // only fail if someone breaks the shipped file and skips the tests.
    #[allow(clippy::expect_used)]
    Topology::from_toml_str(TESTBED_TOML, TESTBED_SOURCE)
        .expect("the built-in topologies/testbed.toml is valid")
}

/// A shipped topology by name (`"testbed"`, `"two-socket"`, ...); `None` for unknown names.
/// Returns the parse result so a broken file is an error, not a panic.
pub fn shipped(name: &str) -> Option<Result<Topology, super::TopologyError>> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| Topology::from_toml_str(text, &format!("topologies/{n}.toml")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_topologies_parse() {
        for (name, text) in SHIPPED {
            let t = Topology::from_toml_str(text, name);
            assert!(t.is_ok(), "{name}: {:?}", t.err());
        }
        assert!(testbed().devices().len() >= 8);
        assert!(shipped("two-socket").is_some_and(|r| r.is_ok()));
        assert!(shipped("nope").is_none());
    }

    #[test]
    fn shipped_matches_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../topologies");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                (p.extension()? == "toml").then(|| p.file_stem()?.to_str().map(str::to_string))?
            })
            .collect();
        on_disk.sort();
        let mut shipped: Vec<String> = SHIPPED.iter().map(|(n, _)| n.to_string()).collect();
        shipped.sort();
        assert_eq!(
            on_disk, shipped,
            "every file in topologies/ is embedded in SHIPPED"
        );
    }
}
