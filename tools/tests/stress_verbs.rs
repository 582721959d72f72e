//! `stress revoke --backend verbs` where it cannot run: a clear error and a failing exit status,
//! never a panic or a silent pass. (Where it can run — the qemu testbed — it is a testbed step.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn verbs_stress_without_the_feature_or_a_device_fails_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_dmaplane"))
        .args(["stress", "revoke", "--backend", "verbs", "--revokes", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "verbs") {
        // Built with verbs: on a machine with an RDMA device this would run; skip there.
        if out.status.success() {
            eprintln!("an RDMA device is present: the stress ran");
            return;
        }
        assert!(
            err.contains("RDMA") || err.contains("udmabuf") || err.contains("libibverbs"),
            "{err}"
        );
    } else {
        assert!(!out.status.success());
        assert!(err.contains("needs the `verbs` feature"), "{err}");
        assert!(err.contains("--features verbs"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}
