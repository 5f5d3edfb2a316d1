//! PrerequisitesMet: `lockstep doctor`'s database checks (version, primary, session pooling,
//! privileges), run before a resource first migrates its tables, so that a role or a server that
//! cannot carry it is named with what to do before the migration fails on it.
//!
//! Computed only while the table was never ready (`status.table` unset); after that the
//! condition keeps its last value (`conditions::merge`). It informs and does not gate: the
//! migration is still tried and SchemaReady (and so Ready) says how it went. The broker is not
//! checked here: TopicsReady reports what the broker refuses as it happens.

use sqlx::Connection;

use super::{deps, Context};
use crate::{
    crd::SecretKeyRef,
    doctor::{database, database::Target, Check, Verdict},
    operator::conditions::{condition, Cond, Reason},
};

/// The condition while the table was never ready (`recorded`: the status's table, set once it
/// was); None after, or when the database cannot be reached (SchemaReady says so).
pub async fn until_ready(ctx: &Context, ns: &str, secret: &SecretKeyRef, recorded: Option<&str>, target: &Target) -> Option<Cond> {
    match recorded {
        Some(_) => None,
        None => check(ctx, ns, secret, target).await,
    }
}

/// The condition, or None when the database cannot be reached (SchemaReady says so).
pub async fn check(ctx: &Context, ns: &str, secret: &SecretKeyRef, target: &Target) -> Option<Cond> {
    let (db, mut first) = deps::connect(ctx, ns, secret).await.ok()?;
    let mut checks = database::server_checks(&mut first).await;
    match ctx.poolers.recent(&db.url_key) {
        Some(c) => checks.push(c),
        None => {
            // A second connection of its own (not the pool's): the pool may hand back the first.
            let url = deps::secret_url(&ctx.client, ns, secret).await.ok()?;
            let opts = crate::clients::db::parse_database_url(url.expose())?.application_name("lockstep");
            if let Ok(mut second) = sqlx::PgConnection::connect_with(&opts).await {
                if let Ok(f) = database::pooler(&mut first, &mut second).await {
                    let c = crate::doctor::verdicts::pooler(&f);
                    ctx.poolers.remember(&db.url_key, c.clone());
                    checks.push(c);
                }
                let _ = second.close().await;
            }
        }
    }
    checks.extend(database::privilege_checks(&mut first, target).await);
    Some(verdict(&db.location, &checks))
}

/// The pooler check by database URL (its `url_key`), for a minute: it opens a connection outside
/// the pool, and objects created together (or failing together) would each open one.
#[derive(Default)]
pub struct Poolers(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Check)>>);

impl Poolers {
    const FOR: std::time::Duration = std::time::Duration::from_secs(60);

    pub fn recent(&self, url_key: &str) -> Option<Check> {
        let mut map = self.0.lock().expect("poolers lock");
        map.retain(|_, (at, _)| at.elapsed() < Self::FOR);
        map.get(url_key).map(|(_, c)| c.clone())
    }

    pub fn remember(&self, url_key: &str, c: Check) {
        let mut map = self.0.lock().expect("poolers lock");
        map.insert(url_key.to_owned(), (std::time::Instant::now(), c));
    }
}

/// The first failed check names the condition's message; warnings do not fail it. Pure.
pub fn verdict(location: &str, checks: &[Check]) -> Cond {
    const T: &str = condition::PREREQUISITES_MET;
    let failed: Vec<&Check> = checks.iter().filter(|c| c.verdict == Verdict::Fail).collect();
    match failed.first() {
        None => Cond::yes(
            T,
            Reason::PrerequisitesMet,
            format!("{location}: no check failed ({} checks of lockstep doctor)", checks.len()),
        ),
        Some(c) => {
            let more = match failed.len() {
                1 => String::new(),
                n => format!(" ({} more failed: run `lockstep doctor` for all)", n - 1),
            };
            let todo = c.what_to_do.as_deref().map(|t| format!("; {t}")).unwrap_or_default();
            Cond::no(
                T,
                Reason::PrerequisiteFailed,
                format!("{location}: {}: {}{todo}{more}", c.name, c.detail),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::conditions::Status;

    #[test]
    fn the_first_failure_names_the_check_and_what_to_do() {
        let checks = vec![
            Check::pass("postgresql version", "16"),
            Check::warn("connection headroom", "little", "raise"),
            Check::fail(
                "privileges on database app",
                "role r lacks CREATE: migrations",
                "grant create on database \"app\" to \"r\"",
            ),
            Check::fail("privileges on schema s", "role r lacks CREATE", "grant"),
        ];
        let c = verdict("db:5432/app", &checks);
        assert_eq!(
            (c.type_, c.status, c.reason),
            ("PrerequisitesMet", Status::False, Reason::PrerequisiteFailed)
        );
        assert_eq!(
            c.message,
            "db:5432/app: privileges on database app: role r lacks CREATE: migrations; grant create on database \"app\" to \"r\" \
             (1 more failed: run `lockstep doctor` for all)"
        );
        let ok = verdict("db:5432/app", &checks[..2]);
        assert_eq!((ok.status, ok.reason), (Status::True, Reason::PrerequisitesMet));
        assert_eq!(ok.message, "db:5432/app: no check failed (2 checks of lockstep doctor)");
    }
}
