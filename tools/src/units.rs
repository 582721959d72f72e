//! Numbers for a person: bytes and times as the tables print them, and sizes as a person
//! types them.

/// Nanoseconds for a person: ns, us, ms or s.
pub fn ns(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} ns"),
        1_000..1_000_000 => format!("{:.1} us", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        _ => format!("{:.2} s", n as f64 / 1e9),
    }
}

/// Bytes for a person: whole binary units where they divide, one decimal past 10 of one.
pub fn bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 && (v / 1024.0).fract() == 0.0
        || (v >= 1024.0 * 10.0 && i < U.len() - 1)
    {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

/// A size in fio's words: bytes, or a number with `k`, `m`, `g` or `t` (powers of 1024, as fio
/// counts by default; `kib`, `KiB`, `kb` are taken alike).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: a size is a whole number, optionally with k, m, g or t"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?}: unit {unit:?} is not one of k, m, g, t")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_in_fios_words_and_bad_ones_named() {
        assert_eq!(parse_size("16k"), Ok(16 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("16q").unwrap_err().contains("unit \"q\""));
        assert!(parse_size("k").unwrap_err().contains("whole number"));
    }
}
