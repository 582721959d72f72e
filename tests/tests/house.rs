//! The house's layout, checked from the sources so that it stays as docs/crates.md draws it:
//!
//! - no two source files of a crate import each other in a circle, except inside a backend's
//!   own FFI layer (`rdma/src/verbs/`, `gpu/src/cuda/`), where the C library's objects point at
//!   each other;
//! - `tools/` reaches `bench/` only from its `bench` subcommands (`tools/src/bench/`);
//! - no source file is over [`MAX_LINES`] lines unless it is listed in [`LARGE`] with the one
//!   concept it holds.
//!
//! An import is a `crate::a::b` path (or `super::`, or a child module's name) in code, not in a
//! comment, resolved to the file of the longest module prefix that has one. Re-exports
//! (`pub use`, a module's façade over its children), a child module's use of its parent's items
//! (it is part of the parent) and paths through the crate root are not imports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest file, in lines, that needs no reason.
const MAX_LINES: usize = 800;

/// Files over [`MAX_LINES`], each with the one concept it holds.
const LARGE: &[(&str, &str)] = &[
    (
        "core/src/fabric/mod.rs",
        "the simulated fabric: its devices, windows and grants, and every DMA checked against them",
    ),
    ("core/src/topology/tests.rs", "the topology model's tests"),
    (
        "storage/src/ring.rs",
        "one io_uring: its registered files and buffers, submission, completion, and quiesce \
         on revoke, with its tests",
    ),
];

/// Directories whose files may import each other in a circle: a backend's FFI layer.
const FFI: &[&str] = &["rdma/src/verbs/", "gpu/src/cuda/"];

/// The workspace's crates, by their source root.
const CRATES: &[&str] = &[
    "core/src",
    "rdma/src",
    "gpu/src",
    "storage/src",
    "dmaplane/src",
    "bench/src",
    "tools/src",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments and doc comments).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut cut = line.len();
        let b = line.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
                b'/' if !in_str && b.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// The module path of a file relative to its crate's source root: `a/b.rs` and `a/b/mod.rs`
/// are `[a, b]`; the root (`lib.rs`, `main.rs`) is `[]`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
        parts.push(stem.to_string());
    }
    parts
}

/// Every path a file names, as module segments from the crate root: `crate::a::b::C`,
/// `super::x` (from a top-level line), `self::x` and a child module's name (`x::Y`).
fn paths_named(code: &str, module: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for line in code.lines() {
        // A re-export (`pub use`) makes a module a façade over its children: not an import.
        let trimmed = line.trim_start();
        if trimmed.starts_with("pub use") || trimmed.starts_with("pub(crate) use") {
            continue;
        }
        let top_level = !line.starts_with(char::is_whitespace);
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if !is_ident(chars[i]) || (i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
                i += 1;
                continue;
            }
            // A path starting here: identifiers joined by `::`, up to a `{` group.
            let mut segs = Vec::new();
            let mut j = i;
            loop {
                let s = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                segs.push(chars[s..j].iter().collect::<String>());
                if j + 2 < chars.len()
                    && chars[j] == ':'
                    && chars[j + 1] == ':'
                    && is_ident(chars[j + 2])
                {
                    j += 2;
                } else {
                    break;
                }
            }
            // `crate::{a, b::c}`: one level of group.
            let mut groups: Vec<Vec<String>> = Vec::new();
            if j + 2 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' && chars[j + 2] == '{'
            {
                let close = chars[j + 3..]
                    .iter()
                    .position(|&c| c == '}')
                    .map_or(chars.len(), |p| j + 3 + p);
                let inner: String = chars[j + 3..close].iter().collect();
                for item in inner.split(',') {
                    let item: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s.chars().all(is_ident))
                        .collect();
                    if !item.is_empty() {
                        groups.push(item);
                    }
                }
            }
            let heads: Vec<Vec<String>> = if groups.is_empty() {
                vec![segs.clone()]
            } else {
                groups
                    .into_iter()
                    .map(|g| segs.iter().cloned().chain(g).collect())
                    .collect()
            };
            for p in heads {
                let resolved = match p[0].as_str() {
                    "crate" => Some(p[1..].to_vec()),
                    "super" if top_level && !module.is_empty() => {
                        let mut m = module[..module.len() - 1].to_vec();
                        m.extend(p[1..].iter().cloned());
                        Some(m)
                    }
                    "self" => {
                        let mut m = module.to_vec();
                        m.extend(p[1..].iter().cloned());
                        Some(m)
                    }
                    first if p.len() > 1 && top_level && children.contains(first) => {
                        let mut m = module.to_vec();
                        m.extend(p.iter().cloned());
                        Some(m)
                    }
                    _ => None,
                };
                if let Some(r) = resolved {
                    found.push(r);
                }
            }
            i = j.max(i + 1);
        }
    }
    found
}

/// The file-level import graph of the workspace: file → files it imports, each edge with the
/// path that made it.
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let root = root();
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for krate in CRATES {
        let src = root.join(krate);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        // Module path → file, for every module that has a file.
        let mut by_module: BTreeMap<Vec<String>, String> = BTreeMap::new();
        for f in &files {
            let rel = f.strip_prefix(&src).expect("under its crate");
            let name = f
                .strip_prefix(&root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            by_module.entry(module_of(rel)).or_insert(name);
        }
        for f in &files {
            let rel = f.strip_prefix(&src).expect("under its crate");
            let module = module_of(rel);
            let name = by_module[&module].clone();
            if module.is_empty() {
                // The crate root declares and re-exports everything: not an import.
                g.entry(name).or_default();
                continue;
            }
            let children: BTreeSet<String> = by_module
                .keys()
                .filter(|m| m.len() == module.len() + 1 && m.starts_with(&module))
                .map(|m| m[module.len()].clone())
                .collect();
            let text = std::fs::read_to_string(f).expect("readable source");
            let edges = g.entry(name.clone()).or_default();
            for p in paths_named(&code(&text), &module, &children) {
                // The longest prefix that is a module with a file.
                let target = (1..=p.len())
                    .rev()
                    .find_map(|n| by_module.get(&p[..n]).filter(|_| n > 0));
                // A child module is part of its parent (it sees the parent's private items):
                // its use of them is not an import.
                let ancestor = |t: &String| {
                    by_module
                        .iter()
                        .any(|(m, f)| f == t && m.len() < module.len() && module.starts_with(m))
                };
                if let Some(t) = target
                    && *t != name
                    && !ancestor(t)
                {
                    edges
                        .entry(t.clone())
                        .or_insert_with(|| format!("crate::{}", p.join("::")));
                }
            }
        }
    }
    g
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(g: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut c = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                c.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                s.out.push(c);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_two_files_import_each_other_in_a_circle_outside_the_ffi_layers() {
    let g = graph();
    assert!(
        g.len() > 150,
        "only {} files found: the walk is broken",
        g.len()
    );
    assert!(
        g.values().map(BTreeMap::len).sum::<usize>() > 300,
        "hardly any imports found: the parser is broken"
    );
    let mut bad = Vec::new();
    let mut ffi = 0;
    for c in circles(&g) {
        if FFI.iter().any(|d| c.iter().all(|f| f.starts_with(d))) {
            ffi += 1;
            continue;
        }
        let ties: Vec<String> = c
            .iter()
            .flat_map(|f| {
                g[f].iter()
                    .filter(|(t, _)| c.contains(t))
                    .map(move |(t, via)| format!("  {f} -> {t} ({via})"))
            })
            .collect();
        bad.push(format!(
            "{} files in a circle:\n{}",
            c.len(),
            ties.join("\n")
        ));
    }
    assert!(bad.is_empty(), "import circles:\n{}", bad.join("\n"));
    // The FFI layers' circles are known; a new one elsewhere fails above.
    assert!(ffi <= FFI.len(), "{ffi} circles inside the FFI layers");
}

#[test]
fn tools_reaches_bench_only_from_its_bench_subcommands() {
    let root = root();
    let mut files = Vec::new();
    rust_files(&root.join("tools/src"), &mut files);
    assert!(!files.is_empty(), "no tools sources found");
    let bad: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(root.join("tools/src/bench")))
        .filter(|f| {
            code(&std::fs::read_to_string(f).expect("readable source")).contains("dmaplane_bench")
        })
        .map(|f| {
            f.strip_prefix(&root)
                .expect("under the root")
                .display()
                .to_string()
        })
        .collect();
    assert!(
        bad.is_empty(),
        "tools/ files outside tools/src/bench/ that import bench/: {bad:?} (what they need \
         belongs in the library)"
    );
}

#[test]
fn no_source_file_is_large_without_a_reason() {
    let root = root();
    let mut bad = Vec::new();
    let mut listed_but_small = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&root.join(krate), &mut files);
        for f in files {
            let name = f
                .strip_prefix(&root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned();
            let lines = std::fs::read_to_string(&f)
                .expect("readable source")
                .lines()
                .count();
            let listed = LARGE.iter().any(|(p, _)| *p == name);
            if lines > MAX_LINES && !listed {
                bad.push(format!("{name}: {lines} lines"));
            }
            if lines <= MAX_LINES && listed {
                listed_but_small.push(name);
            }
        }
    }
    assert!(
        bad.is_empty(),
        "source files over {MAX_LINES} lines that hold more than one concept (split them, or \
         list them in LARGE with the one concept they hold): {bad:?}"
    );
    assert!(
        listed_but_small.is_empty(),
        "LARGE lists files that are no longer large: {listed_but_small:?}"
    );
}

#[test]
fn the_parser_sees_a_circle_and_the_paths_it_is_made_of() {
    let module = vec!["a".to_string()];
    let children = BTreeSet::from(["kid".to_string()]);
    let code = code(
        "use crate::b::{X, c::Y};\nuse super::d;\nuse kid::Z; // crate::nope\n    use super::*;\n",
    );
    let p = paths_named(&code, &module, &children);
    let want: Vec<Vec<String>> = [
        vec!["b", "X"],
        vec!["b", "c", "Y"],
        vec!["d"],
        vec!["a", "kid", "Z"],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(p, want);
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    g.entry("x".into())
        .or_default()
        .insert("y".into(), "crate::y".into());
    g.entry("y".into())
        .or_default()
        .insert("z".into(), "crate::z".into());
    g.entry("z".into())
        .or_default()
        .insert("x".into(), "crate::x".into());
    g.entry("w".into())
        .or_default()
        .insert("x".into(), "crate::x".into());
    assert_eq!(circles(&g), vec![vec!["x", "y", "z"]]);
}
