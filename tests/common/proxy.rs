//! A TCP proxy of the tests' own between a relay and PostgreSQL, to cut the relay off as a network
//! partition would ([`Proxy::blackhole`]) or to move its session to another server connection as a
//! transaction pooler does ([`Proxy::repin_at`]), or to drop a connection when it sends a given
//! statement ([`Proxy::close_at`]).
//!
//! A proxy that merely stops forwarding is no partition: its kernel still acknowledges every
//! packet, keepalive probes included, so the server would never see its peer go silent. On a
//! blackhole this proxy also attaches a drop-everything socket filter (classic BPF,
//! SO_ATTACH_FILTER: no privileges needed) to each of its sockets, so incoming packets are dropped
//! before TCP sees them and nothing is acknowledged any more, in either direction; new connections
//! get no answer to their SYN. Linux only.

use std::{
    ffi::{c_ulong, c_void},
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    /// Bytes forwarded as they come (any protocol, TLS included), not PostgreSQL messages.
    raw: bool,
    cut: CancellationToken,
    /// Connections forwarding (or being cut off), and those cut off; the listener counts as one.
    open: AtomicUsize,
    silenced: AtomicUsize,
    /// The next client message containing this goes to a new server connection.
    repin: Mutex<Option<Vec<u8>>>,
    repinned: AtomicUsize,
    /// Every client message containing this ends its connection (both sides closed).
    close_at: Mutex<Option<Vec<u8>>>,
    closed: AtomicUsize,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// A proxy on 127.0.0.1 (a port of its own) to `upstream`, a PostgreSQL server.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_with(upstream, false).await
    }

    /// A proxy that forwards bytes unread (TLS to the API server, say): it can only be cut off.
    #[allow(dead_code)]
    pub async fn start_raw(upstream: SocketAddr) -> Proxy {
        Self::start_with(upstream, true).await
    }

    async fn start_with(upstream: SocketAddr, raw: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            raw,
            cut: CancellationToken::new(),
            open: AtomicUsize::new(1),
            silenced: AtomicUsize::new(0),
            repin: Mutex::new(None),
            repinned: AtomicUsize::new(0),
            close_at: Mutex::new(None),
            closed: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept(listener, shared.clone()));
        shared.tasks.lock().unwrap().push(task);
        Proxy { addr, shared }
    }

    /// `url` (a postgres:// URL naming `upstream` as host:port) through this proxy.
    pub fn url(&self, url: &str) -> String {
        let up = format!("@{}/", self.shared.upstream);
        assert!(url.contains(&up), "the database URL names {up}");
        url.replacen(&up, &format!("@{}/", self.addr), 1)
    }

    /// Cut every connection off, as a partition would, without closing any; returns once every
    /// socket drops what it receives.
    pub async fn blackhole(&self) {
        self.shared.cut.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.silenced.load(Ordering::SeqCst) < self.shared.open.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the proxy's connections were not cut off");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next client message containing `marker`, sent while its session is between
    /// transactions, goes to a new server connection (same startup parameters; trust
    /// authentication only), as a transaction pooler may do. The old one is kept open, as a pooler
    /// keeps it: its server process keeps what the session held.
    pub fn repin_at(&self, marker: &[u8]) {
        *self.shared.repin.lock().unwrap() = Some(marker.to_vec());
    }

    /// From now on, close each connection whose client sends a message containing `marker`,
    /// instead of forwarding it: the statement fails with a lost connection.
    pub fn close_at(&self, marker: &[u8]) {
        *self.shared.close_at.lock().unwrap() = Some(marker.to_vec());
    }

    /// How many connections `close_at` closed.
    pub fn closed(&self) -> usize {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// How many sessions were moved to a new server connection.
    pub fn repinned(&self) -> usize {
        self.shared.repinned.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.shared.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = tokio::select! {
            _ = shared.cut.cancelled() => break,
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(_) => continue,
            },
        };
        shared.open.fetch_add(1, Ordering::SeqCst);
        let task = tokio::spawn(serve(client, shared.clone()));
        shared.tasks.lock().unwrap().push(task);
    }
    // SYNs are dropped from now on: a connect gets no answer.
    drop_all_incoming(listener.as_raw_fd());
    shared.silenced.fetch_add(1, Ordering::SeqCst);
    std::future::pending::<()>().await;
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        shared.open.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    let mut c = Conn {
        client,
        server,
        retired: Vec::new(),
        from_client: Vec::new(),
        from_server: Vec::new(),
        startup: None,
        ssl_answer_pending: false,
        idle: false,
    };
    if !c.forward(&shared).await {
        shared.open.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    c.silence().await;
    shared.silenced.fetch_add(1, Ordering::SeqCst);
    // Holds the sockets open, silent, until the proxy is dropped.
    std::future::pending::<()>().await;
}

/// One client connection and its server connection(s), forwarded message by message (the
/// PostgreSQL protocol's framing), so a session can move between messages.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    /// Server connections the session was moved away from, kept open.
    retired: Vec<TcpStream>,
    from_client: Vec<u8>,
    from_server: Vec<u8>,
    /// The client's StartupMessage, once sent (before it, messages carry no type byte).
    startup: Option<Vec<u8>>,
    /// The client asked for TLS: the server answers with one byte ('N': no).
    ssl_answer_pending: bool,
    /// The server's last ReadyForQuery said "idle, not in a transaction".
    idle: bool,
}

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

impl Conn {
    /// Forward until the blackhole (true) or a side closes (false).
    async fn forward(&mut self, shared: &Shared) -> bool {
        let mut cbuf = vec![0u8; 64 * 1024];
        let mut sbuf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                biased;
                _ = shared.cut.cancelled() => return true,
                r = self.client.read(&mut cbuf) => match r {
                    Ok(0) | Err(_) => return false,
                    Ok(n) if shared.raw => if self.server.write_all(&cbuf[..n]).await.is_err() { return false },
                    Ok(n) => {
                        self.from_client.extend_from_slice(&cbuf[..n]);
                        if self.client_messages(shared).await.is_err() {
                            return false;
                        }
                    }
                },
                r = self.server.read(&mut sbuf) => match r {
                    Ok(0) | Err(_) => return false,
                    Ok(n) if shared.raw => if self.client.write_all(&sbuf[..n]).await.is_err() { return false },
                    Ok(n) => {
                        self.from_server.extend_from_slice(&sbuf[..n]);
                        if self.server_messages().await.is_err() {
                            return false;
                        }
                    }
                },
            }
        }
    }

    /// Send each complete client message on, moving the session first when asked to.
    async fn client_messages(&mut self, shared: &Shared) -> std::io::Result<()> {
        loop {
            let typed = self.startup.is_some();
            let Some(len) = frame_len(&self.from_client, typed) else {
                return Ok(());
            };
            let msg: Vec<u8> = self.from_client.drain(..len).collect();
            if !typed {
                let code = u32::from_be_bytes(msg[4..8].try_into().unwrap());
                if code == SSL_REQUEST || code == GSSENC_REQUEST {
                    self.ssl_answer_pending = true;
                } else {
                    self.startup = Some(msg.clone());
                }
            } else if contains(shared.close_at.lock().unwrap().as_deref(), &msg) {
                shared.closed.fetch_add(1, Ordering::SeqCst);
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            } else if self.idle && self.take_repin(shared, &msg) {
                let fresh = self.new_server_session().await;
                self.retired.push(std::mem::replace(&mut self.server, fresh));
                shared.repinned.fetch_add(1, Ordering::SeqCst);
            }
            self.server.write_all(&msg).await?;
        }
    }

    fn take_repin(&self, shared: &Shared, msg: &[u8]) -> bool {
        let mut repin = shared.repin.lock().unwrap();
        let hit = contains(repin.as_deref(), msg);
        if hit {
            *repin = None;
        }
        hit
    }

    /// Send each complete server message on, noting whether the session is idle.
    async fn server_messages(&mut self) -> std::io::Result<()> {
        if self.ssl_answer_pending && !self.from_server.is_empty() {
            self.ssl_answer_pending = false;
            assert_eq!(self.from_server[0], b'N', "the test proxy cannot forward TLS");
            let b: Vec<u8> = self.from_server.drain(..1).collect();
            self.client.write_all(&b).await?;
        }
        while let Some(len) = frame_len(&self.from_server, true) {
            let msg: Vec<u8> = self.from_server.drain(..len).collect();
            if msg[0] == b'Z' {
                self.idle = msg[5] == b'I';
            }
            self.client.write_all(&msg).await?;
        }
        Ok(())
    }

    /// A new server connection started with the client's StartupMessage, ready for queries.
    async fn new_server_session(&self) -> TcpStream {
        let addr = self.server.peer_addr().unwrap();
        let mut s = TcpStream::connect(addr).await.expect("connect a new server session");
        s.write_all(self.startup.as_ref().unwrap()).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed a new session during startup");
            buf.extend_from_slice(&chunk[..n]);
            while let Some(len) = frame_len(&buf, true) {
                let msg: Vec<u8> = buf.drain(..len).collect();
                match msg[0] {
                    b'R' => assert_eq!(&msg[5..9], &[0, 0, 0, 0], "the test proxy supports trust authentication only"),
                    b'E' => panic!("new server session refused: {}", String::from_utf8_lossy(&msg)),
                    b'Z' => return s,
                    _ => {}
                }
            }
        }
    }

    /// Stop acknowledging anything: wait until what this proxy sent was acknowledged (or it
    /// would retransmit it, which no partition lets through), then drop everything incoming.
    async fn silence(&self) {
        let fds: Vec<RawFd> = [&self.client, &self.server]
            .into_iter()
            .chain(&self.retired)
            .map(|s| s.as_raw_fd())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while fds.iter().any(|fd| unacknowledged(*fd) > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for fd in fds {
            drop_all_incoming(fd);
        }
    }
}

fn contains(marker: Option<&[u8]>, msg: &[u8]) -> bool {
    marker.is_some_and(|m| msg.windows(m.len()).any(|w| w == m))
}

/// The length of the first complete message in `buf`, if there is one: type byte (when `typed`)
/// and a big-endian length that counts itself.
fn frame_len(buf: &[u8], typed: bool) -> Option<usize> {
    let at = usize::from(typed);
    let len = u32::from_be_bytes(buf.get(at..at + 4)?.try_into().unwrap()) as usize + at;
    (buf.len() >= len).then_some(len)
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, value: *const c_void, len: u32) -> i32;
    fn ioctl(fd: i32, request: c_ulong, ...) -> i32;
}

const SOL_SOCKET: i32 = 1;
const SO_ATTACH_FILTER: i32 = 26;
/// Bytes sent and not yet acknowledged (plus unsent) on a TCP socket.
const SIOCOUTQ: c_ulong = 0x5411;
/// BPF_RET | BPF_K: accept this many bytes of the packet; 0 drops it.
const BPF_RET_K: u16 = 0x06;

/// Attach a socket filter that drops every incoming packet before TCP sees it.
fn drop_all_incoming(fd: RawFd) {
    let program = [SockFilter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    let size = std::mem::size_of::<SockFprog>() as u32;
    let rc = unsafe { setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, (&prog as *const SockFprog).cast(), size) };
    assert_eq!(rc, 0, "attach a socket filter: {}", std::io::Error::last_os_error());
}

fn unacknowledged(fd: RawFd) -> i32 {
    let mut n: i32 = 0;
    let rc = unsafe { ioctl(fd, SIOCOUTQ, &mut n as *mut i32) };
    if rc != 0 {
        return 0;
    }
    n
}
