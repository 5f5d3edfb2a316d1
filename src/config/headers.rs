//! `lockstep relay`'s message header flags: what `spec.relay.headers` and
//! `spec.relay.cloudEvents` say for an OutboxRelay.

use clap::{Args, ValueEnum};

use crate::crd::{CloudEventsSpec, HeaderSet, RelaySpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HeadersArg {
    /// id, type, and traceparent from the outbox's traceparent column.
    Lockstep,
    /// Those, and the CloudEvents binary-mode headers (ce_id, ce_type, ce_source, ce_specversion,
    /// ce_time; content-type for a JSON payload).
    Cloudevents,
}

#[derive(Debug, Clone, Args)]
pub struct HeaderArgs {
    /// The headers each message carries besides the row's own.
    #[arg(long, env = "LOCKSTEP_HEADERS", value_enum, default_value = "lockstep")]
    pub headers: HeadersArg,
    /// ce_source with --headers cloudevents, a URI reference (default: /lockstep/<schema>/<table>).
    #[arg(long, env = "LOCKSTEP_CLOUDEVENTS_SOURCE")]
    pub cloudevents_source: Option<String>,
}

impl HeaderArgs {
    /// The relay spec's defaults with these flags' header settings.
    pub fn relay_spec(&self) -> RelaySpec {
        RelaySpec {
            headers: match self.headers {
                HeadersArg::Lockstep => HeaderSet::Lockstep,
                HeadersArg::Cloudevents => HeaderSet::CloudEvents,
            },
            cloud_events: self
                .cloudevents_source
                .clone()
                .map(|source| CloudEventsSpec { source: Some(source) }),
            ..RelaySpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::crd::HeaderSet;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::super::RelayArgs,
    }

    fn resolve(extra: &[&str]) -> Result<crate::config::RelayConfig, crate::config::RelayConfigError> {
        let argv = ["relay", "--database-url", "postgres://u:p@db/x", "--bootstrap-servers", "k:9092"];
        Cli::try_parse_from(argv.iter().chain(extra)).unwrap().args.resolve()
    }

    #[test]
    fn header_flags_resolve_and_a_source_without_cloudevents_is_refused() {
        let r = resolve(&[]).unwrap().resolved;
        assert_eq!((r.headers, r.cloud_events_source), (HeaderSet::Lockstep, None));
        let r = resolve(&["--headers", "cloudevents", "--cloudevents-source", "urn:orders"])
            .unwrap()
            .resolved;
        assert_eq!(
            (r.headers, r.cloud_events_source.as_deref()),
            (HeaderSet::CloudEvents, Some("urn:orders"))
        );
        let e = resolve(&["--cloudevents-source", "urn:orders"]).unwrap_err().to_string();
        assert!(e.contains("--cloudevents-source: applies only with headers: cloudevents"), "{e}");
        let e = resolve(&["--headers", "cloudevents", "--cloudevents-source", "my orders"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cloudevents-source: must be a URI reference"), "{e}");
        assert!(Cli::try_parse_from(["relay", "--headers", "json"]).is_err());
    }
}
