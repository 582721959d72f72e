//! A caller's buffer exported by process VA: handed back only after every importer acked.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestImporter;
use dmaplane_core::revoke::ImporterKind;
use dmaplane_core::user::{UserBuffer, UserBufferError};
use dmaplane_core::{Accept, Access, AddrSpace, SpaceKind};

const DEADLINE: Duration = Duration::from_millis(100);

fn accepts() -> [Accept; 1] {
    [Accept::new(SpaceKind::ProcessVa, Access::READ_WRITE)]
}

#[test]
fn importers_get_the_callers_own_addresses_and_the_buffer_comes_back_after_their_ack() {
    let buf: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let ptr = buf.as_ptr() as u64;
    let ub = UserBuffer::new("kv", buf).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let att = ub.attach(imp.clone(), &accepts()).unwrap();
    let map = att.map().unwrap();
    assert_eq!(map.list.space(), AddrSpace::ProcessVa);
    assert_eq!(
        map.list.ranges()[0].addr,
        ptr,
        "zero-copy: the caller's allocation"
    );
    assert_eq!(
        map.list.ranges()[0].len,
        10_000,
        "unaligned length, not rounded up"
    );
    assert!(ub.write(9_990, b"0123456789"));
    assert!(!ub.write(9_991, b"0123456789"), "out of bounds refused");
    imp.finished();
    let back = ub.into_vec(DEADLINE).unwrap();
    assert_eq!(back.as_ptr() as u64, ptr);
    assert_eq!(&back[9_990..], b"0123456789");
    assert_eq!(back[17], 17);
    assert!(imp.invalidations() >= 1, "revoked before being handed back");
}

#[test]
fn a_buffer_whose_importer_ignores_the_revoke_is_leaked_not_handed_back() {
    let ub = UserBuffer::new("held", vec![1u8; 4096]).unwrap();
    let liar = Arc::new(TestImporter::new("liar-nic", ImporterKind::Pinned, true));
    let _att = ub.attach(liar, &accepts()).unwrap();
    let err = ub.into_vec(DEADLINE).unwrap_err();
    let UserBufferError::Unacked { name, report } = &err;
    assert_eq!(name, "held");
    assert_eq!(report.timed_out(), ["liar-nic"]);
    assert!(err.to_string().contains("leaked"), "{err}");
}

#[test]
fn dropping_it_revokes_first() {
    let ub = UserBuffer::new("dropped", vec![0u8; 4096]).unwrap();
    let imp = Arc::new(TestImporter::new("nic0", ImporterKind::Pinned, false));
    let _att = ub.attach(imp.clone(), &accepts()).unwrap();
    imp.finished();
    drop(ub);
    assert_eq!(imp.invalidations(), 1);
    assert!(UserBuffer::new("empty", Vec::new()).is_err());
}
