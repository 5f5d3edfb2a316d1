//! The binary's logs.

use crate::config::LogFormat;

/// Logs on stderr, text or JSON, filtered by RUST_LOG (default: info, quieter kube and sqlx).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn,sqlx=warn".into());
    // lapin logs a message RabbitMQ returned whole (payload and headers: an event's data) at
    // WARN; the relay says what was returned itself.
    let filter = filter.add_directive("lapin::returned_messages=off".parse().expect("a directive"));
    // Colours only on a terminal: a pod's log, a file or a pipe gets plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}
