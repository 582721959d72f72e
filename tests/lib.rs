//! Helpers for the integration tests in `tests/`.

use std::path::PathBuf;

/// Every `.toml` under the workspace's `topologies/`, sorted.
pub fn shipped_topologies() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topologies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    files
}

/// Build the strict fake CUDA driver (`gpu/src/cuda/fake_libcuda.c`) with the system C compiler
/// (`$CC`, else `cc`) into `dir/libcuda.so.1`: put `dir` on `LD_LIBRARY_PATH` of a child process
/// and its CUDA paths run on a machine without a GPU. `Err` says why it could not be built.
pub fn build_fake_libcuda(dir: &std::path::Path) -> Result<PathBuf, String> {
    let src_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../gpu/src/cuda/fake_libcuda.c");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let lib = dir.join("libcuda.so.1");
    let out = std::process::Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-pthread", "-o"])
        .arg(&lib)
        .arg(&src_path)
        .output()
        .map_err(|e| format!("no C compiler to build the fake driver ({cc}: {e})"))?;
    if !out.status.success() {
        return Err(format!(
            "{cc} could not build the fake driver: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(lib)
}
