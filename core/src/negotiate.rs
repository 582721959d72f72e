//! Offer / Accept negotiation: which address space and access mode an attachment uses.
//!
//! The exporter offers the address spaces it can produce, best first; the importer lists what it
//! can consume, best first. [`negotiate`] takes the exporter's first offer that some accept takes
//! (the exporter knows best which representation is cheapest for its memory), and says for every
//! earlier offer why each accept refused it. No match is an error naming both sides — never a
//! silent bounce.

use std::fmt;

use serde::Serialize;

use crate::addr::{AddrSpace, SpaceKind};
use crate::hints::{Access, Caching, Confidentiality, Hints, MemKind, Route, Snoop};

/// One representation an exporter can produce for a given importer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub space: AddrSpace,
    pub hints: Hints,
}

/// One representation an importer can consume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Accept {
    pub space: SpaceKind,
    /// Whether the importer can target MMIO (`DMA_ATTR_MMIO`).
    pub mmio: bool,
    /// Cache attributes the importer can honour.
    pub caching: Vec<Caching>,
    /// Whether the importer can issue no-snoop transactions when required.
    pub no_snoop: bool,
    /// Whether the importer may touch confidential-computing private memory.
    pub private: bool,
    /// Rights the importer needs.
    pub access: Access,
    /// Routes the importer can use.
    pub routes: Vec<Route>,
}

impl Accept {
    /// Accepts everything in `space` that needs no special handling (memory, write-back, snoop,
    /// shared), with the given access, over any P2P-capable route.
    pub fn new(space: SpaceKind, access: Access) -> Accept {
        Accept {
            space,
            mmio: false,
            caching: vec![Caching::WriteBack],
            no_snoop: false,
            private: false,
            access,
            routes: vec![Route::Local, Route::BusAddr, Route::ThruHostBridge],
        }
    }

    /// Also accept MMIO with write-combining or uncached mappings and no-snoop (a P2P-capable DMA engine).
    pub fn with_mmio(mut self) -> Accept {
        self.mmio = true;
        self.no_snoop = true;
        for c in [Caching::WriteCombining, Caching::Uncached] {
            if !self.caching.contains(&c) {
                self.caching.push(c);
            }
        }
        self
    }

    pub fn with_routes(mut self, routes: &[Route]) -> Accept {
        self.routes = routes.to_vec();
        self
    }

    /// Every reason this accept refuses `offer`; empty when it takes it.
    pub fn refusals(&self, offer: &Offer) -> Vec<Refusal> {
        let mut why = Vec::new();
        let h = &offer.hints;
        if offer.space.kind() != self.space {
            why.push(Refusal::Space {
                offered: offer.space.kind(),
                accepted: self.space,
            });
        }
        if h.mem == MemKind::Mmio && !self.mmio {
            why.push(Refusal::Hints {
                field: "mem",
                offered: "mmio".into(),
                accepted: "memory".into(),
            });
        }
        if !self.caching.contains(&h.caching) {
            why.push(Refusal::Hints {
                field: "caching",
                offered: format!("{:?}", h.caching),
                accepted: format!("{:?}", self.caching),
            });
        }
        if h.snoop == Snoop::NoSnoop && !self.no_snoop {
            why.push(Refusal::Hints {
                field: "snoop",
                offered: "no-snoop".into(),
                accepted: "snoop".into(),
            });
        }
        if h.confidentiality == Confidentiality::Private && !self.private {
            why.push(Refusal::Hints {
                field: "confidentiality",
                offered: "private".into(),
                accepted: "shared".into(),
            });
        }
        if !h.access.contains(self.access) {
            why.push(Refusal::Access {
                granted: h.access,
                needed: self.access,
            });
        }
        if !self.routes.contains(&h.route) {
            why.push(Refusal::Route {
                route: h.route,
                accepted: self.routes.clone(),
            });
        }
        why
    }
}

/// Why one accept refused one offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Refusal {
    Space {
        offered: SpaceKind,
        accepted: SpaceKind,
    },
    Hints {
        field: &'static str,
        offered: String,
        accepted: String,
    },
    Access {
        granted: Access,
        needed: Access,
    },
    Route {
        route: Route,
        accepted: Vec<Route>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Space { offered, accepted } => {
                write!(f, "space: offered {offered}, accepts {accepted}")
            }
            Refusal::Hints {
                field,
                offered,
                accepted,
            } => write!(f, "hints.{field}: offered {offered}, accepts {accepted}"),
            Refusal::Access { granted, needed } => {
                write!(f, "access: granted {granted}, needs {needed}")
            }
            Refusal::Route { route, accepted } => {
                let names: Vec<&str> = accepted.iter().map(|r| r.as_str()).collect();
                write!(f, "route: {route}, accepts {}", names.join("|"))
            }
        }
    }
}

/// An offer the negotiation passed over, with each accept's reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedOffer {
    pub offer_index: usize,
    pub offer: Offer,
    /// `(accept index, reasons)` for every accept.
    pub reasons: Vec<(usize, Vec<Refusal>)>,
}

impl fmt::Display for RefusedOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "offer {} ({})", self.offer_index, self.offer.space)?;
        for (a, why) in &self.reasons {
            let why: Vec<String> = why.iter().map(|r| r.to_string()).collect();
            write!(f, "; accept {a} refuses: {}", why.join(", "))?;
        }
        Ok(())
    }
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    pub offer_index: usize,
    pub accept_index: usize,
    pub offer: Offer,
    /// Earlier offers and why they were refused, in offer order.
    pub refused: Vec<RefusedOffer>,
}

impl Negotiated {
    /// One line: what was taken and why earlier offers were not.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "took offer {} ({}, route {}) with accept {}",
            self.offer_index, self.offer.space, self.offer.hints.route, self.accept_index
        );
        for r in &self.refused {
            s.push_str("; refused ");
            s.push_str(&r.to_string());
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    #[error("exporter {exporter} made no offers to importer {importer}")]
    NoOffers { exporter: String, importer: String },
    #[error("importer {importer} lists no accepts for exporter {exporter}")]
    NoAccepts { exporter: String, importer: String },
    #[error(
        "no offer of exporter {exporter} is accepted by importer {importer}: {}",
        .refused.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" | ")
    )]
    NoMatch {
        exporter: String,
        importer: String,
        refused: Vec<RefusedOffer>,
    },
}

/// Pick the exporter's first offer that one of the importer's accepts takes.
pub fn negotiate(
    exporter: &str,
    offers: &[Offer],
    importer: &str,
    accepts: &[Accept],
) -> Result<Negotiated, NegotiateError> {
    if offers.is_empty() {
        return Err(NegotiateError::NoOffers {
            exporter: exporter.into(),
            importer: importer.into(),
        });
    }
    if accepts.is_empty() {
        return Err(NegotiateError::NoAccepts {
            exporter: exporter.into(),
            importer: importer.into(),
        });
    }
    let mut refused = Vec::new();
    for (offer_index, offer) in offers.iter().enumerate() {
        let mut reasons = Vec::with_capacity(accepts.len());
        for (accept_index, accept) in accepts.iter().enumerate() {
            let why = accept.refusals(offer);
            if why.is_empty() {
                tracing::debug!(exporter, importer, offer_index, accept_index, "negotiated");
                return Ok(Negotiated {
                    offer_index,
                    accept_index,
                    offer: *offer,
                    refused,
                });
            }
            reasons.push((accept_index, why));
        }
        refused.push(RefusedOffer {
            offer_index,
            offer: *offer,
            reasons,
        });
    }
    Err(NegotiateError::NoMatch {
        exporter: exporter.into(),
        importer: importer.into(),
        refused,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn bar_offer(route: Route) -> Offer {
        Offer {
            space: AddrSpace::PciBus {
                root: 0,
                bus_offset: 0,
            },
            hints: Hints::device_bar(route),
        }
    }

    fn host_offer() -> Offer {
        Offer {
            space: AddrSpace::ProcessVa,
            hints: Hints::HOST_MEMORY,
        }
    }

    #[test]
    fn takes_first_acceptable_offer_and_explains_the_rest() {
        let offers = [bar_offer(Route::BusAddr), host_offer()];
        // An importer that cannot do MMIO: the BAR offer is refused for its hints.
        let accepts = [Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE)];
        let n = negotiate("gpu0", &offers, "nic0", &accepts).unwrap();
        assert_eq!(n.offer_index, 1);
        assert_eq!(n.refused.len(), 1);
        let reasons = &n.refused[0].reasons[0].1;
        assert!(reasons.contains(&Refusal::Space {
            offered: SpaceKind::PciBus,
            accepted: SpaceKind::ProcessVa
        }));
        assert!(
            reasons
                .iter()
                .any(|r| matches!(r, Refusal::Hints { field: "mem", .. }))
        );
        assert!(n.summary().contains("refused offer 0"), "{}", n.summary());

        let p2p = [Accept::new(SpaceKind::PciBus, Access::READ_WRITE).with_mmio()];
        let n = negotiate("gpu0", &offers, "nic0", &p2p).unwrap();
        assert_eq!((n.offer_index, n.accept_index), (0, 0));
    }

    #[test]
    fn refuses_for_access_and_route() {
        let mut o = bar_offer(Route::NotSupported);
        o.hints.access = Access::READ;
        let a = [Accept::new(SpaceKind::PciBus, Access::READ_WRITE).with_mmio()];
        let e = negotiate("gpu1", &[o], "nic0", &a).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("exporter gpu1"), "{msg}");
        assert!(msg.contains("importer nic0"), "{msg}");
        assert!(
            msg.contains("access: granted read, needs read-write"),
            "{msg}"
        );
        assert!(msg.contains("route: not-supported"), "{msg}");
    }

    #[test]
    fn empty_sides_are_errors() {
        assert!(matches!(
            negotiate(
                "e",
                &[],
                "i",
                &[Accept::new(SpaceKind::CpuPhys, Access::READ)]
            ),
            Err(NegotiateError::NoOffers { .. })
        ));
        assert!(matches!(
            negotiate("e", &[host_offer()], "i", &[]),
            Err(NegotiateError::NoAccepts { .. })
        ));
    }

    fn arb_offer() -> impl Strategy<Value = Offer> {
        (0..3u8, any::<bool>(), 0..4u8, 1..4u8).prop_map(|(s, mmio, route, acc)| {
            let space = match s {
                0 => AddrSpace::CpuPhys,
                1 => AddrSpace::ProcessVa,
                _ => AddrSpace::PciBus {
                    root: 0,
                    bus_offset: 0,
                },
            };
            let route = [
                Route::Local,
                Route::BusAddr,
                Route::ThruHostBridge,
                Route::NotSupported,
            ][route as usize];
            let hints = if mmio {
                Hints::device_bar(route)
            } else {
                Hints::HOST_MEMORY.with_route(route)
            };
            Offer {
                space,
                hints: hints.with_access(access_from(acc)),
            }
        })
    }

    fn access_from(bits: u8) -> Access {
        match bits {
            1 => Access::READ,
            2 => Access::WRITE,
            _ => Access::READ_WRITE,
        }
    }

    fn arb_accept() -> impl Strategy<Value = Accept> {
        (0..3u8, any::<bool>(), 1..4u8).prop_map(|(s, mmio, acc)| {
            let space = [SpaceKind::CpuPhys, SpaceKind::ProcessVa, SpaceKind::PciBus][s as usize];
            let a = Accept::new(space, access_from(acc));
            if mmio { a.with_mmio() } else { a }
        })
    }

    proptest! {
        /// The result is the first offer any accept takes; every earlier offer is refused by all.
        #[test]
        fn negotiation_is_first_match(offers in proptest::collection::vec(arb_offer(), 1..5),
                                      accepts in proptest::collection::vec(arb_accept(), 1..4)) {
            let first = offers.iter().enumerate().find_map(|(i, o)| {
                accepts.iter().position(|a| a.refusals(o).is_empty()).map(|j| (i, j))
            });
            match (negotiate("e", &offers, "i", &accepts), first) {
                (Ok(n), Some((i, j))) => {
                    prop_assert_eq!((n.offer_index, n.accept_index), (i, j));
                    prop_assert_eq!(n.refused.len(), i);
                    for r in &n.refused {
                        prop_assert!(r.reasons.iter().all(|(_, why)| !why.is_empty()));
                    }
                }
                (Err(NegotiateError::NoMatch { refused, .. }), None) => {
                    prop_assert_eq!(refused.len(), offers.len());
                }
                (got, want) => prop_assert!(false, "got {:?}, want {:?}", got, want),
            }
        }
    }
}
