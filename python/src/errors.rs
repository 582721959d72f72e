//! dmaplane's errors as Python exceptions: the `dmaplane.errors` classes, with the fields a
//! caller branches on as attributes — never integer codes or strings to compare.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The exception for `e`, an instance of the class in `dmaplane/errors.py` that matches it.
pub(crate) fn to_py(e: dmaplane::Error) -> PyErr {
    Python::attach(|py| build(py, &e).unwrap_or_else(|err| err))
}

/// As [`to_py`], for a failed registration: what is not a caller's mistake is a
/// `RegistrationError`.
pub(crate) fn registration(e: dmaplane::Error) -> PyErr {
    match e {
        dmaplane::Error::Invalid(_) => to_py(e),
        other if negotiation(&other).is_some() => to_py(other),
        other => Python::attach(|py| {
            raise(py, "RegistrationError", &other.to_string(), PyDict::new(py))
                .unwrap_or_else(|err| err)
        }),
    }
}

/// The negotiation behind `e`, when an exporter's offers were refused: (exporter, importer,
/// each refused offer with every accept's reasons, in words).
fn negotiation(e: &dmaplane::Error) -> Option<(String, String, Vec<String>)> {
    use dmaplane_core::AttachError as A;
    use dmaplane_core::negotiate::NegotiateError as N;
    let attach = match e {
        dmaplane::Error::Rdma(dmaplane_rdma::RdmaError::Attach(a)) => a,
        dmaplane::Error::Rdma(dmaplane_rdma::RdmaError::FellBack { tried, .. }) => {
            return Some((String::new(), String::new(), vec![tried.clone()]));
        }
        dmaplane::Error::Gpu(dmaplane_gpu::GpuError::Attach(a)) => a,
        _ => return None,
    };
    match attach {
        A::Negotiate(N::NoMatch {
            exporter,
            importer,
            refused,
        }) => Some((
            exporter.clone(),
            importer.clone(),
            refused.iter().map(|r| r.to_string()).collect(),
        )),
        A::Negotiate(N::NoOffers { exporter, importer })
        | A::Negotiate(N::NoAccepts { exporter, importer }) => {
            Some((exporter.clone(), importer.clone(), vec![attach.to_string()]))
        }
        _ => None,
    }
}

fn build(py: Python<'_>, e: &dmaplane::Error) -> PyResult<PyErr> {
    use dmaplane::Error as E;
    let attrs = PyDict::new(py);
    if let Some((exporter, importer, refusals)) = negotiation(e) {
        attrs.set_item("exporter", exporter)?;
        attrs.set_item("importer", importer)?;
        attrs.set_item("refusals", refusals)?;
        return raise(py, "NegotiationError", &e.to_string(), attrs);
    }
    let class = match e {
        E::Revoked {
            side,
            region,
            name,
            epoch,
            why,
        } => {
            attrs.set_item("side", side.to_string())?;
            attrs.set_item("region", *region)?;
            attrs.set_item("name", name)?;
            attrs.set_item("epoch", *epoch)?;
            attrs.set_item("why", why)?;
            "RevokedError"
        }
        E::PeerLost { peer, why } => {
            attrs.set_item("peer", peer)?;
            attrs.set_item("why", why)?;
            "PeerLostError"
        }
        E::Stalled {
            transfer,
            peer,
            outstanding,
            total,
            ..
        } => {
            attrs.set_item("transfer", *transfer)?;
            attrs.set_item("peer", peer)?;
            attrs.set_item("outstanding", *outstanding)?;
            attrs.set_item("total", *total)?;
            "StalledError"
        }
        E::WaitTimeout { transfer, peer, .. } => {
            attrs.set_item("transfer", *transfer)?;
            attrs.set_item("peer", peer)?;
            "TimeoutError"
        }
        E::Invalid(i) => {
            attrs.set_item("field", i.field)?;
            attrs.set_item("value", &i.value)?;
            attrs.set_item("why", &i.why)?;
            "InvalidArgument"
        }
        E::Handshake { peer, .. } => {
            attrs.set_item("peer", peer)?;
            "ConnectError"
        }
        E::Metadata(_) => "ConnectError",
        E::Failed { transfer, peer, .. } => {
            attrs.set_item("transfer", *transfer)?;
            attrs.set_item("peer", peer)?;
            "TransferError"
        }
        _ => "Error",
    };
    raise(py, class, &e.to_string(), attrs)
}

fn raise(py: Python<'_>, class: &str, msg: &str, attrs: Bound<'_, PyDict>) -> PyResult<PyErr> {
    let errors = py.import("dmaplane.errors")?;
    let exc = errors.getattr(class)?.call((msg,), Some(&attrs))?;
    Ok(PyErr::from_value(exc))
}

/// A Python `InvalidArgument` naming `field` and `value`, for checks made here.
pub(crate) fn invalid(field: &str, value: impl std::fmt::Display, why: &str) -> PyErr {
    Python::attach(|py| {
        let attrs = PyDict::new(py);
        let made = (|| {
            attrs.set_item("field", field)?;
            attrs.set_item("value", value.to_string())?;
            attrs.set_item("why", why)?;
            raise(
                py,
                "InvalidArgument",
                &format!("{field} = {value}: {why}"),
                attrs,
            )
        })();
        made.unwrap_or_else(|err| err)
    })
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::negotiation;
    use dmaplane_core::AttachError;
    use dmaplane_core::negotiate::NegotiateError;

    #[test]
    fn a_refused_negotiation_is_found_under_the_layers_errors_and_others_are_not() {
        let e = dmaplane::Error::Rdma(dmaplane_rdma::RdmaError::Attach(AttachError::Negotiate(
            NegotiateError::NoAccepts {
                exporter: "gpu0".into(),
                importer: "nic1".into(),
            },
        )));
        let (exporter, importer, refusals) = negotiation(&e).expect("a negotiation");
        assert_eq!((exporter.as_str(), importer.as_str()), ("gpu0", "nic1"));
        assert!(refusals[0].contains("lists no accepts"), "{refusals:?}");
        let other = dmaplane::Error::Metadata("truncated".into());
        assert!(negotiation(&other).is_none());
    }
}
