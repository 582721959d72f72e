//! What a peer told this agent of its registrations: those it announced (bounded in count
//! and in the memory their descriptions take) and those it said are gone, so descriptors of
//! them are refused typed.

use std::collections::{BTreeMap, HashMap};

use crate::event::GoneWhy;
use crate::limits::{Limits, Refusal};
use crate::metadata::RegionInfo;

/// The registrations a peer told this agent of, bounded in count and in the memory their
/// descriptions take ([`Limits::regions`], [`Limits::region_bytes`]), and those it said are
/// gone (the newest [`GONE_KEPT`]).
#[derive(Debug, Default)]
pub(crate) struct Known {
    pub(crate) map: HashMap<u32, RegionInfo>,
    bytes: usize,
    pub(crate) gone: BTreeMap<u32, Gone>,
}

/// How many of a peer's gone registrations are remembered (to refuse their descriptors typed).
const GONE_KEPT: usize = 4096;

/// A registration the peer said is gone.
#[derive(Debug, Clone)]
pub(crate) struct Gone {
    pub(crate) name: String,
    pub(crate) epoch: u64,
    pub(crate) why: GoneWhy,
}

impl Known {
    /// What a peer's metadata lists, refused whole (naming the limit) when it is over one.
    pub(crate) fn from_metadata(
        regions: &[RegionInfo],
        limits: &Limits,
    ) -> std::result::Result<Known, (Refusal, String)> {
        let mut k = Known::default();
        for r in regions {
            k.insert(r.clone(), limits)?;
        }
        Ok(k)
    }

    /// Keep `info` (replacing an earlier description of the same id), unless that takes the
    /// peer past a limit.
    pub(crate) fn insert(
        &mut self,
        info: RegionInfo,
        limits: &Limits,
    ) -> std::result::Result<(), (Refusal, String)> {
        let old = self.map.get(&info.id).map_or(0, RegionInfo::footprint);
        if old == 0 && self.map.len() >= limits.regions {
            return Err((
                Refusal::Regions,
                format!(
                    "more than limits.regions ({}) registrations announced",
                    limits.regions
                ),
            ));
        }
        let bytes = self.bytes - old + info.footprint();
        if bytes > limits.region_bytes {
            return Err((
                Refusal::RegionBytes,
                format!(
                    "the registrations announced would take {bytes} bytes, more than \
                     limits.region_bytes ({})",
                    limits.region_bytes
                ),
            ));
        }
        self.bytes = bytes;
        self.gone.remove(&info.id);
        self.map.insert(info.id, info);
        Ok(())
    }

    /// The peer says `region` is gone: forgotten, and remembered as gone. `None` when it was
    /// not known (nothing to tell the application).
    pub(crate) fn forget(&mut self, region: u32, epoch: u64, why: GoneWhy) -> Option<Gone> {
        let info = self.map.remove(&region)?;
        self.bytes -= info.footprint();
        let g = Gone {
            name: info.name,
            epoch,
            why,
        };
        self.gone.insert(region, g.clone());
        while self.gone.len() > GONE_KEPT {
            self.gone.pop_first();
        }
        Some(g)
    }
}
