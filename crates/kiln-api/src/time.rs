//! Timestamps on the wire: RFC 3339 in UTC with exactly six fractional digits and a
//! `+00:00` offset (`2026-12-04T15:24:23.123456+00:00`).
//!
//! Why this form: Python 3.9 and 3.10's `datetime.fromisoformat`, which the official
//! Python SDK's models go through, accepts 3 or 6 fractional digits and no `Z`; chrono's
//! default (`to_rfc3339`) writes up to 9 digits. Reading accepts any RFC 3339 time.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// The wire form of a time.
pub fn format(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// Parses any RFC 3339 time into UTC.
pub fn parse(s: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc))
}

/// `#[serde(with = "kiln_api::time")]` for a `DateTime<Utc>` field.
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(t))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(serde::de::Error::custom)
}

/// `#[serde(with = "kiln_api::time::option")]` for an `Option<DateTime<Utc>>` field.
pub mod option {
    use super::*;

    /// See [`super::serialize`]; `None` is `null`.
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format(t)),
            None => s.serialize_none(),
        }
    }

    /// See [`super::deserialize`]; `null` or a missing field is `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    #[test]
    fn six_digits_and_an_offset_python_3_9_reads() {
        let t = Utc.timestamp_opt(1_796_400_000, 123_456_789).unwrap();
        assert_eq!(format(&t), "2026-12-04T16:00:00.123456+00:00");
        let whole = Utc.timestamp_opt(1_796_400_000, 0).unwrap();
        assert_eq!(format(&whole), "2026-12-04T16:00:00.000000+00:00");
    }

    #[test]
    fn reads_any_rfc3339() {
        let t = parse("2026-12-04T17:00:00.5+01:00").unwrap();
        assert_eq!(format(&t), "2026-12-04T16:00:00.500000+00:00");
        assert!(parse("2026-12-04T16:00:00Z").is_ok());
        assert!(parse("yesterday").is_err());
    }
}
