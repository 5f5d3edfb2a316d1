//! The RabbitMQ checks of `lockstep doctor --broker rabbitmq`: connect over AMQP with the settings
//! the relay would use (credentials and TLS included) and open a channel in confirm mode, find
//! the exchange and queues by passive declares, then ask the management API (which the operator
//! declares topology and reads lag through) for the server's version, its resource alarms, and
//! each queue's type, durability and what bounds its redelivery. Nothing is written. Gathering is
//! thin I/O; `verdicts` is pure.

use crate::clients::{
    amqp_probe::{AmqpProbe, Found, Negotiated},
    broker::amqp::AmqpSettings,
    rabbitmq_admin::{ManagementSettings, ObservedQueue, Overview, RabbitAdmin},
};

use super::{database::TargetKind, Check};

/// What to check on RabbitMQ, resolved from the flags.
#[derive(Debug, Clone)]
pub struct RabbitTarget {
    /// May hold credentials: never printed.
    pub amqp: AmqpSettings,
    /// The management API, when given (with the AMQP user and password).
    pub management: Option<ManagementSettings>,
    pub queues: Vec<String>,
    pub kind: TargetKind,
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub server: String,
    pub connected: Result<Negotiated, String>,
    /// The exchange the relay publishes to (none: the default exchange, or an InboxTable).
    pub exchange: Option<(String, Found)>,
    pub queues: Vec<(String, Found)>,
    /// None: no management URL given.
    pub management: Option<Management>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Management {
    pub url: String,
    pub overview: Result<Overview, String>,
    pub alarms: Result<Vec<String>, String>,
    /// Each present queue as the management API describes it.
    pub queues: Vec<(String, Result<Option<ObservedQueue>, String>)>,
}

pub async fn checks(t: &RabbitTarget) -> Vec<Check> {
    verdicts(&gather(t).await, t.kind)
}

async fn gather(t: &RabbitTarget) -> Facts {
    let mut f = Facts {
        server: crate::core::amqp_settings::server_host_port(&t.amqp.url).unwrap_or_default(),
        connected: Err(String::new()),
        exchange: None,
        queues: vec![],
        management: None,
    };
    let probe = match AmqpProbe::connect(&t.amqp).await {
        Ok((p, n)) => {
            f.connected = Ok(n);
            p
        }
        Err(e) => {
            f.connected = Err(e);
            return f;
        }
    };
    if t.kind == TargetKind::OutboxRelay && !t.amqp.exchange.is_empty() {
        f.exchange = Some((t.amqp.exchange.clone(), probe.exchange(&t.amqp.exchange).await));
    }
    for q in &t.queues {
        f.queues.push((q.clone(), probe.queue(q).await));
    }
    probe.close().await;
    if let Some(m) = &t.management {
        f.management = Some(management(m, &f.queues).await);
    }
    f
}

async fn management(m: &ManagementSettings, queues: &[(String, Found)]) -> Management {
    let admin = match RabbitAdmin::new(m) {
        Ok(a) => a,
        Err(e) => {
            return Management {
                url: m.url.clone(),
                overview: Err(e.clone()),
                alarms: Err(e),
                queues: vec![],
            }
        }
    };
    let overview = admin.overview().await;
    let (alarms, mut described) = (admin.alarms().await, vec![]);
    if overview.is_ok() {
        for (name, _) in queues.iter().filter(|(_, f)| matches!(f, Found::Present { .. })) {
            described.push((name.clone(), admin.queue(name).await));
        }
    }
    Management {
        url: m.url.clone(),
        overview,
        alarms,
        queues: described,
    }
}

/// Each check's verdict from the answers. Pure.
pub fn verdicts(f: &Facts, kind: TargetKind) -> Vec<Check> {
    let n = match &f.connected {
        Ok(n) => n,
        Err(e) => {
            return vec![Check::fail(
                "rabbitmq server",
                e.clone(),
                "check --amqp-url (its host, port and vhost), the user and password (--amqp-user and \
                 --amqp-password-file, or --amqp-secret-dir), the user's permissions on the vhost, and the TLS files",
            )]
        }
    };
    let mut out = vec![Check::pass(
        "rabbitmq server",
        format!(
            "connected to {} vhost {:?}, a channel in confirm mode (frame_max {}, heartbeat {}s)",
            f.server, n.vhost, n.frame_max, n.heartbeat
        ),
    )];
    if let Some((name, found)) = &f.exchange {
        out.push(exchange_check(name, found));
    }
    for (name, found) in &f.queues {
        out.push(queue_check(name, found, kind));
    }
    match &f.management {
        None => out.push(Check::warn(
            "management api",
            "not checked: no --rabbitmq-management-url",
            "the operator declares the exchange and queues, and reads their arguments and lag, through the \
             management API (spec.rabbitmq.managementUrl): pass its URL to check it",
        )),
        Some(m) => out.extend(management_checks(m, kind)),
    }
    out
}

fn exchange_check(name: &str, found: &Found) -> Check {
    let check = format!("exchange {name}");
    match found {
        Found::Present { .. } => Check::pass(check, "exists"),
        Found::Absent => Check::pass(
            check,
            "absent: the operator declares it from spec.rabbitmq.exchange (a relay run alone needs it declared first)",
        ),
        Found::Failed(e) => Check::fail(check, format!("cannot check it: {e}"), "see the server's log for the channel error"),
    }
}

fn queue_check(name: &str, found: &Found, kind: TargetKind) -> Check {
    let check = format!("queue {name}");
    match (found, kind) {
        (Found::Present { messages, consumers }, _) => {
            Check::pass(check, format!("exists: {messages} message(s) ready, {consumers} consumer(s)"))
        }
        (Found::Absent, TargetKind::OutboxRelay) => Check::pass(check, "absent: the operator declares it from spec.rabbitmq.queues"),
        (Found::Absent, TargetKind::InboxTable) => Check::fail(
            check,
            "absent",
            "an InboxTable reads a queue an OutboxRelay (or someone) declares: declare it first, or fix the name",
        ),
        (Found::Failed(e), _) => Check::fail(check, format!("cannot check it: {e}"), "see the server's log for the channel error"),
    }
}

fn management_checks(m: &Management, kind: TargetKind) -> Vec<Check> {
    let o = match &m.overview {
        Ok(o) => o,
        Err(e) => {
            return vec![Check::fail(
                "management api",
                e.clone(),
                "enable the rabbitmq_management plugin, check the URL, and give the user the `management` tag: \
                 the operator declares topology and reads lag through it",
            )]
        }
    };
    let mut out = vec![Check::pass(
        "management api",
        format!(
            "{} answers: RabbitMQ {} on Erlang {}, cluster {}",
            m.url, o.version, o.erlang, o.cluster
        ),
    )];
    out.push(alarms_check(&m.alarms));
    for (name, q) in &m.queues {
        out.push(queue_settings(name, q, kind));
    }
    out
}

/// Memory and disk alarms block every publishing connection; others (file descriptors) do not.
fn alarms_check(alarms: &Result<Vec<String>, String>) -> Check {
    const NAME: &str = "resource alarms";
    let blocking = |a: &String| a.starts_with("memory ") || a.starts_with("disk ");
    match alarms {
        Ok(a) if a.is_empty() => Check::pass(NAME, "none in effect"),
        Ok(a) if a.iter().any(blocking) => Check::fail(
            NAME,
            format!(
                "in effect: {}; the server blocks every publishing connection until they clear",
                a.join(", ")
            ),
            "free memory or disk on those nodes (or raise vm_memory_high_watermark / disk_free_limit): the relay waits, \
             publishing nothing, while a memory or disk alarm lasts",
        ),
        Ok(a) => Check::warn(
            NAME,
            format!("in effect: {}", a.join(", ")),
            "see the node's log: these do not block publishers, but the node is near a limit",
        ),
        Err(e) => Check::warn(
            NAME,
            format!("cannot read them: {e}"),
            "give the user the `management` tag to let doctor see memory and disk alarms",
        ),
    }
}

/// A queue's settings: durable, its type, and (for an InboxTable) whether anything bounds how
/// long a message can be redelivered, which DedupCovered compares with the inbox's retention.
fn queue_settings(name: &str, q: &Result<Option<ObservedQueue>, String>, kind: TargetKind) -> Check {
    let check = format!("queue {name} settings");
    let q = match q {
        Ok(Some(q)) => q,
        Ok(None) => return Check::warn(check, "gone since the AMQP check", "run doctor again"),
        Err(e) => return Check::warn(check, format!("cannot read them: {e}"), "give the user the `management` tag"),
    };
    // An argument and a policy combine as RabbitMQ combines them: the lower number applies, and a
    // policy's max-age overrides a stream's argument.
    let num = |arg: &str, policy: &str| {
        let of = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_i64());
        of(q.arguments.get(arg)).into_iter().chain(of(q.policy.get(policy))).min()
    };
    let ttl = num("x-message-ttl", "message-ttl");
    let limit = num("x-delivery-limit", "delivery-limit");
    let max_age = q
        .policy
        .get("max-age")
        .or_else(|| q.arguments.get("x-max-age"))
        .and_then(|v| v.as_str());
    let mut detail = format!("{} {}", if q.durable { "durable" } else { "transient" }, q.type_);
    let bound = if q.type_ == "stream" {
        max_age.map(|a| format!("x-max-age {a}"))
    } else {
        ttl.map(|ms| {
            format!(
                "message TTL {}",
                crate::core::duration::format(std::time::Duration::from_millis(ms as u64))
            )
        })
    };
    for part in [bound.clone(), limit.map(|l| format!("delivery limit {l}"))].into_iter().flatten() {
        detail.push_str(", ");
        detail.push_str(&part);
    }
    if !q.durable {
        return Check::fail(
            check,
            detail,
            "a transient queue loses its messages when the node restarts: declare it durable (a new name, or delete and re-declare it)",
        );
    }
    if kind == TargetKind::InboxTable && bound.is_none() {
        return Check::warn(
            check,
            format!("{detail}; nothing bounds how long a message can be redelivered"),
            "set spec.redeliveryWindow on the InboxTable (DedupCovered cannot be shown otherwise), or give the queue a \
             message TTL (a stream: x-max-age)",
        );
    }
    Check::pass(check, detail)
}

#[cfg(test)]
#[path = "rabbitmq_tests.rs"]
mod tests;
