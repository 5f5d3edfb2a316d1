//! Collecting spec problems: validation reports every problem at once, each naming its field
//! by its path in the manifest (`spec.topics[0].partitions`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems found in one spec. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Accumulates problems while a validator walks a spec.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Keep the value when `r` is Ok, otherwise record the error under `field`.
    pub fn check<T, E: fmt::Display>(&mut self, field: impl Into<String>, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    /// Record a problem unless `lo <= v <= hi`.
    pub fn range<T: PartialOrd + fmt::Display>(&mut self, field: impl Into<String>, v: T, lo: T, hi: T) {
        if v < lo || v > hi {
            self.add(field, format!("must be between {lo} and {hi} (got {v})"));
        }
    }

    /// Finish: the resolved value when there were no problems, every problem otherwise.
    /// `build` runs only when nothing was recorded, so it may unwrap the `Option`s it captured.
    pub fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ValidationErrors> {
        if !self.0.is_empty() {
            return Err(ValidationErrors(self.0));
        }
        build().ok_or_else(|| {
            ValidationErrors(vec![FieldError {
                field: "spec".into(),
                message: "internal: incomplete validation".into(),
            }])
        })
    }
}
