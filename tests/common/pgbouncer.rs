//! A PgBouncer of a test's own in transaction pooling with one server connection per database and
//! user, in front of the test PostgreSQL: every client's transactions run on the same server
//! session. PgBouncer must be installed (Debian package `pgbouncer`); a missing one fails the test.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
    user: String,
    database: String,
}

fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("LOCKSTEP_PGBOUNCER_BIN") {
        return p.into();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("pgbouncer"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("pgbouncer is not installed: apt-get install pgbouncer (or set LOCKSTEP_PGBOUNCER_BIN)"))
}

extern "C" {
    fn geteuid() -> u32;
}

impl PgBouncer {
    /// PgBouncer (pool_mode=transaction, default_pool_size=1) in front of `url`'s server.
    pub fn start(url: &str) -> PgBouncer {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("a postgres:// URL");
        let user = opts.get_username().to_owned();
        let database = opts.get_database().unwrap_or(&user).to_owned();
        // user[:password]@ after the scheme (sqlx does not hand the password back).
        let userinfo = url.split("://").nth(1).and_then(|r| r.split_once('@')).map_or("", |(u, _)| u);
        let password = userinfo.split_once(':').map_or("", |(_, p)| p).to_owned();
        let dir = super::private_pg_dir("pgbouncer");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ini = format!(
            "[databases]\n{database} = host={} port={} dbname={database}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = transaction\ndefault_pool_size = 1\n\
             max_client_conn = 100\nignore_startup_parameters = extra_float_digits,options\n",
            opts.get_host(),
            opts.get_port(),
            users = dir.join("users.txt").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"{password}\"\n")).unwrap();
        let mut cmd = Command::new(binary());
        // PgBouncer refuses to run as root.
        if unsafe { geteuid() } == 0 {
            let st = Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().unwrap();
            assert!(st.success());
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("start pgbouncer");
        let mut b = PgBouncer {
            port,
            dir,
            child,
            user,
            database,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = b.child.try_wait().unwrap() {
                panic!("pgbouncer exited ({status}):\n{}", b.log());
            }
            assert!(Instant::now() < deadline, "pgbouncer did not listen:\n{}", b.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// A URL of the database through this PgBouncer (no password: trust).
    pub fn url(&self) -> String {
        format!("postgres://{}@127.0.0.1:{}/{}", self.user, self.port, self.database)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
