//! The database checks' gathering: thin queries whose answers go to the pure verdicts in
//! `verdicts` and `privileges`. Used by `lockstep doctor` and by the operator before it first
//! migrates a table (condition PrerequisitesMet).

use std::collections::BTreeSet;

use sqlx::{Connection, PgConnection};

use super::{
    args::DatabaseTarget,
    privileges::{self, Layout, Need},
    verdicts::{self, HeadroomFacts, PoolerFacts},
    Check,
};
use crate::{clients::db::describe_database_url, core::sql::QualifiedName};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    OutboxRelay,
    InboxTable,
}

/// The tables a resource uses and whether lockstep manages them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: TargetKind,
    pub table: QualifiedName,
    /// An OutboxRelay's dead-letter table.
    pub dead_letter: Option<QualifiedName>,
    pub manage: bool,
}

/// Every database check of `lockstep doctor`, in order; a failed connection stops them.
pub async fn checks(d: &DatabaseTarget) -> Vec<Check> {
    let location = describe_database_url(d.url.expose());
    let Some(opts) = crate::clients::db::parse_database_url(d.url.expose()) else {
        return vec![verdicts::unreachable(&location, "the URL does not parse", false)];
    };
    let opts = opts.application_name("lockstep-doctor");
    let mut first = match PgConnection::connect_with(&opts).await {
        Ok(c) => c,
        Err(e) => {
            return vec![verdicts::unreachable(
                &location,
                &e.to_string(),
                crate::clients::db::is_permission_denied(&e),
            )]
        }
    };
    let mut out = vec![Check::pass("database connection", format!("connected to {location}"))];
    out.extend(server_checks(&mut first).await);
    let pooling = match PgConnection::connect_with(&opts).await {
        Ok(mut second) => pooler(&mut first, &mut second).await.map(|f| verdicts::pooler(&f)),
        Err(e) => Err(e),
    };
    out.push(pooling.unwrap_or_else(|e| query_failed("session pooling", &e)));
    out.push(
        headroom(&mut first, i64::from(d.connections))
            .await
            .map_or_else(|e| query_failed("connection headroom", &e), |f| verdicts::headroom(&f)),
    );
    out.extend(privilege_checks(&mut first, &d.target).await);
    let _ = first.close().await;
    out
}

/// Version and standby.
pub async fn server_checks(conn: &mut PgConnection) -> Vec<Check> {
    let version: Result<(i32, String), sqlx::Error> =
        sqlx::query_as("select current_setting('server_version_num')::int, current_setting('server_version')")
            .fetch_one(&mut *conn)
            .await;
    let standby: Result<bool, sqlx::Error> = sqlx::query_scalar("select pg_is_in_recovery()").fetch_one(&mut *conn).await;
    vec![
        version.map_or_else(|e| query_failed("postgresql version", &e), |(n, v)| verdicts::version(n, &v)),
        standby.map_or_else(|e| query_failed("primary server", &e), verdicts::standby),
    ]
}

/// A check whose query failed: a problem to look at, not a verdict.
fn query_failed(name: &str, e: &sqlx::Error) -> Check {
    Check::fail(
        name,
        format!("the check's query failed: {e}"),
        "look at the error; the role may lack access to the catalog views",
    )
}

/// Two connections open at once, each marking its session (`verdicts::PoolerFacts`).
pub async fn pooler(first: &mut PgConnection, second: &mut PgConnection) -> Result<PoolerFacts, sqlx::Error> {
    const MARK: &str = "select pg_backend_pid(), set_config($1, $2, false)";
    const READ: &str = "select pg_backend_pid(), nullif(current_setting($1, true), '')";
    let marker = crate::tables::locks::MARKER;
    let first_marker = format!("doctor-{}", uuid::Uuid::new_v4());
    // Unnamed statements: behind a transaction pooler both clients' named ones would meet on one
    // server session and collide, and this check would fail for that instead of saying why.
    let mark = |value: String| sqlx::query_as::<_, (i32, String)>(MARK).bind(marker).bind(value).persistent(false);
    let read = || sqlx::query_as::<_, (i32, Option<String>)>(READ).bind(marker).persistent(false);
    let (first_pid, _) = mark(first_marker.clone()).fetch_one(&mut *first).await?;
    let (second_pid, second_saw) = read().fetch_one(&mut *second).await?;
    mark(format!("doctor-{}", uuid::Uuid::new_v4())).fetch_one(&mut *second).await?;
    let (pid_after, first_marker_after) = read().fetch_one(&mut *first).await?;
    // Cleared: the first connection may be a pool's, handed out again later.
    for conn in [&mut *first, &mut *second] {
        mark(String::new()).fetch_one(conn).await?;
    }
    Ok(PoolerFacts {
        first_pid: (first_pid, pid_after),
        first_marker_after,
        first_marker,
        second_pid,
        second_saw,
    })
}

async fn headroom(conn: &mut PgConnection, needed: i64) -> Result<HeadroomFacts, sqlx::Error> {
    // reserved_connections exists from PostgreSQL 16 on; missing_ok reads it as empty before.
    let (max_connections, reserved, in_use, role_limit, role_in_use): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select current_setting('max_connections')::bigint,
                current_setting('superuser_reserved_connections')::bigint
                  + coalesce(nullif(current_setting('reserved_connections', true), '')::bigint, 0),
                (select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()),
                (select rolconnlimit::bigint from pg_roles where rolname = current_user),
                (select count(*) from pg_stat_activity where usename = current_user)",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(HeadroomFacts {
        max_connections,
        reserved,
        in_use,
        role_limit: (role_limit >= 0).then_some(role_limit),
        role_in_use,
        needed,
    })
}

/// What exists of the target's schema and tables (from the catalogs, which every role reads).
pub async fn layout(conn: &mut PgConnection, t: &Target) -> Result<Layout, sqlx::Error> {
    let schema = t.table.schema.as_str();
    let schema_exists: bool = sqlx::query_scalar("select exists (select 1 from pg_namespace where nspname = $1)")
        .bind(schema)
        .fetch_one(&mut *conn)
        .await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relkind in ('r', 'p')",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Layout {
        schema_exists,
        tables: tables.into_iter().collect::<BTreeSet<_>>(),
    })
}

/// The privileges of `need` the current role lacks.
async fn missing(conn: &mut PgConnection, need: &Need) -> Result<Vec<&'static str>, sqlx::Error> {
    let mut out = Vec::new();
    for p in need.privileges {
        let sql = need.object.probe_sql(p);
        let has: bool = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
        if !has {
            out.push(*p);
        }
    }
    Ok(out)
}

/// The tables' presence and one check per object lockstep uses.
pub async fn privilege_checks(conn: &mut PgConnection, t: &Target) -> Vec<Check> {
    let who: Result<(String, String), sqlx::Error> = sqlx::query_as("select current_user::text, current_database()::text")
        .fetch_one(&mut *conn)
        .await;
    let ((role, database), layout) = match (who, layout(conn, t).await) {
        (Ok(w), Ok(l)) => (w, l),
        (Err(e), _) | (_, Err(e)) => return vec![query_failed("privileges", &e)],
    };
    let mut out = privileges::presence(t, &layout);
    for need in privileges::needs(t, &layout) {
        out.push(match missing(conn, &need).await {
            Ok(m) => privileges::verdict(&need, &m, &role, &database),
            Err(e) => query_failed("privileges", &e),
        });
    }
    out
}
