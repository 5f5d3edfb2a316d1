//! Human durations in specs ("30s", "1h30m", "7d"), kept as the user wrote them and parsed with
//! `humantime` when validated.

use std::{borrow::Cow, fmt, time::Duration as StdDuration};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// The pattern the CRD schemas enforce: one or more `<number><unit>` groups.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d|w))+$";

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

impl Duration {
    pub fn new(s: impl Into<String>) -> Self {
        Duration(s.into())
    }

    /// Parse to a std duration; errors say what is accepted.
    pub fn parse(&self) -> Result<StdDuration, String> {
        parse(&self.0)
    }

    /// Parse, refusing zero (a retention or threshold of 0s means "always", never what is meant).
    pub fn parse_positive(&self) -> Result<StdDuration, String> {
        let d = self.parse()?;
        if d.is_zero() {
            return Err("must be greater than zero".into());
        }
        Ok(d)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Duration(s.to_owned())
    }
}

/// A duration that passed validation: as the user wrote it (for messages) and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub text: String,
    pub value: StdDuration,
}

impl Given {
    /// (text, value), the shape retention and coverage take.
    pub fn pair(&self) -> (&str, StdDuration) {
        (&self.text, self.value)
    }
}

/// ```
/// assert_eq!(lockstep::core::duration::parse("7d").unwrap().as_secs(), 7 * 86_400);
/// assert!(lockstep::core::duration::parse("7 days").is_err());
/// ```
pub fn parse(s: &str) -> Result<StdDuration, String> {
    let ok_shape = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || "mshdw".contains(c))
        && s.chars().next().is_some_and(|c| c.is_ascii_digit())
        && !s.ends_with(|c: char| c.is_ascii_digit());
    if !ok_shape {
        return Err(format!(
            "{s:?} is not a duration; use a number and a unit, e.g. 30s, 5m, 24h, 7d (units: ms, s, m, h, d, w)"
        ));
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    if d > MAX {
        return Err(format!(
            "{s:?} is longer than the longest duration lockstep accepts ({})",
            format(MAX)
        ));
    }
    Ok(d)
}

/// The longest duration a spec may give: 100 years. PostgreSQL's `now() - interval` leaves its
/// timestamp range not far beyond (a retention of 10^6 days failed the purge with "timestamp out of
/// range" instead of being reported as an invalid spec).
pub const MAX: StdDuration = StdDuration::from_secs(36_500 * 86_400);

/// Render a duration the way users write them ("7d", "1h30m", "250ms").
pub fn format(d: StdDuration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{}", ms / size, unit));
            ms %= size;
        }
    }
    out
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "description": "A duration such as 30s, 5m, 24h or 7d (units: ms, s, m, h, d, w)."
        })
    }
}

/// How long until `key`'s next turn in a repeating `period`: each key has its own phase (from a
/// hash of it), and its turns are that phase plus whole periods since the epoch, at least 90% of
/// a period after `now` (as soon as the ±10% spread this replaced allowed; at most 1.9 periods
/// after a reconcile that came between turns). Work repeated per object this way is spread evenly
/// over the period, however the objects arrived (all at once when the operator starts), instead
/// of coming in one burst a spec change then waits behind. Pure.
pub fn phased(period: StdDuration, key: &str, now: std::time::SystemTime) -> StdDuration {
    let p = period.as_nanos().max(1);
    // FNV-1a: stable across builds and platforms.
    let hash = key
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut wait = (u128::from(hash) % p + p - since % p) % p;
    if wait < p / 10 * 9 {
        wait += p;
    }
    StdDuration::from_nanos(wait as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_durations_beyond_a_hundred_years() {
        assert_eq!(parse("36500d").unwrap(), MAX);
        let e = parse("36501d").unwrap_err();
        assert!(e.contains("longer than the longest"), "{e}");
        assert!(parse("1000000d").is_err());
    }

    #[test]
    fn parses_compact_forms() {
        assert_eq!(parse("30s").unwrap(), StdDuration::from_secs(30));
        assert_eq!(parse("7d").unwrap(), StdDuration::from_secs(7 * 86400));
        assert_eq!(parse("1h30m").unwrap(), StdDuration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), StdDuration::from_millis(250));
        assert_eq!(parse("2w").unwrap(), StdDuration::from_secs(14 * 86400));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "7", "d", "7 days", "-1s", "1.5h", "7D", "1y", "s30"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex::Regex::new(DURATION_PATTERN).unwrap();
        for s in ["30s", "7d", "1h30m", "250ms", "2w", "7", "7 days", "1y", "1.5h", ""] {
            assert_eq!(re.is_match(s), parse(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in ["7d", "1h30m", "250ms", "14d", "1d1h1m1s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }

    #[test]
    fn phased_turns_are_a_period_apart_spread_by_key_and_never_too_soon() {
        use std::time::UNIX_EPOCH;
        let period = StdDuration::from_secs(15);
        let t0 = UNIX_EPOCH + StdDuration::from_secs(1_700_000_000);
        let first = phased(period, "uid-a", t0);
        assert!(first >= period / 10 * 9 && first < period / 10 * 19, "{first:?}");
        // Asked again at its turn, the next one is one period later.
        assert_eq!(phased(period, "uid-a", t0 + first), period);
        // Asked just after its turn (a reconcile took 1 ms): the next turn, a period on.
        let ms = StdDuration::from_millis(1);
        assert_eq!(phased(period, "uid-a", t0 + first + ms), period - ms);
        // Asked at any time, its turns stay on one grid.
        for s in [1, 7, 20, 33] {
            let at = t0 + StdDuration::from_secs(s);
            let turn = (at + phased(period, "uid-a", at)).duration_since(t0 + first).unwrap();
            assert_eq!(turn.as_nanos() % period.as_nanos(), 0, "{s}");
        }
        // 1,000 keys fall in every tenth of the period.
        let mut tenths = [0; 10];
        for i in 0..1000 {
            let at = (t0 + phased(period, &format!("uid-{i}"), t0)).duration_since(UNIX_EPOCH).unwrap();
            tenths[(at.as_nanos() % period.as_nanos() * 10 / period.as_nanos()) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| (60..140).contains(&n)), "{tenths:?}");
    }
}
