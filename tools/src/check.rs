//! One row of `dmaplane doctor`'s report: what was checked, how it went, and what to do. The
//! RDMA, GPU and storage checks all make rows of this shape.

use serde::Serialize;

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Missing,
    Error,
    Unsupported,
}

impl CheckStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Missing => "missing",
            CheckStatus::Error => "error",
            CheckStatus::Unsupported => "unsupported",
        }
    }
}

/// One row: what was checked, how it went, and (unless ok) what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `rdma`, `udmabuf`, `dma-heap`, `io_uring`, `storage`, `cuda`, `gpu`, `p2p`.
    pub component: &'static str,
    /// The device, node or call this row is about.
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
    /// What to do; `None` for rows that are ok.
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(
        component: &'static str,
        name: impl Into<String>,
        detail: impl Into<String>,
    ) -> Check {
        Check {
            component,
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn not_ok(
        component: &'static str,
        name: impl Into<String>,
        status: CheckStatus,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            component,
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}
