use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use lockstep::{
    config::{describe_database_url, LogFormat, OperatorArgs, RelayArgs},
    crdgen,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Reliable messaging plumbing for PostgreSQL + Kafka services: outbox relay, inbox dedup, retention policy"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Kubernetes operator (OutboxRelay, InboxTable, DedupPolicy controllers).
    Operator(OperatorArgs),
    /// Run the outbox relay: publish outbox rows to Kafka, at least once, in per-key order.
    Relay(RelayArgs),
    /// Print the CRD YAML, or write one file per CRD with --out.
    Crds {
        /// Write one YAML file per CRD into this directory.
        #[arg(long, conflicts_with = "apply")]
        out: Option<PathBuf>,
        /// Apply the CRDs to the cluster (KUBECONFIG) with server-side apply and wait until they are
        /// Established; CEL rules are left out on API servers older than 1.25.
        #[arg(long)]
        apply: bool,
    },
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn,sqlx=warn".into());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Crds { apply: true, .. } => apply_crds().await,
        Command::Crds { out: None, .. } => match crdgen::render_all() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("cannot render CRDs: {e}")),
        },
        Command::Crds { out: Some(dir), .. } => match crdgen::write_all(&dir) {
            Ok(paths) => {
                paths.iter().for_each(|p| eprintln!("wrote {p}"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("cannot write CRDs to {}: {e}", dir.display())),
        },
        Command::Relay(args) => match args.resolve() {
            Ok(cfg) => {
                eprintln!(
                    "lockstep relay: {} -> {} (key {}) on {}, database {}, batch {}, poll {:?}",
                    cfg.resolved.table,
                    cfg.spec.routing.topic,
                    cfg.resolved.key,
                    cfg.bootstrap_servers,
                    describe_database_url(cfg.database_url.expose()),
                    cfg.spec.relay.batch_size,
                    cfg.resolved.poll_interval,
                );
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("stopping: finishing the batch in flight");
                    s.cancel();
                });
                match lockstep::relay::run(cfg, args.manage_schema, stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e.to_string()),
                }
            }
            Err(e) => fail(e.to_string()),
        },
        Command::Operator(args) => operator(args).await,
    }
}

async fn apply_crds() -> ExitCode {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach the Kubernetes API (KUBECONFIG or in-cluster config): {e}")),
    };
    match crdgen::apply(&client).await {
        Ok(stripped) => {
            for crd in crdgen::all() {
                eprintln!("CRD {} applied and Established", crd.metadata.name.unwrap_or_default());
            }
            if stripped {
                eprintln!("note: this API server predates CEL validation (1.25); the CEL rules were left out and the operator's validation enforces them");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}

fn fail(msg: String) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

/// Run the controllers until SIGTERM or Ctrl-C.
async fn operator(args: OperatorArgs) -> ExitCode {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot reach the Kubernetes API (KUBECONFIG or in-cluster config): {e}")),
    };
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crdgen::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match crds.get_opt(&name).await {
            Ok(Some(c)) if established(&c) => {}
            Ok(Some(_)) => return fail(format!("CRD {name} exists but is not Established yet")),
            Ok(None) => {
                return fail(format!(
                    "CRD {name} is not installed: run `lockstep crds --apply` or install the Helm chart"
                ))
            }
            Err(e) => return fail(format!("cannot read CRD {name}: {e}")),
        }
    }
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        s.cancel();
    });
    match lockstep::controller::run(client, args, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}
