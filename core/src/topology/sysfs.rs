//! What sysfs says about a PCI function that the model needs: its memory BARs. Shared by
//! discovery (feature `hwloc`) and the backends that size a real device's BAR (CUDA's BAR1).

use super::Bar;

/// `IORESOURCE_MEM` in the flags column of sysfs `resource`.
const IORESOURCE_MEM: u64 = 0x200;

/// Memory BARs from a sysfs `resource` file: one `start end flags` line per resource, lines
/// 0..=5 being the BARs. Unused slots (the upper half of a 64-bit BAR included) are all zero;
/// I/O-port BARs and non-power-of-two sizes are skipped. Malformed lines are ignored.
pub fn parse_resource(text: &str) -> Vec<Bar> {
    let mut bars = Vec::new();
    for (index, line) in text.lines().take(6).enumerate() {
        let mut cols = line.split_whitespace().map(|c| {
            let c = c.trim_start_matches("0x");
            u64::from_str_radix(c, 16).ok()
        });
        let (Some(Some(start)), Some(Some(end)), Some(Some(flags))) =
            (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        if flags & IORESOURCE_MEM == 0 || end <= start {
            continue;
        }
        let Some(size) = (end - start).checked_add(1) else {
            continue;
        };
        let Ok(index) = u8::try_from(index) else {
            continue;
        };
        if size.is_power_of_two() {
            bars.push(Bar { index, size });
        }
    }
    bars
}
