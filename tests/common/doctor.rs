//! `lockstep doctor`, the real binary, as the doctor tests run it.

use std::process::Command;

/// The doctor's exit code, stdout and stderr. The test environment's DATABASE_URL and
/// KAFKA_BOOTSTRAP_SERVERS (and the NATS and RabbitMQ settings) are not passed on: each test names what it checks.
pub fn doctor(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .arg("doctor")
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .env_remove("LOCKSTEP_MANAGE_SCHEMA")
        .env_remove("NATS_URL")
        .env_remove("AMQP_URL")
        .env_remove("AMQP_USER")
        .env_remove("AMQP_PASSWORD_FILE")
        .env_remove("RABBITMQ_MANAGEMENT_URL")
        .output()
        .expect("run lockstep doctor");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    println!("$ lockstep doctor {}\n{stdout}{stderr}", args.join(" "));
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// The first line of `out` starting with `prefix`.
pub fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
}
