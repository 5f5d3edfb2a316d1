//! `lockstep doctor`: check, before anything is created, that a database and a Kafka cluster (or
//! NATS JetStream, `--broker nats`, or RabbitMQ, `--broker rabbitmq`) can
//! carry an OutboxRelay or an InboxTable with the settings it would use. Each check gathers facts
//! (thin I/O, `database`, `broker`) and a pure function turns them into a verdict
//! (`privileges`, `verdicts`), so the verdicts are unit tested and the operator reports the same
//! ones in its PrerequisitesMet condition.
//!
//! Exit codes: 0 every check passed (warnings allowed), 1 a check failed, 2 the checks could not
//! run (bad arguments, an unparseable URL, an internal error; clap's usage errors are 2 as well).

pub mod args;
pub mod broker;
pub mod broker_verdicts;
pub mod database;
pub mod nats;
pub mod privileges;
pub mod rabbitmq;
pub mod verdicts;

use std::fmt::Write as _;

pub use args::DoctorArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the report: what was checked, what was found, and (unless it passed) what to do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what_to_do: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            verdict: Verdict::Pass,
            detail: detail.into(),
            what_to_do: None,
        }
    }
    pub fn warn(name: impl Into<String>, detail: impl Into<String>, what_to_do: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            verdict: Verdict::Warn,
            detail: detail.into(),
            what_to_do: Some(what_to_do.into()),
        }
    }
    pub fn fail(name: impl Into<String>, detail: impl Into<String>, what_to_do: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            verdict: Verdict::Fail,
            detail: detail.into(),
            what_to_do: Some(what_to_do.into()),
        }
    }
}

/// Every check of one run, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn extend(&mut self, checks: impl IntoIterator<Item = Check>) {
        self.checks.extend(checks);
    }

    /// The first failed check, if any.
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.verdict == Verdict::Fail)
    }
}

/// The verdict and detail of the check named `name`, for the verdicts' unit tests.
#[cfg(test)]
pub(crate) fn verdict_of(checks: &[Check], name: &str) -> (Verdict, String) {
    let c = checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name}: {checks:?}"));
    (c.verdict, c.detail.clone())
}

/// 0 when nothing failed (warnings allowed), 1 when a check failed.
pub fn exit_code(report: &Report) -> u8 {
    if report.first_failure().is_some() {
        1
    } else {
        0
    }
}

/// The checks could not run at all (bad arguments, an unparseable URL, an internal error).
pub const EXIT_COULD_NOT_RUN: u8 = 2;

/// One line per check, `PASS|WARN|FAIL  <check>: <detail>`, and `  -> <what to do>` under each
/// one that did not pass; then a one-line summary.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let _ = writeln!(out, "{}  {}: {}", c.verdict.as_str(), c.name, c.detail);
        if let Some(todo) = c.what_to_do.as_deref().filter(|_| c.verdict != Verdict::Pass) {
            let _ = writeln!(out, "  -> {todo}");
        }
    }
    let count = |v| report.checks.iter().filter(|c| c.verdict == v).count();
    let _ = writeln!(
        out,
        "{} passed, {} warned, {} failed",
        count(Verdict::Pass),
        count(Verdict::Warn),
        count(Verdict::Fail)
    );
    out
}

pub fn render_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|_| "{}".into())
}

/// Run every check the arguments ask for, print the report, and return the exit code.
pub async fn run(args: &DoctorArgs) -> u8 {
    let resolved = match args.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_COULD_NOT_RUN;
        }
    };
    let mut report = Report::default();
    report.extend(database::checks(&resolved.database).await);
    match (&resolved.nats, &resolved.rabbitmq) {
        (Some(n), _) => report.extend(nats::checks(n).await),
        (_, Some(r)) => report.extend(rabbitmq::checks(r).await),
        (None, None) => report.extend(broker::checks(resolved.broker.as_ref()).await),
    }
    match args.output {
        args::Output::Text => print!("{}", render_text(&report)),
        args::Output::Json => println!("{}", render_json(&report)),
    }
    exit_code(&report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            checks: vec![
                Check::pass("postgresql version", "16.2"),
                Check::warn("connection headroom", "8 free", "raise max_connections"),
                Check::fail("privilege", "no CREATE on schema billing", "grant create on schema billing to app"),
            ],
        }
    }

    #[test]
    fn text_has_a_line_per_check_and_what_to_do_under_each_problem() {
        assert_eq!(
            render_text(&report()),
            "PASS  postgresql version: 16.2\n\
             WARN  connection headroom: 8 free\n  -> raise max_connections\n\
             FAIL  privilege: no CREATE on schema billing\n  -> grant create on schema billing to app\n\
             1 passed, 1 warned, 1 failed\n"
        );
    }

    #[test]
    fn exit_code_is_1_only_when_a_check_failed() {
        let mut r = report();
        assert_eq!(exit_code(&r), 1);
        r.checks.pop();
        assert_eq!(exit_code(&r), 0, "warnings alone pass");
        assert_eq!(exit_code(&Report::default()), 0);
    }

    #[test]
    fn json_names_the_verdicts_in_lowercase() {
        let j: serde_json::Value = serde_json::from_str(&render_json(&report())).unwrap();
        assert_eq!(j["checks"][2]["verdict"], "fail");
        assert_eq!(j["checks"][0].get("what_to_do"), None);
    }
}
