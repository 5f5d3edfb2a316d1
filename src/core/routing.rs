//! The routing template: which topic an outbox row goes to and which column is its key.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Outbox columns that can route a message (Debezium outbox-router names).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutboxColumn {
    Id,
    Aggregatetype,
    Aggregateid,
    Type,
}

impl OutboxColumn {
    pub const TEMPLATE_COLUMNS: [OutboxColumn; 3] = [OutboxColumn::Aggregatetype, OutboxColumn::Aggregateid, OutboxColumn::Type];

    pub fn name(self) -> &'static str {
        match self {
            OutboxColumn::Id => "id",
            OutboxColumn::Aggregatetype => "aggregatetype",
            OutboxColumn::Aggregateid => "aggregateid",
            OutboxColumn::Type => "type",
        }
    }

    fn from_template_name(s: &str) -> Option<Self> {
        Self::TEMPLATE_COLUMNS.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for OutboxColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Column(OutboxColumn),
}

/// A parsed topic template such as `outbox.event.{aggregatetype}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    pub parts: Vec<Part>,
}

pub const MAX_TOPIC_LEN: usize = 249;

/// Characters Kafka allows in topic names.
pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'
}

/// A valid Kafka topic name.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_LEN {
        return Err(format!("topic names are 1 to {MAX_TOPIC_LEN} characters (got {})", name.len()));
    }
    if name == "." || name == ".." {
        return Err("topic name may not be '.' or '..'".into());
    }
    if let Some(c) = name.chars().find(|c| !is_topic_char(*c)) {
        return Err(format!(
            "{name:?} contains {c:?}; topic names use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl TopicTemplate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(format!("unmatched '}}' in {s:?}")),
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_owned()));
                    }
                    let end = rest[i..].find('}').ok_or_else(|| format!("unclosed '{{' in {s:?}"))? + i;
                    let name = &rest[i + 1..end];
                    let col = OutboxColumn::from_template_name(name)
                        .ok_or_else(|| format!("{{{name}}} is not a routing column; use {{aggregatetype}}, {{aggregateid}} or {{type}}"))?;
                    parts.push(Part::Column(col));
                    rest = &rest[end + 1..];
                }
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if parts.is_empty() {
            return Err("the topic template is empty".into());
        }
        for p in &parts {
            if let Part::Literal(l) = p {
                if let Some(c) = l.chars().find(|c| !is_topic_char(*c)) {
                    return Err(format!(
                        "{c:?} cannot appear in a topic name; use letters, digits, '.', '_' and '-'"
                    ));
                }
            }
        }
        let t = TopicTemplate { parts };
        if let Some(fixed) = t.fixed() {
            validate_topic_name(&fixed)?;
        }
        Ok(t)
    }

    /// The template as written: `outbox.event.{aggregatetype}` (what `parse` reads back).
    pub fn text(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.clone(),
                Part::Column(c) => format!("{{{c}}}"),
            })
            .collect()
    }

    /// The topic name when the template has no columns.
    pub fn fixed(&self) -> Option<String> {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => Some(l.as_str()),
                Part::Column(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat())
    }

    pub fn columns(&self) -> impl Iterator<Item = OutboxColumn> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(*c),
            Part::Literal(_) => None,
        })
    }

    /// The topic for one row; an invalid result is an error for that row only.
    pub fn render(&self, value: impl Fn(OutboxColumn) -> Option<String>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Column(c) => out.push_str(&value(*c).ok_or_else(|| format!("column {c} is null; it routes the message"))?),
            }
        }
        validate_topic_name(&out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let t = TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap();
        assert_eq!(
            t.parts,
            vec![Part::Literal("outbox.event.".into()), Part::Column(OutboxColumn::Aggregatetype)]
        );
        assert_eq!(t.render(|_| Some("order".into())).unwrap(), "outbox.event.order");
        assert!(t.render(|_| Some("bad name".into())).is_err());
        assert!(t.render(|_| None).is_err());
        assert_eq!(TopicTemplate::parse("orders").unwrap().fixed().as_deref(), Some("orders"));
        assert_eq!(TopicTemplate::parse("{type}-{aggregatetype}").unwrap().columns().count(), 2);
    }

    #[test]
    fn text_is_what_parse_read() {
        for s in ["outbox.event.{aggregatetype}", "orders", "{type}-{aggregateid}.v1"] {
            assert_eq!(TopicTemplate::parse(s).unwrap().text(), s);
        }
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["", "x.{payload}", "x.{aggregatetype", "x}", "a b", "x.{}", "..", "x/{type}"] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?}");
        }
    }
}
