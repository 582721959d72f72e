//! `dmaplane doctor`'s storage rows: whether dmaplane-storage's ring can be set up here (fixed
//! buffers in a sparse table, registered files, no dropped completions), whether the working
//! directory's file system takes `O_DIRECT` and with which alignment, and the locked-memory limit
//! registered buffers count against.

use std::sync::Arc;

use dmaplane_storage::{DirectFile, OpenOptions, Ring, StorageError};

use crate::check::{Check, CheckStatus};

const C: &str = "storage";

pub fn checks(out: &mut Vec<Check>) {
    let probe = std::env::current_dir()
        .unwrap_or_else(|_| ".".into())
        .join(format!(".dmaplane-doctor-{}", std::process::id()));
    let file = DirectFile::open(
        &probe,
        OpenOptions {
            write: true,
            create: true,
            buffered_fallback: false,
        },
    );
    out.push(o_direct(&file, &probe));
    out.push(ring(file.ok().map(Arc::new)));
    let _ = std::fs::remove_file(&probe);
    out.push(memlock());
}

fn o_direct(file: &Result<DirectFile, StorageError>, probe: &std::path::Path) -> Check {
    let dir = probe
        .parent()
        .map_or_else(|| ".".to_string(), |d| d.display().to_string());
    match file {
        Ok(f) => {
            let a = f.align();
            Check::ok(
                C,
                "O_DIRECT",
                format!(
                    "{dir} takes O_DIRECT: buffers aligned to {} B, offsets and lengths to {} B ({})",
                    a.mem,
                    a.offset,
                    if a.reported {
                        "statx STATX_DIOALIGN"
                    } else {
                        "assumed: the kernel reports none"
                    }
                ),
            )
        }
        Err(e @ StorageError::NoDirect { .. }) => Check::not_ok(
            C,
            "O_DIRECT",
            CheckStatus::Unsupported,
            e.to_string(),
            "put files for bench storage and loads on a file system that takes O_DIRECT (ext4, \
             xfs, btrfs), e.g. `bench storage --dir /path/on/ext4`",
        ),
        Err(e) => Check::not_ok(
            C,
            "O_DIRECT",
            CheckStatus::Error,
            e.to_string(),
            format!("run doctor from a directory this user may create files in (tried {dir})"),
        ),
    }
}

fn ring(file: Option<Arc<DirectFile>>) -> Check {
    const NAME: &str = "ring";
    let mut b = Ring::builder().depth(4).buffer(4096).import_slots(1);
    if let Some(f) = file.clone() {
        b = b.file(f);
    }
    match b.build() {
        Ok(_) => Check::ok(
            C,
            NAME,
            format!(
                "a 4-entry ring: a registered 4 KiB buffer, a sparse slot for imports{}, no \
                 dropped completions (IORING_FEAT_NODROP)",
                if file.is_some() {
                    ", a registered O_DIRECT file"
                } else {
                    ""
                }
            ),
        ),
        Err(e) => Check::not_ok(
            C,
            NAME,
            CheckStatus::Error,
            e.to_string(),
            "dmaplane-storage needs Linux 5.19 (sparse buffer tables, COOP_TASKRUN); see the \
             io_uring row for whether io_uring is allowed at all",
        ),
    }
}

fn memlock() -> Check {
    const NAME: &str = "RLIMIT_MEMLOCK";
    let lim = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    let show =
        |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |b| format!("{} KiB", b >> 10));
    let detail = format!(
        "soft {}, hard {} (registered buffers are pinned, and count against it unless the \
         process has CAP_IPC_LOCK)",
        show(lim.current),
        show(lim.maximum)
    );
    match lim.current {
        Some(cur) if cur < 64 << 20 && rustix::process::geteuid().as_raw() != 0 => Check::not_ok(
            C,
            NAME,
            CheckStatus::Error,
            detail,
            "raise it for the user (`ulimit -l unlimited`, or `memlock` in \
             /etc/security/limits.conf, or LimitMEMLOCK= in the service's unit)",
        ),
        _ => Check::ok(C, NAME, detail),
    }
}
