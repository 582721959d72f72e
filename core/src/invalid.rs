//! Bad input, said the same way by every crate: what the value was for, the field that held
//! it, the value, and what is wrong with it or what is accepted. Never a panic, never silent
//! truncation: the caller learns which field to fix.

use std::fmt;

/// A caller- or peer-supplied value that was refused. Each crate's error has a variant
/// holding one (`GpuError::Invalid`, `StorageError::Invalid`, `dmaplane::Error::Invalid`), so a
/// refusal crosses the layers unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// What the value was for (`agent a`, `registration of pool`); empty where the field says
    /// enough.
    pub what: String,
    /// The parameter or field that held it.
    pub field: &'static str,
    /// The value given, as text.
    pub value: String,
    /// What is wrong with it, or what is accepted.
    pub why: String,
}

impl Invalid {
    pub fn new(
        what: impl Into<String>,
        field: &'static str,
        value: impl fmt::Display,
        why: impl Into<String>,
    ) -> Invalid {
        Invalid {
            what: what.into(),
            field,
            value: value.to_string(),
            why: why.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.what.is_empty() {
            write!(f, "{}: ", self.what)?;
        }
        write!(f, "`{}` = {}: {}", self.field, self.value, self.why)
    }
}

impl std::error::Error for Invalid {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_names_what_the_field_the_value_and_why() {
        let e = Invalid::new("registration of pool", "range", "[0x0, +0x0)", "empty");
        assert_eq!(
            e.to_string(),
            "registration of pool: `range` = [0x0, +0x0): empty"
        );
        assert_eq!(
            Invalid::new("", "size", 0, "at least one byte").to_string(),
            "`size` = 0: at least one byte"
        );
    }
}
