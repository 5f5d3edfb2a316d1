use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use lockstep::{
    cli::examples,
    config::{LogFormat, OperatorArgs, RelayArgs, ReplayArgs},
    crd::crdgen,
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
    #[command(after_help = examples::OPERATOR)]
    Operator(OperatorArgs),
    /// Run the outbox relay: publish outbox rows to Kafka, NATS JetStream or RabbitMQ, at least once, in
    /// per-key order.
    #[command(after_help = examples::RELAY)]
    Relay(Box<RelayArgs>),
    /// Move dead-lettered events back into the outbox, to be published again (after the cause was
    /// fixed). Each replayed event goes out after the events of its key already published.
    #[command(after_help = examples::REPLAY)]
    Replay(ReplayArgs),
    /// Measure effectively-once end to end under faults: orders written with outbox rows, relays
    /// and consumers SIGKILLed, the broker paused and restarted, the database restarted; then
    /// check every committed order's effect applied exactly once, in per-key order.
    #[command(after_help = examples::CHAOS)]
    Chaos(lockstep::chaos::ChaosArgs),
    /// A chaos run's consumer (started by `lockstep chaos`).
    #[command(hide = true)]
    ChaosConsumer(lockstep::chaos::ConsumeArgs),
    /// Print the CRD YAML, or write one file per CRD with --out (or as Helm templates with --helm).
    #[command(after_help = examples::CRDS)]
    Crds {
        /// Write one YAML file per CRD into this directory.
        #[arg(long, conflicts_with_all = ["apply", "helm"])]
        out: Option<PathBuf>,
        /// Write one Helm template per CRD into this directory (charts/lockstep/templates/crds):
        /// created with `crds.create`, kept on uninstall, CEL rules only on Kubernetes 1.25+.
        #[arg(long, conflicts_with = "apply")]
        helm: Option<PathBuf>,
        /// Apply the CRDs to the cluster (KUBECONFIG) with server-side apply and wait until they are
        /// Established; CEL rules are left out on API servers older than 1.25.
        #[arg(long)]
        apply: bool,
    },
    /// Check that a database and a Kafka cluster can carry an OutboxRelay or an InboxTable with
    /// the settings it would use: one PASS/WARN/FAIL line per check, with what to do. Exit 0: no
    /// check failed; 1: a check failed; 2: the checks could not run.
    #[command(after_help = examples::DOCTOR)]
    Doctor(Box<lockstep::doctor::DoctorArgs>),
    /// Print a shell completion script for lockstep.
    #[command(after_help = examples::COMPLETIONS)]
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Exit status of a check (`chaos`, `doctor`): it ran and found a problem.
const EXIT_PROBLEM: u8 = 1;
/// Exit status of a check that could not run (bad input, unreachable setup); clap's usage errors
/// exit with 2 as well.
const EXIT_COULD_NOT_RUN: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    lockstep::cli::logging::init(cli.log_format);
    match cli.command {
        Command::Crds { apply: true, .. } => apply_crds().await,
        Command::Crds { helm: Some(dir), .. } => match crdgen::write_helm(&dir) {
            Ok(paths) => {
                paths.iter().for_each(|p| eprintln!("wrote {p}"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("cannot write CRD templates to {}: {e}", dir.display())),
        },
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
                eprintln!("{}", lockstep::relay::banner(&cfg));
                let stop = CancellationToken::new();
                let s = stop.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("stopping: finishing the batch in flight");
                    s.cancel();
                });
                match lockstep::relay::run(cfg, stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(e.to_string()),
                }
            }
            Err(e) => fail(e.to_string()),
        },
        Command::Operator(args) => operator(args).await,
        Command::Chaos(args) => match lockstep::chaos::run(args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(EXIT_PROBLEM),
            Err(e) => {
                eprintln!("error: chaos run: {e:#}");
                ExitCode::from(EXIT_COULD_NOT_RUN)
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lockstep", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::ChaosConsumer(args) => match lockstep::chaos::consume(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("chaos consumer: {e:#}")),
        },
        Command::Doctor(args) => ExitCode::from(lockstep::doctor::run(&args).await),
        Command::Replay(args) => match replay(&args).await {
            Ok(n) => {
                eprintln!(
                    "replayed {n} dead-lettered events into {}.{}",
                    args.outbox.schema, args.outbox.table
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

/// Verify the two tables (nothing is created), then move the rows.
async fn replay(args: &ReplayArgs) -> Result<u64, String> {
    use sqlx::Connection;
    let url = args.outbox.database_url().map_err(|e| e.to_string())?;
    let name = |t: &str| -> Result<lockstep::core::sql::QualifiedName, String> {
        Ok(lockstep::core::sql::QualifiedName {
            schema: lockstep::core::sql::Ident::parse(&args.outbox.schema).map_err(|e| format!("--schema: {e}"))?,
            table: lockstep::core::sql::Ident::parse(t).map_err(|e| format!("--table: {e}"))?,
        })
    };
    let outbox = name(&args.outbox.table)?;
    let dead_letter = name(&format!("{}{}", args.outbox.table, lockstep::crd::DEAD_LETTER_SUFFIX))?;
    let where_ = lockstep::clients::db::describe_database_url(url.expose());
    let opts = lockstep::clients::db::parse_database_url(url.expose())
        .ok_or_else(|| "the database URL does not parse as a postgres:// URL (its text is not shown)".to_owned())?;
    let mut conn = sqlx::PgConnection::connect_with(&opts)
        .await
        .map_err(|e| format!("cannot connect to {where_}: {e}"))?;
    let tables = lockstep::tables::schema::prepare_outbox(&mut conn, &outbox, &dead_letter, false)
        .await
        .map_err(|e| e.to_string())?;
    let ids = (!args.all).then_some(args.id.as_slice());
    lockstep::tables::replay::replay(&mut conn, &outbox, &dead_letter, &tables, ids)
        .await
        .map_err(|e| format!("replay failed (nothing was moved): {e}"))
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
    match lockstep::operator::run(client, args, stop).await {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// The flags, environment variables and defaults `cli_flags_and_environment_are_exact` pins
    /// (`{version}`: this crate's version).
    const FLAGS: &str = include_str!("cli/flags.txt");

    /// Every flag and environment variable of every command: deployments and scripts depend on them.
    #[test]
    fn cli_flags_and_environment_are_exact() {
        let cli = Cli::command();
        let mut lines = Vec::new();
        let mut describe = |cmd: &str, c: &clap::Command| {
            for a in c.get_arguments() {
                let long = a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| a.get_id().to_string());
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
                let default: Vec<String> = a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
                lines.push(format!("{cmd} {long} env={env} default={}", default.join(",")));
            }
        };
        describe("lockstep", &cli);
        for sub in cli.get_subcommands() {
            describe(sub.get_name(), sub);
        }
        let expected = FLAGS.replace("{version}", env!("CARGO_PKG_VERSION"));
        assert_eq!(lines.join("\n"), expected.trim_end());
    }

    /// `lockstep completions <shell>` completes every command and its flags.
    #[test]
    fn completions_know_the_commands_and_flags() {
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "lockstep", &mut out);
        let script = String::from_utf8(out).unwrap();
        for word in [
            "relay",
            "replay",
            "chaos",
            "crds",
            "completions",
            "--watch-namespace",
            "--max-gather",
        ] {
            assert!(script.contains(word), "the bash completion lacks {word}");
        }
    }

    /// Every flag says what it does, and every command shows examples (`lockstep <command> --help`).
    #[test]
    fn every_flag_has_help_and_every_command_examples() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let examples = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            if !examples.starts_with("Examples:\n  ") {
                missing.push(format!("{}: no examples", sub.get_name()));
            }
            for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{} {}", sub.get_name(), a.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help: {missing:?}");
    }
}
