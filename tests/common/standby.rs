//! A hot standby of the test server, for tests of what lockstep does on a read-only replica.

use std::path::PathBuf;

/// A hot standby of the test server: a base backup (`pg_basebackup -R`) started in recovery on a
/// port of its own, beside the tests' private servers; stopped and removed on drop.
pub struct Standby {
    dir: PathBuf,
    port: u16,
}

impl Standby {
    pub async fn start(primary: &str) -> Standby {
        let pool = sqlx::PgPool::connect(primary).await.unwrap();
        // A standby needs these at least as high as its primary's; the test server sets them on
        // its command line, which a base backup does not copy.
        let mut settings = Vec::new();
        for name in [
            "max_connections",
            "max_prepared_transactions",
            "max_worker_processes",
            "max_wal_senders",
        ] {
            let v: String = sqlx::query_scalar(&format!("show {name}")).fetch_one(&pool).await.unwrap();
            settings.push(format!("-c {name}={v}"));
        }
        let dir = super::private_pg_dir("standby");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let out = super::pg_command("pg_basebackup")
            .args(["-d", primary, "-D"])
            .arg(&dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        let standby = Standby { dir, port };
        // The backup copied the primary's log (it lives in its data folder): start this one's afresh.
        let log = standby.dir.join("log");
        if log.exists() {
            std::fs::write(&log, "").unwrap();
        }
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 {}",
            standby.dir.display(),
            settings.join(" ")
        );
        let out = super::pg_command("pg_ctl")
            .arg("-D")
            .arg(&standby.dir)
            .arg("-l")
            .arg(standby.dir.join("log"))
            .args(["-w", "-o", &opts, "start"])
            .output()
            .unwrap();
        let log = std::fs::read_to_string(standby.dir.join("log")).unwrap_or_default();
        assert!(out.status.success(), "the standby did not start:\n{log}");
        standby
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = super::pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
