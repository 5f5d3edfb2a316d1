//! A Kafka-protocol broker reachable over TLS only: a tansu of the test's own on a plain port,
//! advertised on the port of a TLS-terminating proxy (socat, from Debian) in front of it, with a
//! CA and a server certificate the test makes with the openssl CLI. Optionally with SASL
//! (`tansu broker --authentication`) and a SCRAM-SHA-512 user written into tansu's storage.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha512};

use super::{env, unique};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 and localhost it signed (`server.pem`,
/// `server.key`), in `dir`.
pub fn make_certs(dir: &Path, ca_name: &str) {
    let subj = format!("/CN={ca_name}");
    run(
        dir,
        "openssl",
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subj,
        ],
    );
    run(
        dir,
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(
        dir,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

/// A client certificate (`client.pem`, PKCS#8 `client.key`) for `cn`, signed by the CA of
/// [`make_certs`] in `dir`.
pub fn make_client_cert(dir: &Path, cn: &str) {
    let subj = format!("/CN={cn}");
    let req = [
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        &subj,
    ];
    run(dir, "openssl", &req);
    // X.509 v3 (the extensions make it so): webpki refuses v1 certificates.
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    let sign = [
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
        "-extfile",
        "client.ext",
    ];
    run(dir, "openssl", &sign);
}

pub struct TlsBroker {
    /// Where clients connect (the proxy) and what the broker advertises.
    pub tls_port: u16,
    /// tansu's own plain listener, behind the proxy.
    pub plain_port: u16,
    pub dir: PathBuf,
    tansu: Child,
    proxy: Child,
}

impl TlsBroker {
    /// Certificates, tansu (with SASL required when `sasl`), then the proxy; returns once both listen.
    pub fn start(sasl: bool) -> Self {
        let dir = PathBuf::from(env("LOCKSTEP_TESTENV_DIR")).join("private-tansu").join(unique("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        make_certs(&dir, "lockstep test CA");
        let (tls_port, plain_port) = (free_port(), free_port());
        let listen = format!("tcp://127.0.0.1:{plain_port}");
        let advertised = format!("tcp://127.0.0.1:{tls_port}");
        let mut args = vec!["broker", "--listener-url", &listen, "--advertised-listener-url", &advertised];
        args.extend(["--storage-engine", "sqlite://tansu.db"]);
        if sasl {
            args.push("--authentication");
        }
        let tansu = Command::new(env("LOCKSTEP_TANSU_BIN"))
            .args(&args)
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("tansu.log")).unwrap())
            .spawn()
            .expect("start tansu");
        // -d -d: one line per connection and the TLS version and cipher of each handshake.
        let proxy = Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!(
                "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert=server.pem,key=server.key,verify=0"
            ))
            .arg(format!("TCP:127.0.0.1:{plain_port}"))
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
            .spawn()
            .expect("start socat (apt-get install socat)");
        let b = TlsBroker {
            tls_port,
            plain_port,
            dir,
            tansu,
            proxy,
        };
        for port in [plain_port, tls_port] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "nothing listens on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        b.sqlite("create index if not exists lockstep_header_record on header (topition, offset_id);");
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Client settings for TLS to this broker, verifying it with the test's CA.
    pub fn ssl_settings(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("security.protocol".to_owned(), "SSL".to_owned()),
            ("ssl.ca.location".to_owned(), self.ca().display().to_string()),
        ])
    }

    /// Run SQL on tansu's sqlite database (retried while tansu holds it busy); returns the output.
    pub fn sqlite(&self, sql: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("sqlite3")
                .args(["-cmd", ".timeout 30000"])
                .arg(self.dir.join("tansu.db"))
                .arg(sql)
                .output()
                .expect("run sqlite3");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "sqlite3 on tansu's database: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Store a SCRAM-SHA-512 credential for `user` the way AlterUserScramCredentials would.
    pub fn add_scram_user(&self, user: &str, password: &str) {
        let salt: Vec<u8> = uuid::Uuid::new_v4().as_bytes().to_vec();
        let iterations = 4096;
        let salted = pbkdf2_sha512(password.as_bytes(), &salt, iterations);
        let stored_key = Sha512::digest(hmac_sha512(&salted, b"Client Key"));
        let server_key = hmac_sha512(&salted, b"Server Key");
        // mechanism 2 is SCRAM-SHA-512 (Kafka's numbering); the cluster row exists once tansu runs.
        let inserted = self.sqlite(&format!(
            "insert into scram_credential (cluster, username, mechanism, salt, iterations, stored_key, server_key)
             select id, '{user}', 2, x'{}', {iterations}, x'{}', x'{}' from cluster where name = 'tansu_cluster';
             select changes();",
            hex(&salt),
            hex(&stored_key),
            hex(&server_key)
        ));
        assert_eq!(inserted.trim(), "1", "SCRAM credential stored");
    }

    /// The compression codecs (batch attributes & 7: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd) of
    /// the batches tansu stored for `topic`.
    pub fn stored_codecs(&self, topic: &str) -> Vec<i64> {
        self.sqlite(&format!(
            "select distinct r.attributes & 7 from record r join topition tp on r.topition = tp.id
             join topic t on tp.topic = t.id where t.name = '{topic}' order by 1;"
        ))
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
    }

    /// What the proxy logged: one line per accepted connection and per TLS handshake.
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        for child in [&mut self.tansu, &mut self.proxy] {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac_sha512(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > 128 {
        Sha512::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(128, 0);
    let pad = |x: u8| k.iter().map(|b| b ^ x).collect::<Vec<u8>>();
    let inner = Sha512::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    Sha512::new().chain_update(pad(0x5c)).chain_update(inner).finalize().to_vec()
}

/// PBKDF2-HMAC-SHA512, one 64-byte block (SCRAM's SaltedPassword).
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut u = hmac_sha512(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut t = u.clone();
    for _ in 1..iterations {
        u = hmac_sha512(password, &u);
        t.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
    }
    t
}
