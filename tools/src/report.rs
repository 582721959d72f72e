//! `--report FILE`: what a bench printed, kept with how and where it was measured, as a
//! markdown page. Numbers live in reports like this one (written by the run that measured
//! them), not in prose that goes stale.
//!
//! The bench commands print through [`say!`], which prints the line and, while a report is
//! being kept, appends it to the transcript.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use dmaplane_core::sync::lock;

/// The lines printed since [`start`], while a report is being kept.
static TRANSCRIPT: Mutex<Option<String>> = Mutex::new(None);

/// Print a line, and keep it for the report if one is being kept.
macro_rules! say {
    () => {
        $crate::report::line("")
    };
    ($($arg:tt)*) => {
        $crate::report::line(&format!($($arg)*))
    };
}
pub(crate) use say;

pub fn line(s: &str) {
    println!("{s}");
    if let Some(t) = lock(&TRANSCRIPT).as_mut() {
        t.push_str(s);
        t.push('\n');
    }
}

/// Keep what is printed from now on.
pub fn start() {
    *lock(&TRANSCRIPT) = Some(String::new());
}

/// Write what was printed since [`start`] to `path` as markdown: the command, when, on what
/// machine, and the output (`json` says which fence it goes in).
pub fn finish(path: &Path, json: bool) -> Result<()> {
    let transcript = lock(&TRANSCRIPT).take().unwrap_or_default();
    let args: Vec<String> = std::env::args().collect();
    let mut md = String::new();
    let title = args
        .iter()
        .skip(1)
        .take_while(|a| !a.starts_with('-'))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(md, "# dmaplane {title}\n");
    let _ = writeln!(md, "- command: `dmaplane {}`", shell_words(&args[1..]));
    let _ = writeln!(md, "- measured: {} (UTC)", utc_now());
    let _ = writeln!(md, "- dmaplane: {}", env!("CARGO_PKG_VERSION"));
    for (k, v) in machine() {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "\nEvery ratio is against a reference measured in the same run (see docs/bench.md).\n"
    );
    let _ = writeln!(md, "```{}", if json { "json" } else { "text" });
    md.push_str(&transcript);
    if !transcript.ends_with('\n') {
        md.push('\n');
    }
    md.push_str("```\n");
    std::fs::write(path, md).with_context(|| format!("--report {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// The arguments as one would type them (quoted where they hold spaces).
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine, as far as this process can see it: kernel, CPU model and count, memory.
fn machine() -> Vec<(&'static str, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = Vec::new();
    let kernel = read("/proc/sys/kernel/osrelease");
    if !kernel.trim().is_empty() {
        out.push(("kernel", kernel.trim().to_string()));
    }
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    out.push((
        "cpus",
        match model {
            Some(m) => format!("{cpus} × {m}"),
            None => cpus.to_string(),
        },
    ));
    if let Some(kib) = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
    {
        out.push(("memory", crate::units::bytes(kib * 1024)));
    }
    out
}

/// Now, as `YYYY-MM-DD HH:MM:SS`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_the_calendar_s() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_794), (2026, 12, 7));
    }

    #[test]
    fn a_report_holds_the_command_the_machine_and_what_was_printed() {
        let path = std::env::temp_dir().join(format!("dmaplane-report-{}.md", std::process::id()));
        start();
        say!("ratio {}%", 97);
        finish(&path, false).unwrap();
        let md = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(md.starts_with("# dmaplane"), "{md}");
        assert!(md.contains("- measured: "), "{md}");
        assert!(md.contains("- cpus: "), "{md}");
        assert!(md.contains("```text\nratio 97%\n```"), "{md}");
        // Nothing is kept once the report is written.
        assert!(lock(&TRANSCRIPT).is_none());
    }
}
