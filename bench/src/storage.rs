//! `dmaplane bench storage`: the io_uring ring (`dmaplane-storage`) against fio doing the same
//! work on the same file in the same run — 4 KiB random reads at queue depth 64, 1 MiB
//! sequential reads and writes — all `O_DIRECT` with registered buffers and files, so neither
//! side measures the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmaplane_storage::{BufId, DirectFile, FileId, OpenOptions, Ring, StorageError};
use serde::Serialize;

use crate::rounds::{Spread, reference_first};

#[derive(Debug, thiserror::Error)]
pub enum StorageBenchError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Bad(String),
    #[error("fio: {0}")]
    Fio(String),
}

type Result<T> = std::result::Result<T, StorageBenchError>;

/// fio's `rw`: the direction and the order of the I/Os.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    RandRead,
    RandWrite,
}

impl Rw {
    pub const ALL: [Rw; 4] = [Rw::Read, Rw::Write, Rw::RandRead, Rw::RandWrite];

    /// fio's name for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
        }
    }

    pub const fn writes(self) -> bool {
        matches!(self, Rw::Write | Rw::RandWrite)
    }

    pub const fn random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite)
    }
}

impl std::fmt::Display for Rw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Rw, String> {
        Rw::ALL
            .into_iter()
            .find(|rw| rw.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Rw::ALL.iter().map(|r| r.as_str()).collect();
                format!(
                    "--rw {s:?}: one of {} (fio's names; mixed workloads are not measured)",
                    known.join(", ")
                )
            })
    }
}

impl Serialize for Rw {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One access pattern, in fio's words: `--rw`, `--bs`, `--iodepth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub rw: Rw,
    pub block: u64,
    pub depth: u32,
}

/// The largest block a workload may use.
pub const MAX_BLOCK: u64 = 64 << 20;
/// The largest queue depth a workload may use (the ring's submission queue).
pub const MAX_DEPTH: u32 = 4096;
/// The most memory a workload's registered buffer (depth × block) may take.
pub const MAX_BUFFER: u64 = 1 << 30;

impl Workload {
    /// The three run when no shape is asked for.
    pub const ALL: [Workload; 3] = [
        Workload {
            rw: Rw::RandRead,
            block: 4096,
            depth: 64,
        },
        Workload {
            rw: Rw::Read,
            block: 1 << 20,
            depth: 16,
        },
        Workload {
            rw: Rw::Write,
            block: 1 << 20,
            depth: 16,
        },
    ];

    /// A workload of any shape, checked: the error names the option and the value.
    pub fn new(rw: Rw, block: u64, depth: u32) -> std::result::Result<Workload, String> {
        if !(512..=MAX_BLOCK).contains(&block) || !block.is_multiple_of(512) {
            return Err(format!(
                "--bs {block}: a multiple of 512 bytes from 512 to {MAX_BLOCK} (O_DIRECT moves \
                 whole sectors)"
            ));
        }
        if !(1..=MAX_DEPTH).contains(&depth) {
            return Err(format!("--depth {depth}: 1 to {MAX_DEPTH}"));
        }
        if block * u64::from(depth) > MAX_BUFFER {
            return Err(format!(
                "--bs {block} × --depth {depth}: the registered buffer would take {} MiB, more \
                 than {} MiB",
                (block * u64::from(depth)) >> 20,
                MAX_BUFFER >> 20
            ));
        }
        Ok(Workload { rw, block, depth })
    }

    fn writes(self) -> bool {
        self.rw.writes()
    }

    fn random(self) -> bool {
        self.rw.random()
    }
}

#[derive(Debug, Clone)]
pub struct StorageBenchConfig {
    /// Where the test file goes (its file system must take O_DIRECT).
    pub dir: PathBuf,
    /// The test file's size.
    pub size: u64,
    /// Time per workload, per side, per round.
    pub per_point: Duration,
    /// Rounds per workload: each runs both sides back to back, the order swapped every round,
    /// so both sample the same drift of the disk (a virtual disk's throughput wanders by tens
    /// of percent from one second to the next). At least 1.
    pub rounds: u32,
    /// The fio binary (`None`: not installed; only this side runs).
    pub fio: Option<PathBuf>,
    /// What to measure, in order ([`Workload::ALL`] unless a shape is asked for).
    pub workloads: Vec<Workload>,
}

/// One side's result.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_s: f64,
    /// What reached the disk while this side ran, counted by the block layer
    /// (`/sys/dev/block/MAJ:MIN/stat`), not by either side: `None` where the file system has
    /// no block device (tmpfs, overlay). Other I/O on the same disk is counted too.
    pub device: Option<DeviceIo>,
}

/// Requests the block layer completed in one direction, and their bytes, over a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceIo {
    pub requests: u64,
    pub bytes: u64,
}

impl DeviceIo {
    /// Device requests per request a side made: above 1 where the block layer split them
    /// (a buffer of more scattered pages than the queue's `max_segments`, for instance).
    pub fn per_io(self, ios: u64) -> f64 {
        self.requests as f64 / ios.max(1) as f64
    }
}

/// The block device under a file, read through its `stat` file in sysfs.
#[derive(Debug, Clone)]
pub struct BlockStat {
    path: PathBuf,
}

impl BlockStat {
    /// The device holding `file`, if it is a block device sysfs knows.
    pub fn of(file: &Path) -> Option<BlockStat> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(file).ok()?.dev();
        // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let path = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"));
        let stat = BlockStat { path };
        stat.sample(false).map(|_| stat)
    }

    /// Completed requests and sectors so far, in one direction (Documentation/block/stat.rst:
    /// fields 1 and 3 for reads, 5 and 7 for writes).
    fn sample(&self, writes: bool) -> Option<DeviceIo> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        let (req, sect) = if writes { (4, 6) } else { (0, 2) };
        Some(DeviceIo {
            requests: *f.get(req)?,
            bytes: f.get(sect)? * 512,
        })
    }

    /// What `run` made the device do in direction `writes`.
    fn around<T>(
        this: Option<&BlockStat>,
        writes: bool,
        run: impl FnOnce() -> Result<T>,
    ) -> Result<(T, Option<DeviceIo>)> {
        let before = this.and_then(|s| s.sample(writes));
        let out = run()?;
        let after = this.and_then(|s| s.sample(writes));
        let io = before.zip(after).map(|(b, a)| DeviceIo {
            requests: a.requests.saturating_sub(b.requests),
            bytes: a.bytes.saturating_sub(b.bytes),
        });
        Ok((out, io))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageRow {
    pub workload: Workload,
    /// Each side's median round by IOPS (the lower middle one for an even count).
    pub ours: Measured,
    pub fio: Option<Measured>,
    /// ours / fio in IOPS (the same as in bandwidth: same block size): the median of the
    /// rounds' ratios, each round's two sides run back to back.
    pub ratio: Option<f64>,
    /// The lowest and highest of the rounds' ratios: how much the disk moved under the run.
    pub ratio_range: Option<(f64, f64)>,
    /// Every round: (ours, fio), in the order run.
    pub rounds: Vec<(Measured, Option<Measured>)>,
    pub fio_command: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageReport {
    pub file: String,
    pub size: u64,
    /// The file system's direct-I/O alignment (memory, offset) and whether statx reported it.
    pub align: (u32, u32, bool),
    pub fio_version: Option<String>,
    /// Why fio did not run, and how to get it.
    pub fio_missing: Option<String>,
    pub rows: Vec<StorageRow>,
}

/// The fio on `PATH`, if any.
pub fn find_fio() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("fio"))
            .find(|p| p.is_file())
    })
}

pub fn run(
    cfg: &StorageBenchConfig,
    progress: &dyn crate::rdma::Progress,
) -> Result<StorageReport> {
    if cfg.size < 64 << 20 || !cfg.size.is_multiple_of(1 << 20) {
        return Err(StorageBenchError::Bad(format!(
            "--size {}: at least 64 MiB, in whole MiB",
            cfg.size
        )));
    }
    if cfg.workloads.is_empty() {
        return Err(StorageBenchError::Bad("no workload to measure".into()));
    }
    if let Some(w) = cfg.workloads.iter().find(|w| w.block > cfg.size) {
        return Err(StorageBenchError::Bad(format!(
            "--bs {}: larger than the --size {} test file",
            w.block, cfg.size
        )));
    }
    let path = cfg
        .dir
        .join(format!("dmaplane-bench-storage-{}", std::process::id()));
    progress.step(&format!("writing the {} MiB test file", cfg.size >> 20));
    fill(&path, cfg.size)?;
    let result = measure_all(cfg, &path, progress);
    let _ = std::fs::remove_file(&path);
    result
}

fn measure_all(
    cfg: &StorageBenchConfig,
    path: &Path,
    progress: &dyn crate::rdma::Progress,
) -> Result<StorageReport> {
    let file = Arc::new(DirectFile::open(
        path,
        OpenOptions {
            write: true,
            ..OpenOptions::default()
        },
    )?);
    let a = file.align();
    let disk = BlockStat::of(path);
    let fio_version = cfg.fio.as_ref().and_then(|f| {
        Command::new(f)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    let mut rows = Vec::new();
    for &w in &cfg.workloads {
        let mut rounds = Vec::new();
        let mut fio_command = None;
        for round in 0..cfg.rounds.max(1) {
            let (mut ours, mut fio) = (None, None);
            for turn in 0..2 {
                if (turn == 0) == reference_first(round) {
                    if let Some(bin) = &cfg.fio {
                        progress.step(&format!(
                            "round {}/{}: fio: {} {} × QD{}",
                            round + 1,
                            cfg.rounds,
                            w.rw,
                            w.block,
                            w.depth
                        ));
                        let ((mut side, cmd), io) =
                            BlockStat::around(disk.as_ref(), w.writes(), || {
                                fio_side(bin, path, cfg.size, w, cfg.per_point)
                            })?;
                        side.device = io;
                        fio = Some(side);
                        fio_command = Some(cmd);
                    }
                } else {
                    progress.step(&format!(
                        "round {}/{}: dmaplane: {} {} × QD{}",
                        round + 1,
                        cfg.rounds,
                        w.rw,
                        w.block,
                        w.depth
                    ));
                    let (mut side, io) = BlockStat::around(disk.as_ref(), w.writes(), || {
                        ring_side(&file, cfg.size, w, cfg.per_point)
                    })?;
                    side.device = io;
                    ours = Some(side);
                }
            }
            let ours = ours.ok_or_else(|| StorageBenchError::Bad("no measurement".into()))?;
            rounds.push((ours, fio));
        }
        rows.push(row(w, rounds, fio_command)?);
    }
    Ok(StorageReport {
        file: path.display().to_string(),
        size: cfg.size,
        align: (a.mem, a.offset, a.reported),
        fio_version,
        fio_missing: cfg.fio.is_none().then(|| {
            "fio is not installed (Debian: apt-get install fio): only dmaplane's side ran".into()
        }),
        rows,
    })
}

/// Real bytes in every block (an unwritten extent reads as zeros without touching the device).
fn fill(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| StorageBenchError::Bad(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(path).map_err(io)?;
    let chunk: Vec<u8> = (0..(8u64 << 20)).map(|i| ((i * 31) >> 7) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(io)?;
        left -= n as u64;
    }
    f.sync_all().map_err(io)
}

/// The ring: `depth` requests kept in flight for `time`, each slot of the registered buffer
/// reused by the request that completes in it.
fn ring_side(file: &Arc<DirectFile>, size: u64, w: Workload, time: Duration) -> Result<Measured> {
    let depth = w.depth.next_power_of_two();
    // Built and reaped on this thread only, as fio's ring is (SINGLE_ISSUER, DEFER_TASKRUN).
    let mut ring = Ring::builder()
        .single_issuer(true)
        .depth(depth)
        .buffer(u64::from(w.depth) * w.block)
        .file(file.clone())
        .build()?;
    let blocks = size / w.block;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seq = 0u64;
    let mut next = |rng: &mut u64| {
        let b = if w.random() {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % blocks
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        b * w.block
    };
    let len = u32::try_from(w.block).map_err(|e| StorageBenchError::Bad(e.to_string()))?;
    let submit = |ring: &mut Ring, slot: u64, at: u64| -> Result<()> {
        let buf = (BufId(0), slot * w.block);
        if w.writes() {
            ring.write((FileId(0), at), buf, len, slot)?;
        } else {
            ring.read((FileId(0), at), buf, len, slot)?;
        }
        Ok(())
    };
    let start = Instant::now();
    for slot in 0..u64::from(w.depth) {
        let at = next(&mut rng);
        submit(&mut ring, slot, at)?;
    }
    let mut ios = 0u64;
    let mut done = Vec::with_capacity(w.depth as usize);
    while ring.in_flight() > 0 {
        done.clear();
        ring.reap(&mut done, (w.depth as usize / 8).max(1))?;
        let going = start.elapsed() < time;
        for c in &done {
            ring.check(c)?;
            ios += 1;
            if going {
                let at = next(&mut rng);
                submit(&mut ring, c.user_data, at)?;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(side(ios, seconds, w.block))
}

/// I/Os and milliseconds of `dir` (`read` or `write`) in fio's JSON output (which may follow
/// notes on the same stream).
fn fio_counts(stdout: &str, dir: &str) -> std::result::Result<(u64, u64), String> {
    let json = stdout
        .find('{')
        .map(|i| &stdout[i..])
        .ok_or("no JSON in its output")?;
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("its JSON: {e}"))?;
    let job = &v["jobs"][0][dir];
    let (Some(ios), Some(ms)) = (job["total_ios"].as_u64(), job["runtime"].as_u64()) else {
        return Err(format!("no jobs[0].{dir}.total_ios / runtime in its JSON"));
    };
    if ios == 0 || ms == 0 {
        return Err(format!("it did no I/O ({ios} I/Os in {ms} ms)"));
    }
    Ok((ios, ms))
}

/// A workload's row from its rounds: medians, and the spread of the paired ratios.
fn row(
    w: Workload,
    rounds: Vec<(Measured, Option<Measured>)>,
    fio_command: Option<String>,
) -> Result<StorageRow> {
    let median_side = |mut v: Vec<Measured>| {
        v.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        v.get(v.len().saturating_sub(1) / 2).copied()
    };
    let ours = median_side(rounds.iter().map(|r| r.0).collect())
        .ok_or_else(|| StorageBenchError::Bad("no rounds".into()))?;
    let fio = median_side(rounds.iter().filter_map(|r| r.1).collect());
    let ratios: Vec<f64> = rounds
        .iter()
        .filter_map(|(o, f)| f.map(|f| o.iops / f.iops))
        .collect();
    let spread = Spread::of(&ratios);
    let ratio = spread.map(|s| s.median);
    let ratio_range = spread.map(|s| (s.low, s.high));
    Ok(StorageRow {
        workload: w,
        ours,
        fio,
        ratio,
        ratio_range,
        rounds,
        fio_command,
    })
}

fn side(ios: u64, seconds: f64, block: u64) -> Measured {
    Measured {
        ios,
        seconds,
        iops: ios as f64 / seconds,
        mb_s: (ios * block) as f64 / seconds / 1e6,
        device: None,
    }
}

/// fio with the same pattern: io_uring, O_DIRECT, fixed buffers, registered files.
fn fio_side(
    bin: &Path,
    path: &Path,
    size: u64,
    w: Workload,
    time: Duration,
) -> Result<(Measured, String)> {
    let args = vec![
        "--name=dmaplane".to_string(),
        format!("--filename={}", path.display()),
        format!("--size={size}"),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--fixedbufs".into(),
        "--registerfiles".into(),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.block),
        format!("--iodepth={}", w.depth),
        "--numjobs=1".into(),
        "--time_based".into(),
        format!("--runtime={}ms", time.as_millis().max(1)),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ];
    let cmd = format!("{} {}", bin.display(), args.join(" "));
    let out = Command::new(bin)
        .args(&args)
        .output()
        .map_err(|e| StorageBenchError::Fio(format!("{cmd}: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(StorageBenchError::Fio(format!(
            "{cmd} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let dir = if w.writes() { "write" } else { "read" };
    let (ios, ms) =
        fio_counts(&stdout, dir).map_err(|why| StorageBenchError::Fio(format!("{cmd}: {why}")))?;
    Ok((side(ios, ms as f64 / 1e3, w.block), cmd))
}

#[cfg(test)]
mod tests {
    use super::{Measured, Workload, fio_counts, row, side};

    #[test]
    fn any_shape_in_fios_words_and_bad_ones_named() {
        use super::{Rw, Workload};
        assert_eq!("randwrite".parse::<Rw>(), Ok(Rw::RandWrite));
        assert!("randrw".parse::<Rw>().unwrap_err().contains("randread"));
        let w = Workload::new(Rw::RandWrite, 16 << 10, 32).unwrap();
        assert!(w.writes() && w.random());
        assert!(
            Workload::new(Rw::Read, 1000, 1)
                .unwrap_err()
                .contains("--bs 1000")
        );
        assert!(
            Workload::new(Rw::Read, 4096, 0)
                .unwrap_err()
                .contains("--depth 0")
        );
        assert!(
            Workload::new(Rw::Read, 64 << 20, 64)
                .unwrap_err()
                .contains("4096 MiB")
        );
    }

    #[test]
    fn a_row_is_the_median_of_paired_rounds_and_their_spread() {
        let s = |iops: u64| side(iops, 1.0, 4096);
        let rounds: Vec<(Measured, Option<Measured>)> = vec![
            (s(90), Some(s(100))),
            (s(120), Some(s(100))),
            (s(50), Some(s(100))),
            (s(100), Some(s(100))),
        ];
        let r = row(Workload::ALL[0], rounds, None).unwrap();
        assert_eq!(r.ratio, Some(0.95));
        assert_eq!(r.ratio_range, Some((0.5, 1.2)));
        assert_eq!(r.ours.ios, 90);
        assert_eq!(r.rounds.len(), 4);
        let alone = row(Workload::ALL[0], vec![(s(7), None)], None).unwrap();
        assert_eq!(
            (alone.ratio, alone.ratio_range, alone.fio.is_none()),
            (None, None, true)
        );
    }

    #[test]
    fn fio_json_is_read_and_bad_output_named() {
        let out = "note: both iodepth and iodepth_batch set\n{\"jobs\": [{\"read\": {\"total_ios\": 1000, \"runtime\": 2000}, \"write\": {\"total_ios\": 0, \"runtime\": 0}}]}";
        assert_eq!(fio_counts(out, "read"), Ok((1000, 2000)));
        assert!(fio_counts(out, "write").unwrap_err().contains("did no I/O"));
        assert!(
            fio_counts("fio: engine io_uring not loadable", "read")
                .unwrap_err()
                .contains("no JSON")
        );
        assert!(
            fio_counts("{\"jobs\": []}", "read")
                .unwrap_err()
                .contains("jobs[0].read")
        );
    }
}
