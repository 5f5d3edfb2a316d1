//! Starting the relay: its tables (migrated or checked), producer, measurements and purge, then
//! the lock session that publishes (`session`).

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use futures::FutureExt;
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};
use tokio_util::sync::CancellationToken;

use super::{cleanup, metrics, session, session::Session, Relay, RelayError, RelayMetrics};
use crate::{
    clients::db::describe_database_url,
    clients::http::Health,
    config::RelayConfig,
    crd::Cleanup,
    tables::schema::{self, OutboxTables},
};

/// The line `lockstep relay` prints when it starts.
pub fn banner(cfg: &RelayConfig) -> String {
    let r = &cfg.resolved;
    format!(
        "lockstep relay: {} -> {} (key {}) on {}, database {}, batch {}, poll {:?}",
        r.table,
        r.topic_template.text(),
        r.key,
        match (&cfg.nats, &cfg.amqp) {
            (Some(n), _) => format!("NATS {}", n.servers.join(",")),
            (None, Some(a)) => format!("RabbitMQ {} exchange {:?}", cfg.bootstrap_servers, a.exchange),
            (None, None) => cfg.bootstrap_servers.clone(),
        },
        describe_database_url(cfg.database_url.expose()),
        r.batch_size,
        r.poll_interval,
    )
}

/// Run the relay until `stop`: migrate (or verify), wait for the lock, publish, repeat.
pub async fn run(cfg: RelayConfig, stop: CancellationToken) -> anyhow::Result<()> {
    run_with_metrics(cfg, stop, Arc::new(RelayMetrics::default())).await
}

/// `run`, recording into the caller's metrics.
pub async fn run_with_metrics(cfg: RelayConfig, stop: CancellationToken, metrics: Arc<RelayMetrics>) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    let m = metrics.clone();
    let addr = crate::clients::http::serve(
        cfg.metrics_addr,
        Arc::new(move || m.render()),
        health.clone(),
        stop.clone().cancelled_owned(),
    )
    .await?;
    let where_ = describe_database_url(cfg.database_url.expose());
    let host = crate::tables::identity::host_name();
    tracing::info!(%addr, table = %cfg.resolved.table, database = %where_, host = host.as_deref().unwrap_or(""), "relay starting");
    let opts: PgConnectOptions = crate::clients::db::parse_database_url(cfg.database_url.expose())
        .ok_or_else(|| anyhow::anyhow!("the database URL does not parse as a postgres:// URL (its text is not shown)"))?;
    let opts = opts.application_name(&crate::tables::identity::application_name(host.as_deref()));
    // LISTEN and the measurements: a dead relay's sessions go within DEAD_PEER_TIMEOUT too.
    let pool = PgPoolOptions::new()
        // LISTEN, the measurements, the MarkPublished purge.
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(|conn, _| Box::pin(session::configure(conn)))
        .connect_lazy_with(opts.clone());

    let Some(tables) = prepare_tables(&pool, &cfg, &stop).await? else {
        return Ok(());
    };
    let mut relay = Relay::new(cfg.clone(), metrics.clone(), &tables)?;
    let active = Arc::new(AtomicBool::new(false));
    if let (Cleanup::MarkPublished, Some(retention)) = (cfg.resolved.cleanup, cfg.resolved.published_retention) {
        cleanup::spawn_purge(
            pool.clone(),
            cfg.resolved.table.clone(),
            retention,
            metrics.clone(),
            active.clone(),
            stop.clone(),
        );
    }
    metrics::spawn_measurements(
        pool.clone(),
        cfg.clone(),
        metrics.clone(),
        relay.current_producer(),
        active.clone(),
        health,
        stop.clone(),
    );
    let session = Session {
        key: crate::tables::locks::lock_key(&cfg.resolved.table),
        cfg: &cfg,
        opts,
        pool,
        channel: tables.channel,
        active,
        metrics,
        stop: &stop,
    };
    let result = session.run(&mut relay).await;
    relay.publisher().flush(Duration::from_secs(10)).await;
    tracing::info!("relay stopped");
    Ok(result?)
}

/// Migrate (or verify) the tables, retrying while the database is unreachable; None when stopped.
async fn prepare_tables(pool: &PgPool, cfg: &RelayConfig, stop: &CancellationToken) -> anyhow::Result<Option<OutboxTables>> {
    let r = &cfg.resolved;
    loop {
        let result = async {
            let mut c = pool.acquire().await?;
            session::refuse_standby(&mut c).await?;
            let tables = schema::prepare_outbox(&mut c, &r.table, &r.dead_letter_table, r.manage_schema)
                .boxed()
                .await?;
            if r.cleanup == Cleanup::MarkPublished {
                let missing = schema::ensure_published_indexes(&mut c, &r.table, r.manage_schema).await?;
                if !missing.is_empty() {
                    let ddl: Vec<String> = schema::published_indexes(&r.table).into_iter().map(|(_, d)| d).collect();
                    tracing::warn!(
                        table = %r.table,
                        ?missing,
                        "cleanup MarkPublished without its indexes (manageSchema is false): every read scans the published \
                         rows; create them with: {}",
                        ddl.join("; ")
                    );
                }
            }
            if r.buckets > 1 {
                prepare_buckets(&mut c, r).await?;
            }
            Ok::<_, RelayError>(tables)
        }
        .await;
        match result {
            Ok(tables) => return Ok(Some(tables)),
            Err(RelayError::Schema(e)) if e.is_permanent() => anyhow::bail!("{e}"),
            Err(e) if e.is_fatal() => anyhow::bail!("{e}"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot prepare the outbox tables; retrying in 2s");
                tokio::select! { _ = stop.cancelled() => return Ok(None), _ = tokio::time::sleep(Duration::from_secs(2)) => {} }
            }
        }
    }
}

/// The bucket function and index (`schema::buckets`): created when the schema is lockstep's,
/// else the function is required and a missing index is warned about (every read then scans).
async fn prepare_buckets(c: &mut sqlx::PgConnection, r: &crate::crd::ValidOutboxRelay) -> Result<(), RelayError> {
    use crate::tables::schema::buckets;
    let missing = buckets::ensure(c, &r.table, r.key, r.buckets, r.cleanup, r.manage_schema).await?;
    if missing.function {
        return Err(RelayError::MissingBucketFunction {
            buckets: r.buckets,
            function: buckets::function(&r.table.schema),
            ddl: buckets::function_ddl(&r.table.schema),
        });
    }
    if missing.index {
        let (_, ddl) = buckets::index(&r.table, r.key, r.buckets, r.cleanup);
        tracing::warn!(table = %r.table, "buckets without their index (manageSchema is false): every read scans the outbox; create it with: {ddl}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{store, PayloadColumn};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::config::RelayArgs,
    }

    #[test]
    fn banner_names_table_topic_key_servers_database_batch_and_poll() {
        use clap::Parser;
        let argv = [
            "relay",
            "--database-url",
            "postgres://u:secret@db:5432/app",
            "--bootstrap-servers",
            "k1:9092,k2:9092",
            "--topic",
            "orders.{type}.v1",
            "--key",
            "id",
            "--batch-size",
            "200",
            "--poll-interval",
            "250ms",
        ];
        let cfg = Cli::parse_from(argv).args.resolve().unwrap();
        assert_eq!(
            banner(&cfg),
            r#"lockstep relay: "public"."outbox" -> orders.{type}.v1 (key id) on k1:9092,k2:9092, database db:5432/app, batch 200, poll 250ms"#
        );
    }

    /// A relay whose broker is a closed loopback port: what it sends stays queued.
    fn relay_without_broker() -> Relay {
        use clap::Parser;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let argv = [
            "relay",
            "--database-url",
            "postgres://h/db",
            "--bootstrap-servers",
            &closed.to_string(),
        ];
        let argv = argv.into_iter().chain(["--topic", "t"]);
        let cfg = Cli::parse_from(argv).args.resolve().unwrap();
        let tables = schema::OutboxTables {
            payload: PayloadColumn::Json,
            dead_letter_payload: PayloadColumn::Json,
            traceparent: false,
            dead_letter_traceparent: false,
            channel: String::new(),
        };
        Relay::new(cfg, Arc::new(RelayMetrics::default()), &tables).unwrap()
    }

    /// Outbox rows of `key` with these seqs and payloads.
    fn rows(key: &str, payloads: Vec<Vec<u8>>) -> Vec<store::OutboxRow> {
        payloads
            .into_iter()
            .zip(1..)
            .map(|(payload, seq)| store::OutboxRow {
                id: uuid::Uuid::new_v4(),
                seq,
                aggregatetype: "order".into(),
                aggregateid: key.into(),
                type_: "created".into(),
                payload: Some(payload),
                headers: None,
                attempts: 0,
                created: 0.0,
                traceparent: None,
            })
            .collect()
    }

    /// A row the producer refuses at send (over message.max.bytes) holds its key out of the reads
    /// that follow, before its batch completes: the producer fails none of the key's later rows.
    #[tokio::test]
    async fn a_row_refused_at_send_holds_its_key_out_of_later_reads() {
        let mut relay = relay_without_broker();
        let batch = relay
            .send(rows("k", vec![vec![b'x'; 2_000_000], b"{}".to_vec()]), std::time::Instant::now())
            .await;
        assert_eq!(relay.excluded_keys(), ["k"], "held while its batch is in flight");
        drop(batch);
    }

    /// A rebuilt producer's messages must not outlive it in a clone someone else holds (the
    /// readiness check held one): sent when the broker came back, after the new producer resent
    /// their rows and later rows of their keys, they would put an old state last. The broker here
    /// is a closed loopback port, so the messages stay queued until purged.
    #[tokio::test]
    async fn a_rebuilt_producer_keeps_no_message_queued() {
        let mut relay = relay_without_broker();
        let rows = rows("k", vec![b"{}".to_vec(); 5]);
        let batch = relay.send(rows, std::time::Instant::now()).await;
        // A copy of the producer, as the readiness check held one.
        let held = relay.current_producer();
        let old = held.borrow().clone();
        relay.replace_producer().await.unwrap();
        let reports = tokio::time::timeout(Duration::from_secs(10), batch.reports())
            .await
            .expect("the old producer still holds the messages (no report within 10 s)");
        drop(old);
        assert_eq!(reports.len(), 5);
        for r in reports {
            assert_eq!(r.unwrap_err().reason, "PurgeQueue", "purged, not sent");
        }
        assert!(held.has_changed().unwrap(), "the readiness check is given the new producer");
    }
}
