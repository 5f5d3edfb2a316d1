//! `lockstep doctor`, the real binary, against the real servers: a passing setup (exit 0), a role
//! missing each privilege lockstep uses, a hot standby, a transaction pooler, an unreachable
//! server (exit 1, the FAIL line naming the problem), and settings it cannot run with (exit 2).
//!
//! tansu, the test broker, has no authorization (it answers no DescribeAcls and refuses no
//! operation): the broker's failure branches (a missing IdempotentWrite or group ACL) run against
//! librdkafka's mock cluster with errors injected, which is named as such in each test.

mod common;

use std::time::Duration;

use common::{pgbouncer::PgBouncer, standby::Standby};
use rdkafka::{
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};

use common::doctor::{doctor, line};

/// The test server's URL for `role` (trust authentication: no password).
fn url_for(role: &str) -> String {
    let url = common::env("DATABASE_URL");
    let rest = url.split_once("://").unwrap().1;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("postgres://{role}@{host}")
}

fn admin(bootstrap: &str) -> lockstep::clients::kafka::Admin {
    lockstep::clients::kafka::Admin::new(bootstrap, &Default::default(), Duration::from_secs(10)).unwrap()
}

/// The real servers, a superuser, a topic that exists (with a config value to write back) and
/// one that does not: every check passes or warns, and nothing is created.
#[tokio::test]
async fn a_passing_setup_exits_0_and_creates_nothing() {
    let s = common::pg_schema("doctorok").await;
    let bootstrap = common::kafka_bootstrap();
    let (topic, absent, group) = (common::unique("doctor"), common::unique("doctor-absent"), common::unique("doctor"));
    let config = std::collections::BTreeMap::from([("retention.ms".to_owned(), "86400000".to_owned())]);
    admin(&bootstrap).create_topic(&topic, 2, 1, &config).await.unwrap();
    let url = common::env("DATABASE_URL");
    #[rustfmt::skip]
    let (code, out, _) = doctor(&[
        "--database-url", &url, "--schema", &s.schema, "--bootstrap-servers", &bootstrap,
        "--topic", &topic, "--topic", &absent, "--group", &group,
    ]);
    assert_eq!(code, 0, "{out}");
    for check in [
        "PASS  database connection",
        "PASS  postgresql version",
        "PASS  primary server",
        "PASS  session pooling",
        "PASS  connection headroom",
        &format!("PASS  table {}.outbox: does not exist yet", s.schema),
        "PASS  privileges on database",
        &format!("PASS  privileges on schema {}", s.schema),
        "PASS  broker connection",
        &format!("PASS  create topics {topic}"),
        &format!("PASS  describe topic configs {topic}"),
        &format!("PASS  alter topic configs (IncrementalAlterConfigs) {topic}"),
        &format!("PASS  describe consumer group {group}"),
        "PASS  idempotent produce (InitProducerId) cluster",
        // tansu creates a topic asked for validate-only: the doctor does not ask.
        &format!("WARN  create topics {absent}: not tried"),
    ] {
        line(&out, check);
    }
    assert!(!out.contains("FAIL"), "{out}");
    let secret = url.split_once("://").unwrap().1.split_once('@').map(|(u, _)| u).unwrap_or_default();
    if secret.contains(':') {
        assert!(!out.contains(secret), "the URL's credentials are never printed");
    }
    let names = [topic.clone(), absent.clone()];
    let described = admin(&bootstrap).describe(&names).await.unwrap();
    assert!(!described.contains_key(&absent), "the doctor created {absent}");
    assert_eq!(described[&topic].config.get("retention.ms").map(String::as_str), Some("86400000"));
    let (code, json, _) = doctor(&["--database-url", &url, "--schema", &s.schema, "--output", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["checks"][0]["verdict"], "pass");
}

/// A role with every privilege `--for`/`--manage-schema` needs, then without `revoke`.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
    revoke: &'static str,
    /// The FAIL line starts with this (after `FAIL  `) and contains `lacks`.
    fails: &'static str,
    lacks: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "create on the database",
        args: &[],
        revoke: "revoke create on database {db} from {role}",
        fails: "privileges on database",
        lacks: "CREATE",
    },
    Case {
        name: "create on the schema",
        args: &[],
        revoke: "revoke create on schema {schema} from {role}",
        fails: "privileges on schema",
        lacks: "CREATE",
    },
    Case {
        name: "usage on the schema",
        args: &["--manage-schema", "false"],
        revoke: "revoke usage on schema {schema} from {role}",
        fails: "privileges on schema",
        lacks: "USAGE",
    },
    Case {
        name: "select on the outbox",
        args: &["--manage-schema", "false"],
        revoke: "revoke select on {schema}.outbox from {role}",
        fails: "privileges on table {s}.outbox",
        lacks: "SELECT",
    },
    Case {
        name: "update on the outbox",
        args: &["--manage-schema", "false"],
        revoke: "revoke update on {schema}.outbox from {role}",
        fails: "privileges on table {s}.outbox",
        lacks: "UPDATE",
    },
    Case {
        name: "delete on the outbox",
        args: &["--manage-schema", "false"],
        revoke: "revoke delete on {schema}.outbox from {role}",
        fails: "privileges on table {s}.outbox",
        lacks: "DELETE",
    },
    Case {
        name: "insert on the dead-letter table",
        args: &["--manage-schema", "false"],
        revoke: "revoke insert on {schema}.outbox_dead_letter from {role}",
        fails: "privileges on table {s}.outbox_dead_letter",
        lacks: "INSERT",
    },
    Case {
        name: "update on the dead-letter table",
        args: &["--manage-schema", "false"],
        revoke: "revoke update on {schema}.outbox_dead_letter from {role}",
        fails: "privileges on table {s}.outbox_dead_letter",
        lacks: "UPDATE",
    },
    Case {
        name: "insert on the migration history",
        args: &[],
        revoke: "revoke insert on {schema}.lockstep_schema_history from {role}",
        fails: "privileges on table {s}.lockstep_schema_history",
        lacks: "INSERT",
    },
    Case {
        name: "insert on the owners table",
        args: &[],
        revoke: "revoke insert on {schema}.lockstep_owners from {role}",
        fails: "privileges on table {s}.lockstep_owners",
        lacks: "INSERT",
    },
    Case {
        name: "delete on the inbox (purge)",
        args: &["--for", "inbox-table", "--table", "inbox"],
        revoke: "revoke delete on {schema}.inbox from {role}",
        fails: "privileges on table {s}.inbox",
        lacks: "DELETE",
    },
];

#[tokio::test]
async fn a_role_missing_each_privilege_fails_naming_it() {
    let s = common::pg_schema("doctorpriv").await;
    let admin = common::pool(2).await;
    // Every table lockstep touches, made by the test's (superuser) role: lockstep's role is
    // another one, granted what it needs.
    let t = s.table("outbox");
    let mut conn = s.pool.acquire().await.unwrap();
    let dead_letter = s.table("outbox_dead_letter");
    lockstep::tables::schema::prepare_outbox(&mut conn, &t, &dead_letter, true)
        .await
        .unwrap();
    let inbox = s.inbox("inbox").await;
    let me = lockstep::tables::schema::Owner {
        cluster: "c".into(),
        kind: "InboxTable".into(),
        namespace: "n".into(),
        name: "x".into(),
        uid: "u".into(),
    };
    lockstep::tables::schema::claim(&mut conn, &inbox, &me, true).await.unwrap();
    let db: String = sqlx::query_scalar("select current_database()::text")
        .fetch_one(&admin)
        .await
        .unwrap();
    let q = |id: &str| format!("\"{id}\"");
    for case in CASES {
        let role = format!("r_{}", common::unique("doctor").replace('-', "_"));
        let grants = format!(
            "create role {r} login;
             grant create on database {d} to {r};
             grant usage, create on schema {sc} to {r};
             grant select, insert, update, delete on all tables in schema {sc} to {r};",
            r = q(&role),
            d = q(&db),
            sc = q(&s.schema)
        );
        let revoke = case
            .revoke
            .replace("{db}", &q(&db))
            .replace("{role}", &q(&role))
            .replace("{schema}", &q(&s.schema));
        sqlx::raw_sql(&format!("{grants}\n{revoke}")).execute(&admin).await.unwrap();
        let url = url_for(&role);
        let mut args = vec!["--database-url", &url, "--schema", &s.schema];
        args.extend_from_slice(case.args);
        let (code, out, _) = doctor(&args);
        assert_eq!(code, 1, "{}: exit 1\n{out}", case.name);
        let fails = format!("FAIL  {}", case.fails.replace("{s}", &s.schema));
        let l = line(&out, &fails);
        assert!(l.contains(&format!("lacks {}", case.lacks)), "{}: {l}", case.name);
        assert_eq!(out.matches("FAIL").count(), 1, "{}: only that privilege fails\n{out}", case.name);
        let next = out.lines().skip_while(|x| *x != l).nth(1).unwrap_or_default();
        assert!(
            next.starts_with("  -> as the object's owner or a superuser: grant"),
            "{}: {next}",
            case.name
        );
        // The same role with the privilege back passes.
        let grant = revoke.replacen("revoke", "grant", 1).replace(" from ", " to ");
        sqlx::raw_sql(&grant).execute(&admin).await.unwrap();
        let (code, out, _) = doctor(&args);
        assert_eq!(code, 0, "{}: passes once granted\n{out}", case.name);
    }
}

#[tokio::test]
async fn a_missing_table_fails_when_lockstep_may_not_create_it() {
    let s = common::pg_schema("doctormissing").await;
    let url = common::env("DATABASE_URL");
    let (code, out, _) = doctor(&["--database-url", &url, "--schema", &s.schema, "--manage-schema", "false"]);
    assert_eq!(code, 1);
    assert!(line(&out, &format!("FAIL  table {}.outbox:", s.schema)).contains("manageSchema is false"));
    let (code, out, _) = doctor(&["--database-url", &url, "--schema", &s.schema]);
    assert_eq!(code, 0, "created by lockstep with manageSchema true:\n{out}");
}

#[tokio::test]
async fn a_hot_standby_fails() {
    let standby = Standby::start(&common::env("DATABASE_URL")).await;
    let (code, out, _) = doctor(&["--database-url", &standby.url()]);
    assert_eq!(code, 1);
    assert!(line(&out, "FAIL  primary server").contains("hot standby"));
}

#[tokio::test]
async fn a_transaction_pooler_fails() {
    let bouncer = PgBouncer::start(&common::env("DATABASE_URL"));
    let (code, out, _) = doctor(&["--database-url", &bouncer.url()]);
    assert_eq!(code, 1, "{}", bouncer.log());
    assert!(line(&out, "FAIL  session pooling").contains("transaction pooler"));
}

#[tokio::test]
async fn an_unreachable_server_fails_and_bad_settings_cannot_run() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (code, out, _) = doctor(&["--database-url", &format!("postgres://u:hunter2@127.0.0.1:{port}/x")]);
    assert_eq!(code, 1);
    assert!(line(&out, "FAIL  database connection").contains(&format!("127.0.0.1:{port}/x")));
    assert!(!out.contains("hunter2"));
    let (code, out, err) = doctor(&["--database-url", "u:hunter2@db/x"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("does not parse") && !err.contains("hunter2"), "{err}");
    let (code, _, _) = doctor(&["--database-url", "postgres://db/x", "--for", "nothing"]);
    assert_eq!(code, 2, "clap's usage error");
}

/// librdkafka's mock cluster (not tansu, which authorizes everything): InitProducerId refused
/// with ClusterAuthorizationFailed, as a broker does for a principal without IdempotentWrite.
#[tokio::test]
async fn mock_cluster_a_principal_without_idempotent_write_fails() {
    let mock = MockCluster::new(1).unwrap();
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
    );
    let url = common::env("DATABASE_URL");
    let bootstrap = mock.bootstrap_servers();
    let (code, out, _) = tokio::task::spawn_blocking(move || doctor(&["--database-url", &url, "--bootstrap-servers", &bootstrap]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "FAIL  idempotent produce (InitProducerId) cluster");
    assert!(l.contains("not authorized"), "{l}");
    assert!(
        out.contains("-> grant the client's principal the ACL IdempotentWrite on the cluster"),
        "{out}"
    );
}

/// librdkafka's mock cluster: OffsetFetch refused with GroupAuthorizationFailed, as a broker does
/// for a principal without Describe on the group.
#[tokio::test]
async fn mock_cluster_a_principal_without_describe_on_the_group_fails() {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("orders", 2, 1).unwrap();
    mock.request_errors(
        RDKafkaApiKey::OffsetFetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    let url = common::env("DATABASE_URL");
    let bootstrap = mock.bootstrap_servers();
    let args = [
        "--database-url",
        &url,
        "--for",
        "inbox-table",
        "--bootstrap-servers",
        &bootstrap,
        "--topic",
        "orders",
        "--group",
        "billing",
    ];
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (code, out, _) = tokio::task::spawn_blocking(move || doctor(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}");
    let l = line(&out, "FAIL  describe consumer group billing");
    assert!(l.contains("not authorized"), "{l}");
    assert!(
        out.contains("-> grant the client's principal the ACL Describe on group billing"),
        "{out}"
    );
}

/// EXECUTE on the advisory lock functions is PUBLIC's by default; revoked on a server of the
/// test's own (the shared one's other tests need it).
#[tokio::test]
async fn a_role_without_execute_on_the_advisory_lock_functions_fails() {
    let pg = common::PrivatePostgres::start();
    let admin = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::raw_sql(
        "create role app login; grant create on database postgres to app; grant create on schema public to app;
         revoke execute on function pg_try_advisory_lock(bigint) from public;",
    )
    .execute(&admin)
    .await
    .unwrap();
    let url = format!("postgres://app@127.0.0.1:{}/postgres", pg.port);
    let (code, out, _) = doctor(&["--database-url", &url]);
    assert_eq!(code, 1);
    assert!(line(&out, "FAIL  privileges on function pg_try_advisory_lock(bigint)").contains("role app lacks EXECUTE"));
    assert!(out.contains("-> as the object's owner or a superuser: grant execute on function pg_try_advisory_lock(bigint) to \"app\""));
    assert_eq!(out.matches("FAIL").count(), 1, "{out}");
}

/// tansu behind TLS with SASL/SCRAM required: the settings the relay gets reach it; a wrong
/// password is a failed connection (and is never printed).
#[tokio::test]
async fn the_broker_is_reached_over_tls_and_sasl_or_the_connection_fails() {
    let broker = common::tls::TlsBroker::start(true);
    broker.add_scram_user("relay", "s3cret-pass");
    let url = common::env("DATABASE_URL");
    let bootstrap = broker.bootstrap();
    let ca = format!("ssl.ca.location={}", broker.ca().display());
    let run = |password: &str| {
        #[rustfmt::skip]
        let args = [
            "--database-url", &url, "--bootstrap-servers", &bootstrap,
            "--kafka-config", "security.protocol=SASL_SSL", "--kafka-config", &ca,
            "--kafka-config", "sasl.mechanism=SCRAM-SHA-512", "--kafka-config", "sasl.username=relay",
            "--kafka-config", &format!("sasl.password={password}"),
        ];
        doctor(&args)
    };
    let (code, out, _) = run("s3cret-pass");
    assert_eq!(code, 0, "{out}");
    assert!(line(&out, "PASS  broker connection").contains("security.protocol SASL_SSL"));
    line(&out, "PASS  idempotent produce (InitProducerId) cluster");
    let (code, out, err) = run("wrong-pass");
    assert_eq!(code, 1, "{out}");
    assert!(line(&out, "FAIL  broker connection").contains("SASL authentication error"), "{out}");
    assert!(!out.contains("wrong-pass") && !err.contains("wrong-pass"));
}
