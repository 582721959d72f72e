//! The PCI side of a CUDA device: its address as sysfs spells it and its BAR1 aperture.

use dmaplane_core::topology::sysfs::parse_resource;

use crate::backend::BAR1_INDEX;

/// `cuDeviceGetPCIBusId`'s `0000:3B:00.0` (or `00000000:3b:00.0`) as sysfs names the device:
/// lower case `dddd:bb:dd.f`. `None` when it is not a PCI address.
pub(super) fn normalize_bus_id(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let (domain, rest) = raw.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok()?;
    let func = u8::from_str_radix(func, 16).ok()?;
    if dev > 0x1f || func > 7 {
        return None;
    }
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// BAR1 of the PCI device `pci` (normalised address), from sysfs.
pub(super) fn bar1_size(pci: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{pci}/resource")).ok()?;
    bar1_of(&text)
}

fn bar1_of(resource: &str) -> Option<u64> {
    parse_resource(resource)
        .into_iter()
        .find(|b| b.index == BAR1_INDEX)
        .map(|b| b.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_are_normalised_to_sysfs_spelling() {
        assert_eq!(
            normalize_bus_id("0000:3B:00.0").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(
            normalize_bus_id("00000000:C1:1F.7\n").as_deref(),
            Some("0000:c1:1f.7")
        );
        assert_eq!(
            normalize_bus_id("10000:01:00.0").as_deref(),
            Some("10000:01:00.0")
        );
        for bad in [
            "",
            "0000:3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "zz:00:00.0",
            "0:100:0.0",
        ] {
            assert_eq!(normalize_bus_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn bar1_comes_from_its_resource_line() {
        // An H100: BAR0 16 MiB of registers, BAR1 128 GiB (64-bit, so line 2 is empty), BAR3.
        let text = "0x00000000c2000000 0x00000000c2ffffff 0x0000000000040200\n\
                    0x0000220000000000 0x0000221fffffffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000222000000000 0x0000222001ffffff 0x000000000014220c\n";
        assert_eq!(bar1_of(text), Some(128 << 30));
        let bars = parse_resource(text);
        assert_eq!(bars.len(), 3, "{bars:?}");
        assert_eq!(bar1_of(""), None);
        assert_eq!(bar1_of("garbage here\n0x10 0x0f 0x200\n"), None);
        // A BAR1 that is not memory (I/O ports) is no aperture.
        assert_eq!(bar1_of("0x0 0x0 0x0\n0x1000 0x1fff 0x100\n"), None);
    }
}
