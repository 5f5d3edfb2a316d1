//! PostgreSQL servers of a test's own (for tests that stop and start the database), and the
//! folders they and other private servers live in.
//!
//! The folders come from `scripts/testenv private-dir`: as root the servers run as `postgres`,
//! which cannot reach a clone in a 0700 directory (root's home, `mktemp -d`), so they live under
//! /var/tmp, where `scripts/testenv down` also stops what a killed run left running.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use super::{env, unique};

extern "C" {
    fn geteuid() -> u32;
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A command running the PostgreSQL program `bin` of LOCKSTEP_PG_BIN, as `postgres` when root
/// (PostgreSQL refuses to run as root).
pub fn pg_command(bin: &str) -> Command {
    let path = PathBuf::from(env("LOCKSTEP_PG_BIN")).join(bin);
    if unsafe { geteuid() } == 0 {
        let mut c = Command::new("runuser");
        // postgres may not enter the test's working directory (a clone in a 0700 directory).
        c.args(["-u", "postgres", "--"]).arg(path).current_dir("/");
        c
    } else {
        Command::new(path)
    }
}

/// A new folder (mode 0700; as root, owned by postgres) for a test's own server.
pub fn private_pg_dir(name: &str) -> PathBuf {
    private_dir_in(repo(), Path::new(&env("LOCKSTEP_TESTENV_DIR")), name)
}

/// A private folder as the checkout `repo`, with test state in `state`, makes it.
pub fn private_dir_in(repo: &Path, state: &Path, name: &str) -> PathBuf {
    let out = Command::new(repo.join("scripts/testenv"))
        .args(["private-dir", &unique(name)])
        .env("LOCKSTEP_TESTENV_DIR", state)
        .output()
        .expect("run scripts/testenv private-dir");
    assert!(
        out.status.success(),
        "scripts/testenv private-dir: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn run_as_postgres(bin: &str, args: &[&str]) -> std::process::Output {
    let out = pg_command(bin).args(args).output().expect("run a PostgreSQL command");
    assert!(
        out.status.success(),
        "{bin} {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PostgreSQL of a test's own, for tests that stop and start the database.
pub struct PrivatePostgres {
    pub dir: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_in(private_pg_dir("pg"))
    }

    /// initdb and start in `dir` (a folder from `private_dir_in`).
    pub fn start_in(dir: PathBuf) -> Self {
        run_as_postgres(
            "initdb",
            &["-D", dir.join("data").to_str().unwrap(), "-A", "trust", "-U", "postgres"],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = PrivatePostgres { dir, port };
        pg.start_again();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_again(&self) {
        let data = self.dir.join("data");
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, data.display());
        run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                data.join("log").to_str().unwrap(),
                "-w",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        run_as_postgres(
            "pg_ctl",
            &["-D", self.dir.join("data").to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = pg_command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
