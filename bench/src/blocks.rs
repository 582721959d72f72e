//! What preparing block lists saves: posting a READ of 64 blocks by index (from lists split
//! once, `Agent::read_blocks`) and posting a prepared READ again (`Prepared::post`), against
//! the same READ built from 64 hand-made descriptor pairs (`Region::desc` + `Peer::desc`, then
//! `Agent::read`) — measured in the same run, the three in turn, the order rotated each round.

use std::time::{Duration, Instant};

use dmaplane::{Agent, Desc, RemoteDesc, Testbed};
use serde::Serialize;

use crate::rounds::Spread;

/// What stops the measurement: the agents' errors, or no rounds to measure.
#[derive(Debug, thiserror::Error)]
pub enum BlocksError {
    #[error(transparent)]
    Agent(#[from] dmaplane::Error),
    #[error("block lists: {0} rounds (at least 1)")]
    Rounds(usize),
}

/// Blocks per READ, as a decode engine fetches a request's KV blocks.
pub const BATCH: usize = 64;

/// The three ways, in microseconds from the first descriptor made to the transfer posted.
#[derive(Debug, Clone, Serialize)]
pub struct PostRow {
    pub block: u64,
    pub batch: usize,
    pub rounds: usize,
    /// 64 hand-built descriptor pairs, then `Agent::read`.
    pub hand_built_us: Spread,
    /// `Agent::read_blocks` with 64 indices into lists prepared once.
    pub by_index_us: Spread,
    /// `Prepared::post` of a READ prepared once.
    pub prepared_us: Spread,
    /// Median by index over median hand-built.
    pub by_index_ratio: f64,
    /// Median prepared over median hand-built.
    pub prepared_ratio: f64,
}

/// `rounds` rounds of the three posts of a READ of [`BATCH`] blocks of `block` bytes between
/// two agents on `tb` (each post's transfer waited for outside the timing).
pub fn post_by_index(
    tb: &std::sync::Arc<Testbed>,
    block: u64,
    rounds: usize,
) -> Result<PostRow, BlocksError> {
    if rounds == 0 {
        return Err(BlocksError::Rounds(rounds));
    }
    let owner = Agent::builder("blocks-owner")
        .testbed(tb.clone())
        .nics(["nic0"])
        .build()?;
    let reader = Agent::builder("blocks-reader")
        .testbed(tb.clone())
        .nics(["nic1"])
        .build()?;
    let pool = owner.alloc_host("blocks-pool", 2 * BATCH as u64 * block)?;
    let _registered = owner.register(&pool)?;
    let peer = reader.connect(&owner.metadata_blob()?)?;
    let info = peer.wait_region("blocks-pool", Duration::from_secs(10))?;
    let mine = reader.register(&reader.alloc_host("blocks-dst", 2 * BATCH as u64 * block)?)?;
    // Scattered: block k of the request at pool block 2k+1, into slot 2k.
    let ids: Vec<usize> = (0..BATCH).map(|k| 2 * k + 1).collect();
    let slots: Vec<usize> = (0..BATCH).map(|k| 2 * k).collect();
    let theirs = peer.blocks(info.id, block)?;
    let local = mine.blocks(block)?;
    let prepared = reader.prepare_read(&peer, &local, &slots, &theirs, &ids)?;
    let wait = Duration::from_secs(30);
    let hand = || -> Result<f64, BlocksError> {
        let t0 = Instant::now();
        let l: Vec<Desc> = slots
            .iter()
            .map(|&s| mine.desc(s as u64 * block, block))
            .collect::<Result<_, _>>()?;
        let r: Vec<RemoteDesc> = ids
            .iter()
            .map(|&i| peer.desc(info.id, i as u64 * block, block))
            .collect::<Result<_, _>>()?;
        let t = reader.read(&peer, &l, &r, None)?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        t.wait(wait)?;
        Ok(us)
    };
    let by_index = || -> Result<f64, BlocksError> {
        let t0 = Instant::now();
        let t = reader.read_blocks(&peer, &local, &slots, &theirs, &ids, None)?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        t.wait(wait)?;
        Ok(us)
    };
    let again = || -> Result<f64, BlocksError> {
        let t0 = Instant::now();
        let t = prepared.post(None)?;
        let us = t0.elapsed().as_secs_f64() * 1e6;
        t.wait(wait)?;
        Ok(us)
    };
    let (mut h, mut x, mut p) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => h.push(hand()?),
                1 => x.push(by_index()?),
                _ => p.push(again()?),
            }
        }
    }
    let spread = |v: &[f64]| Spread::of(v).ok_or(BlocksError::Rounds(rounds));
    let (hand_built_us, by_index_us, prepared_us) = (spread(&h)?, spread(&x)?, spread(&p)?);
    Ok(PostRow {
        block,
        batch: BATCH,
        rounds,
        by_index_ratio: by_index_us.median / hand_built_us.median,
        prepared_ratio: prepared_us.median / hand_built_us.median,
        hand_built_us,
        by_index_us,
        prepared_us,
    })
}
