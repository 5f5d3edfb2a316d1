//! Verdicts on the database server from facts gathered by `database`. Pure.

use super::Check;

/// PostgreSQL 13 brought `pg_current_xact_id()` and `pg_snapshot_xmin()`, which the outbox's
/// `txid` column and the relay's read (rows of committed transactions only) rest on.
pub const MIN_SERVER_VERSION_NUM: i32 = 130000;

pub fn version(server_version_num: i32, server_version: &str) -> Check {
    let name = "postgresql version";
    if server_version_num >= MIN_SERVER_VERSION_NUM {
        Check::pass(name, format!("{server_version} (13 or newer: pg_current_xact_id)"))
    } else {
        Check::fail(
            name,
            format!("{server_version} is older than 13: the outbox's txid column needs pg_current_xact_id()"),
            "upgrade PostgreSQL to 13 or newer",
        )
    }
}

pub fn standby(in_recovery: bool) -> Check {
    let name = "primary server";
    if in_recovery {
        Check::fail(
            name,
            "the URL reaches a hot standby (pg_is_in_recovery() is true): read-only, the relay refuses it",
            "point the URL at the primary (or at a read-write service of the cluster)",
        )
    } else {
        Check::pass(name, "not a standby (pg_is_in_recovery() is false)")
    }
}

/// What two connections opened at once saw of their server sessions. Each sets a session
/// setting (the relay's lock-session marker, `tables::locks::MARKER`) to its own value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolerFacts {
    /// Backend pid of the first connection, before and after the second one ran a statement.
    pub first_pid: (i32, i32),
    /// The first connection's marker as read on it afterwards (None: gone).
    pub first_marker_after: Option<String>,
    pub first_marker: String,
    pub second_pid: i32,
    /// What the second connection read of the marker before setting its own.
    pub second_saw: Option<String>,
}

/// A transaction pooler runs the two clients' statements on one server session, or moves a
/// client to another one: the session (and so the relay's advisory lock) is not the client's.
pub fn pooler(f: &PoolerFacts) -> Check {
    let name = "session pooling";
    let shared = f.first_pid.0 == f.second_pid || f.second_saw.as_deref() == Some(f.first_marker.as_str());
    let moved = f.first_pid.0 != f.first_pid.1 || f.first_marker_after.as_deref() != Some(f.first_marker.as_str());
    if shared || moved {
        let seen = if shared {
            "two client connections reached the same server session"
        } else {
            "a client connection moved to another server session between two statements"
        };
        Check::fail(
            name,
            format!("{seen}: a transaction pooler (PgBouncer pool_mode=transaction, say) is in between; the relay's session lock would not hold"),
            "connect lockstep directly to PostgreSQL, or through a pooler in session mode",
        )
    } else {
        Check::pass(name, "each connection keeps its own server session (direct, or session pooling)")
    }
}

/// The server's connection limits and use, and what lockstep will add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadroomFacts {
    pub max_connections: i64,
    /// superuser_reserved_connections (+ reserved_connections on 16+): not for an ordinary role.
    pub reserved: i64,
    /// Connections open now (every database, every role).
    pub in_use: i64,
    /// The role's connection limit (None: unlimited) and its connections now.
    pub role_limit: Option<i64>,
    pub role_in_use: i64,
    /// Connections lockstep will hold at most.
    pub needed: i64,
}

/// FAIL when lockstep's connections do not fit; WARN when they fit once but not twice (a
/// rolling update of the relay opens the new pods' connections before the old ones close).
pub fn headroom(f: &HeadroomFacts) -> Check {
    let name = "connection headroom";
    let free = f.max_connections - f.reserved - f.in_use;
    let role_free = f.role_limit.map(|l| l - f.role_in_use);
    let room = role_free.map_or(free, |r| r.min(free));
    let limit = match (f.role_limit, role_free) {
        (Some(l), Some(r)) if r < free => format!("the role's connection limit {l} leaves {r}"),
        _ => format!(
            "max_connections {} less {} reserved and {} open leaves {free}",
            f.max_connections, f.reserved, f.in_use
        ),
    };
    let detail = format!("lockstep needs up to {} connections; {limit}", f.needed);
    if room < f.needed {
        Check::fail(
            name,
            detail,
            "raise max_connections (or the role's CONNECTION LIMIT), or close idle connections",
        )
    } else if room < 2 * f.needed {
        Check::warn(
            name,
            detail,
            "a rolling update of the relay briefly needs twice as many: leave that much room",
        )
    } else {
        Check::pass(name, detail)
    }
}

/// The connection itself failed: nothing else about the database can be checked.
pub fn unreachable(location: &str, error: &str, refused_login: bool) -> Check {
    let todo = if refused_login {
        "check the user name and password in the URL (and pg_hba.conf)"
    } else {
        "check the host, port and TLS settings of the URL, and that the server runs"
    };
    Check::fail("database connection", format!("cannot connect to {location}: {error}"), todo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    #[test]
    fn version_13_is_the_minimum() {
        assert_eq!(version(130000, "13.0").verdict, Verdict::Pass);
        assert_eq!(version(160002, "16.2").verdict, Verdict::Pass);
        let old = version(120018, "12.18");
        assert_eq!(old.verdict, Verdict::Fail);
        assert!(old.detail.contains("pg_current_xact_id"));
    }

    #[test]
    fn standby_fails() {
        assert_eq!(standby(true).verdict, Verdict::Fail);
        assert_eq!(standby(false).verdict, Verdict::Pass);
    }

    fn direct() -> PoolerFacts {
        PoolerFacts {
            first_pid: (10, 10),
            first_marker_after: Some("a".into()),
            first_marker: "a".into(),
            second_pid: 11,
            second_saw: None,
        }
    }

    #[test]
    fn a_shared_or_moved_session_is_a_transaction_pooler() {
        assert_eq!(pooler(&direct()).verdict, Verdict::Pass);
        let same = PoolerFacts {
            second_pid: 10,
            ..direct()
        };
        assert!(pooler(&same)
            .detail
            .starts_with("two client connections reached the same server session"));
        let seen = PoolerFacts {
            second_saw: Some("a".into()),
            ..direct()
        };
        assert_eq!(pooler(&seen).verdict, Verdict::Fail);
        let moved = PoolerFacts {
            first_pid: (10, 12),
            ..direct()
        };
        assert!(pooler(&moved).detail.starts_with("a client connection moved"));
        let lost = PoolerFacts {
            first_marker_after: None,
            ..direct()
        };
        assert_eq!(pooler(&lost).verdict, Verdict::Fail);
    }

    fn facts(in_use: i64, role_limit: Option<i64>) -> HeadroomFacts {
        HeadroomFacts {
            max_connections: 100,
            reserved: 3,
            in_use,
            role_limit,
            role_in_use: 2,
            needed: 12,
        }
    }

    #[test]
    fn headroom_fails_below_the_need_and_warns_below_twice_it() {
        let ok = headroom(&facts(10, None));
        assert_eq!(ok.verdict, Verdict::Pass);
        assert_eq!(
            ok.detail,
            "lockstep needs up to 12 connections; max_connections 100 less 3 reserved and 10 open leaves 87"
        );
        assert_eq!(headroom(&facts(80, None)).verdict, Verdict::Warn, "17 free: once, not twice");
        assert_eq!(headroom(&facts(90, None)).verdict, Verdict::Fail, "7 free");
        let limited = headroom(&facts(10, Some(10)));
        assert_eq!(limited.verdict, Verdict::Fail);
        assert_eq!(
            limited.detail,
            "lockstep needs up to 12 connections; the role's connection limit 10 leaves 8"
        );
    }
}
