//! Dead-lettered rows of an OutboxRelay: a Warning Event when more arrive, and the replay the
//! `lockstep.dev/replay` annotation asks for (once per new value).

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    runtime::events::{Event, EventType},
    ResourceExt,
};
use sqlx::PgPool;

use super::Context;
use crate::{
    crd::{OutboxRelay, ReplayStatus, ValidOutboxRelay, REPLAY_ANNOTATION},
    tables::replay::replay,
    tables::schema::describe_outbox,
};

/// A replay to run: the annotation names a value not replayed yet. Pure.
pub fn replay_asked<'a>(annotation: Option<&'a str>, last: Option<&ReplayStatus>) -> Option<&'a str> {
    let token = annotation.filter(|t| !t.trim().is_empty())?;
    (last.map(|l| l.token.as_str()) != Some(token)).then_some(token)
}

/// Run the replay the annotation asks for, if any; the new `status.lastReplay`, or the error text.
pub async fn replay_if_asked(
    ctx: &Context,
    obj: &OutboxRelay,
    v: &ValidOutboxRelay,
    pool: &PgPool,
    last: Option<&ReplayStatus>,
) -> Option<Result<ReplayStatus, String>> {
    let token = replay_asked(obj.annotations().get(REPLAY_ANNOTATION).map(String::as_str), last)?;
    let result = async {
        let mut conn = pool.acquire().await?;
        let tables = describe_outbox(&mut conn, &v.table, &v.dead_letter_table).await?;
        replay(&mut conn, &v.table, &v.dead_letter_table, &tables, None).await
    }
    .await;
    let (type_, note, outcome) = match result {
        Ok(rows) => (
            EventType::Normal,
            format!("replayed {rows} dead-lettered rows into {} ({REPLAY_ANNOTATION}={token})", v.table),
            Ok(ReplayStatus {
                token: token.to_owned(),
                rows: rows as i64,
                at: Time(Timestamp::now()),
            }),
        ),
        Err(e) => (
            EventType::Warning,
            format!("replay ({REPLAY_ANNOTATION}={token}) failed, nothing was moved: {e}; retrying"),
            Err(e.to_string()),
        ),
    };
    publish(ctx, obj, type_, "DeadLetterReplay", note).await;
    Some(outcome)
}

/// A Warning Event when rows were dead-lettered since the last measurement.
pub async fn report_new(ctx: &Context, obj: &OutboxRelay, v: &ValidOutboxRelay, before: Option<i64>, now: i64) {
    let Some(before) = before else { return };
    if now > before {
        let note = format!(
            "{} more rows moved to {} ({now} there): their last_error says why; fix the cause, then `lockstep replay` \
             or set the {REPLAY_ANNOTATION} annotation to a new value",
            now - before,
            v.dead_letter_table
        );
        publish(ctx, obj, EventType::Warning, "DeadLettered", note).await;
    }
}

async fn publish(ctx: &Context, obj: &OutboxRelay, type_: EventType, reason: &str, note: String) {
    let e = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Relay".into(),
        secondary: None,
    };
    super::status::publish(ctx, obj, e).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(token: &str) -> ReplayStatus {
        ReplayStatus {
            token: token.into(),
            rows: 1,
            at: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn a_replay_runs_once_per_new_annotation_value() {
        assert_eq!(replay_asked(None, None), None);
        assert_eq!(replay_asked(Some(" "), None), None);
        assert_eq!(replay_asked(Some("1"), None), Some("1"));
        assert_eq!(replay_asked(Some("1"), Some(&last("1"))), None);
        assert_eq!(replay_asked(Some("2"), Some(&last("1"))), Some("2"));
    }
}
