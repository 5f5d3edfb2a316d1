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
