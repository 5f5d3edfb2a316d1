//! SQL identifiers taken from specs. Every identifier that reaches SQL text is an [`Ident`]:
//! validated against a strict pattern and always rendered quoted, so neither injection nor
//! case-folding surprises are possible.

use std::fmt;

use sha2::{Digest, Sha256};

/// Maximum identifier length in PostgreSQL (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;

/// The pattern the CRD schemas use for schema and table names.
pub const IDENT_PATTERN: &str = "^[a-z_][a-z0-9_]{0,62}$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("must not be empty")]
    Empty,
    #[error("is {0} characters long; PostgreSQL identifiers are at most {MAX_IDENT_LEN}")]
    TooLong(usize),
    #[error("must start with a lowercase letter or '_' (got {0:?})")]
    BadStart(char),
    #[error("may contain only lowercase letters, digits and '_' (found {0:?})")]
    BadChar(char),
    #[error("names beginning with pg_ are reserved by PostgreSQL")]
    Reserved,
}

/// A validated SQL identifier (schema, table, index or column name).
///
/// ```
/// use lockstep::core::sql::Ident;
/// assert_eq!(Ident::parse("outbox").unwrap().quoted(), "\"outbox\"");
/// assert!(Ident::parse("x; drop table y").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    pub fn parse(s: &str) -> Result<Self, IdentError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or(IdentError::Empty)?;
        if !(first.is_ascii_lowercase() || first == '_') {
            return Err(IdentError::BadStart(first));
        }
        if let Some(c) = chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')) {
            return Err(IdentError::BadChar(c));
        }
        if s.len() > MAX_IDENT_LEN {
            return Err(IdentError::TooLong(s.len()));
        }
        if s.starts_with("pg_") {
            return Err(IdentError::Reserved);
        }
        Ok(Ident(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier with a suffix appended, validated again (length matters).
    pub fn with_suffix(&self, suffix: &str) -> Result<Self, IdentError> {
        Ident::parse(&format!("{}{}", self.0, suffix))
    }

    /// Rendered as a quoted identifier. Validation already excludes quotes; doubling them
    /// anyway keeps this function safe on its own.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

/// Quote any string as a PostgreSQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote any string as a PostgreSQL string literal (standard_conforming_strings = on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `schema.table`, both validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QualifiedName {
    pub schema: Ident,
    pub table: Ident,
}

impl QualifiedName {
    /// `schema.table` without quotes, as `status.table` records it.
    pub fn unquoted(&self) -> String {
        format!("{}.{}", self.schema.as_str(), self.table.as_str())
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex of the SHA-256 of a string.
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// A PostgreSQL advisory lock key for a string: the first 8 bytes of its SHA-256, big-endian.
/// Keys are shared with running deployments: what is hashed must never change.
pub fn advisory_key(text: &str) -> i64 {
    let d = Sha256::digest(text.as_bytes());
    i64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["outbox", "_x", "a1_b2", &"a".repeat(63)] {
            assert_eq!(Ident::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_injection_and_odd_names() {
        assert_eq!(Ident::parse("x; drop table y"), Err(IdentError::BadChar(';')));
        assert_eq!(Ident::parse("\"quoted\""), Err(IdentError::BadStart('"')));
        assert_eq!(Ident::parse("Outbox"), Err(IdentError::BadStart('O')));
        assert_eq!(Ident::parse("1abc"), Err(IdentError::BadStart('1')));
        assert_eq!(Ident::parse(""), Err(IdentError::Empty));
        assert_eq!(Ident::parse(&"a".repeat(64)), Err(IdentError::TooLong(64)));
        assert_eq!(Ident::parse("pg_catalog"), Err(IdentError::Reserved));
        assert_eq!(Ident::parse("tablé"), Err(IdentError::BadChar('é')));
    }

    #[test]
    fn suffix_is_revalidated() {
        let t = Ident::parse(&"t".repeat(55)).unwrap();
        assert!(matches!(t.with_suffix("_dead_letter"), Err(IdentError::TooLong(67))));
    }

    #[test]
    fn quoting() {
        let q = QualifiedName {
            schema: Ident::parse("public").unwrap(),
            table: Ident::parse("outbox").unwrap(),
        };
        assert_eq!(q.to_string(), r#""public"."outbox""#);
        assert_eq!(q.unquoted(), "public.outbox");
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn digests_are_exact() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex(&[]), "");
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // The same values golden.rs pins through schema::lock_key and tables::locks::lock_key.
        assert_eq!(advisory_key("lockstep:public.outbox"), -767470055278674281);
        assert_eq!(advisory_key("lockstep-relay:public.outbox"), -5365579470686561255);
        assert_eq!(
            advisory_key("abc"),
            i64::from_be_bytes([0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea])
        );
    }

    /// Undo quote_ident: strip the outer quotes and undouble inner ones; None if malformed.
    fn unquote(q: &str) -> Option<String> {
        let inner = q.strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                // every quote inside must be doubled
                if chars.next() != Some('"') {
                    return None;
                }
            }
            out.push(c);
        }
        Some(out)
    }

    proptest::proptest! {
        #[test]
        fn parse_accepts_exactly_the_pattern(s in "\\PC{0,70}|[a-z_][a-z0-9_;\" ]{0,70}") {
            let re = regex::Regex::new(IDENT_PATTERN).unwrap();
            let expected = re.is_match(&s) && !s.starts_with("pg_");
            proptest::prop_assert_eq!(Ident::parse(&s).is_ok(), expected);
        }

        #[test]
        fn quoting_round_trips_any_string(s in "\\PC{0,40}") {
            let q = quote_ident(&s);
            proptest::prop_assert_eq!(unquote(&q), Some(s.clone()));
        }

        #[test]
        fn valid_idents_render_as_plain_quoted(s in "[a-z_][a-z0-9_]{0,62}") {
            if let Ok(id) = Ident::parse(&s) {
                proptest::prop_assert_eq!(id.quoted(), format!("\"{s}\""));
            }
        }
    }
}
