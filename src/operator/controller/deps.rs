//! The fetch step: Secrets, databases, migrations and Kafka admin clients, each as a value or as
//! the condition that says why it is not there.

use std::{collections::BTreeMap, sync::Arc};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{api::Api, Client};
use sqlx::{pool::PoolConnection, PgPool, Postgres};

use super::Context;
use crate::{
    clients::db::describe_database_url,
    clients::kafka::{Admin, AdminError, ObservedTopic},
    core::redacted::Redacted,
    core::sql::QualifiedName,
    crd::SecretKeyRef,
    operator::conditions::{condition, Cond, Reason, Status},
    tables::schema::{migrate, MigrationOutcome, SchemaError, TableKind},
};

/// A database a resource points at, reached through its Secret.
pub struct Database {
    pub pool: PgPool,
    /// A stable, non-secret identity of the URL (a changed Secret swaps the purge's pool).
    pub url_key: String,
    /// host:port/db, for messages; never the credentials.
    pub location: String,
}

/// Read a database URL from a Secret key; failures are SchemaReady conditions.
pub async fn secret_url(client: &Client, ns: &str, r: &SecretKeyRef) -> Result<Redacted, Cond> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(Cond::no(
                condition::SCHEMA_READY,
                Reason::SecretNotFound,
                format!(
                    "Secret {ns}/{} not found; create it with the database URL under key {:?}",
                    r.name, r.key
                ),
            ))
        }
        Err(e) => {
            return Err(Cond::unknown(
                condition::SCHEMA_READY,
                Reason::SecretNotFound,
                format!("cannot read Secret {ns}/{}: {e}", r.name),
            ))
        }
    };
    let value = secret.data.as_ref().and_then(|d| d.get(&r.key)).map(|b| b.0.clone());
    match value.map(String::from_utf8) {
        Some(Ok(v)) if !v.trim().is_empty() => Ok(Redacted::new(v.trim().to_owned())),
        _ => Err(Cond::no(
            condition::SCHEMA_READY,
            Reason::SecretKeyMissing,
            format!("Secret {ns}/{} has no non-empty key {:?} holding the database URL", r.name, r.key),
        )),
    }
}

/// Secret -> pool -> one connection.
pub async fn connect(ctx: &Context, ns: &str, r: &SecretKeyRef) -> Result<(Database, PoolConnection<Postgres>), Cond> {
    let url = secret_url(&ctx.client, ns, r).boxed().await?;
    let pool = ctx
        .pools
        .get(&url)
        .map_err(|e| Cond::no(condition::SCHEMA_READY, Reason::DatabaseError, e.to_string()))?;
    let location = describe_database_url(url.expose());
    let asked = std::time::Instant::now();
    let conn = pool.acquire().await;
    ctx.metrics.db_acquire.observe(asked.elapsed().as_secs_f64());
    let conn = conn.map_err(|e| Cond::no(condition::SCHEMA_READY, db_reason(&e), format!("cannot connect to {location}: {e}")))?;
    let db = Database {
        pool,
        url_key: crate::clients::db::url_key(&url),
        location,
    };
    Ok((db, conn))
}

/// Migrate (or, with `manage` false, verify) each table in order; the first failure stops.
pub async fn migrate_tables(
    conn: &mut PoolConnection<Postgres>,
    tables: &[(TableKind, &QualifiedName)],
    manage: bool,
    location: &str,
) -> Result<Vec<MigrationOutcome>, Cond> {
    let mut outcomes = Vec::with_capacity(tables.len());
    for (kind, table) in tables {
        match migrate(conn, *kind, table, manage).boxed().await {
            Ok(o) => outcomes.push(o),
            Err(e) => return Err(schema_failure(*kind, table, location, e)),
        }
    }
    Ok(outcomes)
}

/// SchemaReady for a migration that failed. Pure.
pub fn schema_failure(kind: TableKind, table: &QualifiedName, location: &str, e: SchemaError) -> Cond {
    let no = |r, m: String| Cond::no(condition::SCHEMA_READY, r, m);
    match e {
        SchemaError::Mismatch { differences, .. } => no(
            Reason::SchemaMismatch,
            format!(
                "{table} exists but does not match the {kind} contract, left untouched: {}",
                differences.join("; ")
            ),
        ),
        e @ SchemaError::Missing { .. } => no(Reason::SchemaMissing, e.to_string()),
        SchemaError::Database(e) => no(db_reason(&e), format!("{location}: {e}")),
        e => no(Reason::SchemaMismatch, e.to_string()),
    }
}

/// Why a database operation failed, as a condition reason.
pub fn db_reason(e: &sqlx::Error) -> Reason {
    if crate::clients::db::is_unreachable(e) {
        Reason::DatabaseUnreachable
    } else if crate::clients::db::is_permission_denied(e) {
        Reason::PermissionDenied
    } else {
        Reason::DatabaseError
    }
}

/// The condition a Kafka dependency reports when it fails: its type, and the status a failure gives.
#[derive(Debug, Clone, Copy)]
pub struct Reporting {
    pub type_: &'static str,
    pub status: Status,
}

/// All keys of a Secret as librdkafka settings (SASL/TLS), for `kafka.authSecretRef`.
pub async fn kafka_settings(client: &Client, ns: &str, secret: Option<&str>, on: Reporting) -> Result<BTreeMap<String, String>, Cond> {
    let Some(name) = secret else {
        return Ok(BTreeMap::new());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let message = match secrets.get_opt(name).await {
        Ok(Some(s)) => {
            let settings: BTreeMap<String, String> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).trim_end().to_owned()))
                .collect();
            return match refused_key(ns, name, &settings) {
                Some(m) => Err(Cond::new(on.type_, on.status, Reason::SecretKeyRefused, m)),
                None => Ok(settings),
            };
        }
        Ok(None) => format!("Secret {ns}/{name} (kafka.authSecretRef) not found"),
        Err(e) => format!("cannot read Secret {ns}/{name}: {e}"),
    };
    Err(Cond::new(on.type_, on.status, Reason::SecretNotFound, message))
}

/// Why the operator builds no client from these settings of Secret `ns/name`, naming the key,
/// never its value. Pure.
pub fn refused_key(ns: &str, name: &str, settings: &BTreeMap<String, String>) -> Option<String> {
    settings.iter().find_map(|(k, v)| {
        crate::core::kafka_settings::operator_refuses(k, v)
            .map(|why| format!("Secret {ns}/{name} (kafka.authSecretRef) has key {k:?}, which {why}: refused, nothing is connected"))
    })
}

/// Secret -> admin client -> the named topics as the broker describes them (absent: not found).
pub async fn describe_topics(
    ctx: &Context,
    ns: &str,
    bootstrap: &str,
    secret: Option<&str>,
    names: &[String],
    on: Reporting,
) -> Result<(Arc<Admin>, BTreeMap<String, ObservedTopic>), Cond> {
    let settings = kafka_settings(&ctx.client, ns, secret, on).await?;
    let admin = ctx.admins.get(bootstrap, &settings).map_err(|e| admin_failure(on, &e))?;
    let observed = admin.describe(names).await.map_err(|e| admin_failure(on, &e))?;
    Ok((admin, observed))
}

/// A failed Kafka admin operation as a condition: unreachable brokers or a failed operation. Pure.
pub fn admin_failure(on: Reporting, e: &AdminError) -> Cond {
    let r = if e.is_unreachable() {
        Reason::BrokerUnreachable
    } else {
        Reason::TopicOperationFailed
    };
    Cond::new(on.type_, on.status, r, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sql::Ident;

    fn t() -> QualifiedName {
        QualifiedName {
            schema: Ident::parse("billing").unwrap(),
            table: Ident::parse("inbox").unwrap(),
        }
    }

    #[test]
    fn schema_failures_name_the_table_and_what_to_do() {
        let e = SchemaError::Mismatch {
            table: "billing.inbox".into(),
            kind: TableKind::Inbox,
            differences: vec!["missing column received_at (timestamptz)".into(), "no primary key".into()],
        };
        let c = schema_failure(TableKind::Inbox, &t(), "db:5432/x", e);
        assert_eq!((c.status, c.reason), (Status::False, Reason::SchemaMismatch));
        assert_eq!(
            c.message,
            r#""billing"."inbox" exists but does not match the inbox contract, left untouched: missing column received_at (timestamptz); no primary key"#
        );
        let missing = SchemaError::Missing {
            table: "billing.inbox".into(),
            kind: TableKind::Inbox,
        };
        assert_eq!(schema_failure(TableKind::Inbox, &t(), "db", missing).reason, Reason::SchemaMissing);
        let down = SchemaError::Database(sqlx::Error::PoolTimedOut);
        let c = schema_failure(TableKind::Inbox, &t(), "db:5432/x", down);
        assert_eq!(c.reason, Reason::DatabaseUnreachable);
        assert!(c.message.starts_with("db:5432/x: "));
        let refused = SchemaError::Database(sqlx::Error::RowNotFound);
        assert_eq!(schema_failure(TableKind::Inbox, &t(), "db", refused).reason, Reason::DatabaseError);
    }

    #[test]
    fn secret_keys_that_load_code_or_read_files_are_refused_by_name_never_value() {
        let s =
            |pairs: &[(&str, &str)]| -> BTreeMap<String, String> { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let ok = s(&[
            ("sasl.password", "p"),
            ("ssl.ca.pem", "PEM"),
            ("ssl.ca.location", "probe"),
            ("security.protocol", "SSL"),
        ]);
        assert_eq!(refused_key("shop", "kafka", &ok), None);
        for key in [
            "plugin.library.paths",
            "interceptors",
            "ssl.engine.location",
            "ssl.providers",
            "sasl.kerberos.kinit.cmd",
            "sasl.kerberos.keytab",
            "ssl.ca.location",
            "ssl.key.location",
            "ssl.keystore.location",
            "https.ca.location",
            "sasl.oauthbearer.assertion.file",
            "Plugin.Library.Paths",
        ] {
            let m = refused_key("shop", "kafka", &s(&[(key, "/var/run/secrets/S3CRET"), ("sasl.password", "p")]))
                .unwrap_or_else(|| panic!("{key}"));
            assert!(
                m.starts_with(&format!("Secret shop/kafka (kafka.authSecretRef) has key {key:?}, which ")),
                "{m}"
            );
            assert!(!m.contains("S3CRET"), "{m}");
        }
    }

    #[test]
    fn admin_failures_keep_the_callers_condition() {
        let on = Reporting {
            type_: condition::DEDUP_COVERED,
            status: Status::Unknown,
        };
        let down = AdminError::Unreachable {
            bootstrap: "k:9092".into(),
            message: "timeout".into(),
        };
        let c = admin_failure(on, &down);
        assert_eq!(
            (c.type_, c.status, c.reason),
            (condition::DEDUP_COVERED, Status::Unknown, Reason::BrokerUnreachable)
        );
        let refused = AdminError::Refused {
            operation: "create",
            topic: "t".into(),
            message: "no".into(),
        };
        assert_eq!(admin_failure(on, &refused).reason, Reason::TopicOperationFailed);
    }
}
