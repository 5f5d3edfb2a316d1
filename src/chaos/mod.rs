//! `lockstep chaos`: effectively-once measured across every hop. Writers commit orders with their
//! outbox rows (and roll some back); relays publish them; consumers apply each order's effect
//! through the inbox. Meanwhile relays and consumers are SIGKILLed, the broker is paused and
//! restarted, the database restarted once. At the end every committed order must have exactly one
//! effect, no rolled-back order any, and each key's first applications must be in order; the
//! measured duplicate delivery rate and dedup hit ratio are printed.
//!
//! The broker and database faults are shell commands (`--broker-pause` ...), so the same run
//! points at a test environment (`scripts/chaos`) or at a user's own servers.

mod amqp_consumer;
mod consumer;
mod faults;
mod nats_consumer;
mod verify;

use std::{path::PathBuf, time::Duration};

pub use self::consumer::{run as consume, ConsumeArgs};
use self::faults::{Fault, Faults};
use crate::{
    core::sql::{quote_ident, Ident, QualifiedName},
    tables::schema::{migrate, TableKind},
};

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// PostgreSQL URL of a database the run may create a schema in (dropped at the end). Never logged.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// The broker: kafka, nats (JetStream; the run creates its own stream) or rabbitmq.
    #[arg(long, value_enum, default_value = "kafka")]
    pub broker: crate::config::BrokerArg,
    /// Kafka bootstrap servers, host:port[,host:port...]; the run creates its own topic.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "")]
    pub bootstrap_servers: String,
    /// NATS server URL, with --broker nats.
    #[arg(long, env = "NATS_URL", default_value = "")]
    pub nats_url: String,
    /// RabbitMQ URL without credentials, with --broker rabbitmq (AMQP_USER and AMQP_PASSWORD_FILE
    /// give them); the run declares its own exchange and quorum queue.
    #[arg(long, env = "AMQP_URL", default_value = "")]
    pub amqp_url: String,
    /// Events (orders) committed; about a tenth more are written in transactions that roll back.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Distinct keys (customers) the orders are spread over; per-key order is checked.
    #[arg(long, default_value_t = 500)]
    pub keys: u64,
    /// Partitions of the run's topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Relay processes (one active, the others standing by).
    #[arg(long, default_value_t = 2)]
    pub relays: usize,
    /// Consumer processes in the run's consumer group.
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// Faults of each kind at least (the run goes on until each kind reached it).
    #[arg(long, default_value_t = 20)]
    pub faults: u32,
    /// Time between two faults.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    pub fault_every: Duration,
    /// Shell command that pauses the broker (e.g. `kill -STOP <pid>`); with --broker-resume.
    #[arg(long, requires = "broker_resume")]
    pub broker_pause: Option<String>,
    /// Shell command that resumes the broker paused by --broker-pause (e.g. `kill -CONT <pid>`).
    #[arg(long)]
    pub broker_resume: Option<String>,
    /// Shell command that stops and starts the broker again.
    #[arg(long)]
    pub broker_restart: Option<String>,
    /// Shell command that restarts the database (run once, half-way).
    #[arg(long)]
    pub database_restart: Option<String>,
    /// Where the relays' and consumers' logs go.
    #[arg(long, default_value = "chaos")]
    pub work_dir: PathBuf,
    /// Give up waiting for the last effects after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
}

/// One run's names: its schema, topic and consumer group.
#[derive(Debug, Clone)]
pub struct Run {
    pub schema: String,
    pub topic: String,
    pub group: String,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<bool> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let run = Run {
        schema: format!("chaos_{id}"),
        topic: format!("lockstep.chaos.{id}"),
        group: format!("lockstep-chaos-{id}"),
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let pool = consumer::pool(&args.database_url, 4)?;
    prepare(&pool, &args, &run).await?;
    println!(
        "chaos run {id}: {} events over {} keys, schema {}, topic {} ({} partitions)",
        args.events, args.keys, run.schema, run.topic, args.partitions
    );

    if args.broker_pause.is_none() && args.broker_restart.is_none() {
        println!("no --broker-pause/--broker-restart: the broker is not faulted in this run");
    }
    if args.database_restart.is_none() {
        println!("no --database-restart: the database is not restarted in this run");
    }
    let mut faults = Faults::start(&args, &run)?;
    faults.start_consumers().await?;
    let started = std::time::Instant::now();
    // Paced so the writes last as long as the faults: every kind reaches its count mid-flow.
    let span = args.fault_every * (args.faults * faults.kinds().len() as u32).max(1);
    let writer = tokio::spawn(verify::write(pool.clone(), run.schema.clone(), args.events, args.keys, span));
    let mut db_restarted = args.database_restart.is_none();
    let mut failed = 0;
    while !writer.is_finished() || !faults.reached(args.faults) {
        if failed >= 10 {
            faults.stop().await;
            writer.abort();
            anyhow::bail!(
                "10 faults could not be injected (see the messages above); faults so far: {}",
                faults.summary()
            );
        }
        tokio::time::sleep(args.fault_every).await;
        let written = verify::committed(&pool, &run.schema).await.unwrap_or(0);
        faults.restart_exited().await?;
        let fault = if !db_restarted && written >= args.events / 2 {
            Fault::DatabaseRestart
        } else {
            faults.next_kind()
        };
        if faults.inject(fault).await {
            db_restarted |= fault == Fault::DatabaseRestart;
        } else {
            failed += 1;
        }
    }
    let write_errors = writer.await??;
    println!(
        "writes done after {:.0?} ({write_errors} transactions failed and were retried); faults: {}",
        started.elapsed(),
        faults.summary()
    );
    let settled = settle(&pool, &run.schema, args.settle_timeout, &mut faults).await;
    let claims = faults.scrape_all().await;
    faults.stop().await;
    let report = verify::check(&pool, &run.schema).await?;
    println!("{}", report.render(&claims, settled));
    Ok(report.passed() && settled && faults.reached(args.faults))
}

/// Wait until every committed order has an effect and the outbox is empty, restarting relays and
/// consumers that exited meanwhile.
async fn settle(pool: &sqlx::PgPool, schema: &str, timeout: Duration, faults: &mut Faults) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        // Redeliveries still in flight would add (deduplicated) claims, not effects.
        if let Ok(0) = verify::unsettled(pool, schema).await {
            return true;
        }
        if let Err(e) = faults.restart_exited().await {
            eprintln!("chaos: {e}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// The run's schema: orders, the outbox and inbox lockstep migrates, effects; and its topic.
async fn prepare(pool: &sqlx::PgPool, args: &ChaosArgs, run: &Run) -> anyhow::Result<()> {
    let schema = Ident::parse(&run.schema)?;
    let q = quote_ident(&run.schema);
    let mut conn = pool.acquire().await?;
    for sql in [
        format!("create schema if not exists {q}"),
        format!("create table {q}.orders (id text primary key, key text not null, n integer not null)"),
        format!(
            "create table {q}.effects (seq bigint generated always as identity primary key, order_id text not null, key text not null, n integer not null)"
        ),
        format!("create table {q}.rolled_back (id text primary key)"),
    ] {
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    for (kind, table) in [
        (TableKind::Outbox, "outbox"),
        (TableKind::DeadLetter, "outbox_dead_letter"),
        (TableKind::Inbox, "inbox"),
    ] {
        let t = QualifiedName {
            schema: schema.clone(),
            table: Ident::parse(table)?,
        };
        migrate(&mut conn, kind, &t, true).await?;
    }
    match args.broker {
        crate::config::BrokerArg::Kafka => {
            let admin = crate::clients::kafka::Admin::new(&args.bootstrap_servers, &Default::default(), Duration::from_secs(30))?;
            admin.create_topic(&run.topic, args.partitions, 1, &Default::default()).await?;
        }
        crate::config::BrokerArg::Rabbitmq => {
            amqp_consumer::declare(&args.amqp_url, &run.topic).await?;
            // RabbitMQ 3.10 can lose a queue its node stops a moment after declaring it.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        crate::config::BrokerArg::Nats => {
            let settings = crate::core::nats_settings::NatsSettings {
                servers: vec![args.nats_url.clone()],
                ack_timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let admin = crate::clients::nats_admin::NatsAdmin::connect(&settings)
                .await
                .map_err(anyhow::Error::msg)?;
            let stream = crate::crd::DesiredStream {
                name: stream_name(&run.topic),
                subjects: vec![run.topic.clone()],
                storage: crate::crd::StreamStorage::File,
                replicas: 1,
                max_age: Duration::ZERO,
                duplicate_window: Duration::from_secs(120),
                discard: crate::crd::Discard::Old,
                max_bytes: None,
                ignore: Default::default(),
            };
            admin.create(&stream).await.map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

/// The run's stream: its subject with the dots streams may not hold.
pub fn stream_name(subject: &str) -> String {
    subject.replace('.', "_")
}
