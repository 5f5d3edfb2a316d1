//! RabbitMQ behind the broker seam (lapin, AMQP 0-9-1): each message published persistent
//! (delivery mode 2) and `mandatory` on a channel in confirm mode, its publisher confirm awaited.
//!
//! - Where: to the exchange of the settings (`--amqp-exchange`; "" is the default exchange),
//!   with the routing template's result (`Outgoing::destination`) as the routing key.
//! - Confirmed means stored: an ack is a success only when no `basic.return` came before it. A
//!   returned message (no queue bound for its routing key: a missing queue or binding, the
//!   broker's state) and a nack (a queue refused it: full under `x-overflow: reject-publish`) are
//!   `Transport`, retried until they are stored, never dead-lettered.
//! - Order: RabbitMQ keeps one channel's messages in order, but a returned or nacked message does
//!   not stop the later ones. So a key's next message is published only once the previous one was
//!   confirmed, within a batch and across the batches in flight, as on NATS (`nats.rs`); after a
//!   failure it is not sent (`Released`).
//! - No reconnects (lapin's recovery stays off): a connection or channel that closes is dead with
//!   what it held, and the next batch opens a new one. A confirm that does not come within
//!   `confirm_timeout` (a silent server; a connection the broker blocked for its resource alarms)
//!   fails the message and closes the connection. A blocked connection fails new messages at once,
//!   and a message not handed to lapin within min(confirm_timeout, 5 s) (lapin writes nothing
//!   while blocked) fails and drops its connection, so the lock session is never starved.
//! - Size: a message over `max_message_bytes`, or over the server's `max_message_size` once a
//!   channel closed on it (the limit is then learnt from the server's words), is `Poison`.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::{future::BoxFuture, FutureExt};
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
    Confirmation, Connection, ConnectionProperties,
};

mod message;

use message::{refusal, returned, wire, Wire};

use super::{
    chain::{self, Counted, KeyChain},
    Acked, Cause, Outgoing, Refusal,
};
use crate::core::amqp_settings::server_host_port;
pub use crate::core::amqp_settings::AmqpSettings;

pub use message::KEY_HEADER;

/// How long opening a connection (TCP, TLS, AMQP handshake, channel) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeats: a server gone silent is noticed within two of them.
const HEARTBEAT_SECS: u16 = 10;

/// A RabbitMQ publisher. Clones share its connection.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AmqpSettings,
    /// Each key's last message, until the relay completed its batch.
    chain: KeyChain,
    current: Mutex<Option<Conn>>,
    /// One connect at a time.
    connecting: tokio::sync::Mutex<()>,
    in_flight: Arc<AtomicUsize>,
    /// The server's max_message_size, once a message over it closed a channel (0: not known).
    server_limit: AtomicUsize,
}

#[derive(Clone)]
struct Conn {
    connection: Arc<Connection>,
    channel: lapin::Channel,
}

impl Conn {
    fn alive(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl AmqpPublisher {
    pub fn new(settings: AmqpSettings) -> Self {
        AmqpPublisher {
            inner: Arc::new(Inner {
                settings,
                chain: KeyChain::default(),
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                in_flight: Arc::new(AtomicUsize::new(0)),
                server_limit: AtomicUsize::new(0),
            }),
        }
    }

    pub(super) fn batch(&self) -> AmqpBatch<'_> {
        AmqpBatch {
            p: self,
            id: chain::next_batch(),
            conn: None,
        }
    }

    pub(super) fn completed<'k>(&self, id: u64, keys: impl IntoIterator<Item = &'k str>) {
        self.inner.chain.completed(id, keys)
    }

    pub(super) fn forget(&self) {
        self.inner.chain.forget()
    }

    fn live(&self) -> Option<Conn> {
        let c = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        c.as_ref().filter(|c| c.alive()).cloned()
    }

    /// The live connection, or a new one.
    async fn conn(&self) -> Result<Conn, Refusal> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _one = self.inner.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        if let Some(old) = self.inner.current.lock().unwrap_or_else(|e| e.into_inner()).take() {
            close(old);
        }
        let conn = connect(&self.inner.settings).await?;
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Dead connections are replaced at the next batch: nothing to rebuild.
    pub(super) fn fatal(&self) -> Option<String> {
        None
    }

    /// Close the connection: what it still holds unconfirmed fails at once, and nothing it
    /// queued is sent later (it never reconnects).
    pub(super) async fn purge(&self) {
        let old = self.inner.current.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = old {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.connection.close(320, "purged by the relay".into())).await;
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    pub(super) async fn reachable(&self) -> bool {
        self.conn().await.is_ok()
    }

    pub(super) async fn flush(&self, timeout: Duration) {
        if let Some(c) = self.live() {
            let _ = tokio::time::timeout(timeout, c.channel.wait_for_confirms()).await;
        }
    }
}

/// Close a connection in the background (its confirms fail now; nothing waits for the server).
fn close(c: Conn) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), c.connection.close(320, "replaced".into())).await;
    });
}

/// Open a connection and a channel in confirm mode.
async fn connect(s: &AmqpSettings) -> Result<Conn, Refusal> {
    let failed = |m: String| Refusal::new(Cause::Transport, m, "Connect");
    let host = server_host_port(&s.url).unwrap_or_default();
    // One deadline for the whole: the relay's lock session must be confirmed within 10 s, and a
    // batch waits for this.
    let all = async {
        let connection = open(s).await?;
        let channel = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(channel)
        };
        match channel.await {
            Ok(channel) => Ok(Conn {
                connection: Arc::new(connection),
                channel,
            }),
            Err(e) => Err(format!("cannot open a channel on RabbitMQ at {host}: {e}")),
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, all).await {
        Ok(r) => r.map_err(failed),
        Err(_) => Err(failed(format!(
            "cannot connect to RabbitMQ at {host}: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// A connection as the relay opens it: credentials, TLS, heartbeat, name, within
/// `CONNECT_TIMEOUT`. Errors never hold the password: the URL given has none, and lapin's
/// messages name the user at most.
pub async fn open(s: &AmqpSettings) -> Result<Connection, String> {
    let host = server_host_port(&s.url).unwrap_or_default();
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("cannot {what} RabbitMQ at {host}: {e}");
    let mut uri: lapin::uri::AMQPUri = s.url.parse().map_err(|e: String| failed("parse the URL of", &e))?;
    if let Some((user, password)) = &s.auth {
        uri.authority.userinfo = lapin::uri::AMQPUserInfo {
            username: user.clone(),
            password: password.expose().to_owned(),
        };
    }
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    uri.query.connection_timeout.get_or_insert(CONNECT_TIMEOUT.as_millis() as u64);
    let tls = tls_config(s).map_err(|e| failed("read the TLS files for", &e))?;
    let mut props = ConnectionProperties::default();
    if let Some(name) = &s.name {
        props = props.with_connection_name(name.clone().into());
    }
    let runtime = lapin::runtime::default_runtime().map_err(|e| failed("reach", &e))?;
    let connect = Connection::connect_uri_with_config(uri, props, tls, runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(r) => r.map_err(|e| failed("connect to", &e)),
        Err(_) => Err(failed("connect to", &format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// `basic_publish` handed over: lapin writes nothing while the server blocks the connection
/// (`connection.blocked`, a memory or disk alarm), so a publish begun just before the notice
/// would wait for the alarm to clear; and the relay's lock session must be confirmed meanwhile.
/// Err once the connection is blocked, or after `limit`.
async fn handed_over<F: std::future::Future>(sent: F, conn: &Conn, limit: Duration) -> Result<F::Output, Refusal> {
    tokio::pin!(sent);
    // The usual case, on the relay's path for every message: handed over at once, no timer.
    if let Some(r) = (&mut sent).now_or_never() {
        return Ok(r);
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::select! {
            r = &mut sent => return Ok(r),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if conn.connection.status().blocked() {
            return Err(Refusal::new(
                Cause::Transport,
                "RabbitMQ blocked the connection (connection.blocked: a memory or disk alarm): waiting for it to clear",
                "Blocked",
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Refusal::new(
                Cause::Transport,
                format!("the message was not handed to RabbitMQ within {limit:?} (the connection is closed and opened again)"),
                "SendTimeout",
            ));
        }
    }
}

/// Drop `conn` as the publisher's current connection, if it still is.
fn forget_conn(inner: &Inner, conn: &Conn) {
    let mut current = inner.current.lock().unwrap_or_else(|e| e.into_inner());
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(&c.connection, &conn.connection)) {
        current.take();
    }
}

/// The CA and client certificate files, read as lapin takes them.
fn tls_config(s: &AmqpSettings) -> std::io::Result<lapin::tcp::OwnedTLSConfig> {
    let cert_chain = s.tls_ca.as_ref().map(std::fs::read_to_string).transpose()?;
    let identity = match &s.tls_client {
        Some((cert, key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
            pem: std::fs::read(cert)?,
            key: std::fs::read(key)?,
        }),
        None => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig { identity, cert_chain })
}

/// One batch's sender.
pub struct AmqpBatch<'a> {
    p: &'a AmqpPublisher,
    id: u64,
    /// The batch's connection, or why there is none: one attempt per batch.
    conn: Option<Result<Conn, Refusal>>,
}

impl AmqpBatch<'_> {
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) async fn send(&mut self, m: &Outgoing<'_>) -> Result<BoxFuture<'static, Result<Acked, Refusal>>, Refusal> {
        let inner = &self.p.inner;
        let limit = match inner.server_limit.load(Ordering::Relaxed) {
            0 => inner.settings.max_message_bytes,
            server => server.min(inner.settings.max_message_bytes),
        };
        let wire = wire(m, limit)?;
        let attempt = match self.conn.take() {
            Some(a) => a,
            None => self.p.conn().await,
        };
        self.conn = Some(attempt.clone());
        let conn = attempt?;
        if conn.connection.status().blocked() {
            return Err(Refusal::new(
                Cause::Transport,
                "RabbitMQ blocked the connection (connection.blocked: a memory or disk alarm): waiting for it to clear",
                "Blocked",
            ));
        }
        // `stored` tells the key's next message whether this one was confirmed.
        let (stored, previous) = inner.chain.link(m.key, self.id);
        let counted = Counted::new(&inner.in_flight);
        let publisher = self.p.clone();
        Ok(match previous {
            None => {
                let confirm = publish(publisher, conn, wire).await?;
                async move {
                    let _counted = counted;
                    let r = confirm.await;
                    let _ = stored.send(r.is_ok());
                    r
                }
                .boxed()
            }
            Some(previous) => async move {
                let _counted = counted;
                let r = if chain::previous_stored(Some(previous)).await {
                    match publish(publisher, conn, wire).await {
                        Ok(confirm) => confirm.await,
                        Err(e) => Err(e),
                    }
                } else {
                    Err(Refusal::behind_failed())
                };
                let _ = stored.send(r.is_ok());
                r
            }
            .boxed(),
        })
    }
}

/// Hand a message to the channel; the future is its confirm.
async fn publish(p: AmqpPublisher, conn: Conn, w: Wire) -> Result<impl std::future::Future<Output = Result<Acked, Refusal>>, Refusal> {
    let inner = p.inner.clone();
    let size = w.payload.len();
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let exchange = ShortString::from(inner.settings.exchange.clone());
    let timeout = inner.settings.confirm_timeout;
    let sent = conn
        .channel
        .basic_publish(exchange, w.routing_key.clone(), options, &w.payload, w.properties);
    let confirm = match handed_over(sent, &conn, timeout.min(CONNECT_TIMEOUT)).await {
        Ok(r) => r.map_err(|e| refusal(&inner.server_limit, &e, size))?,
        Err(why) => {
            // A frame left in lapin's buffer must not go out later, behind a resend.
            forget_conn(&inner, &conn);
            close(conn);
            return Err(why);
        }
    };
    Ok(async move {
        match tokio::time::timeout(timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(Acked::default()),
            Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => Err(returned(&inner.settings.exchange, &w.routing_key, &r)),
            Ok(Ok(Confirmation::Nack(None))) => Err(Refusal::new(
                Cause::Transport,
                "RabbitMQ refused the message (basic.nack): a queue it routes to is full (x-overflow reject-publish) or failed",
                "Nack",
            )),
            Ok(Ok(Confirmation::NotRequested)) => Err(Refusal::new(Cause::Transport, "the channel is not in confirm mode", "NoConfirm")),
            Ok(Err(e)) => Err(refusal(&inner.server_limit, &e, size)),
            Err(_) => {
                // Silent or blocked: this connection is not to be trusted with more.
                forget_conn(&inner, &conn);
                close(conn);
                Err(Refusal::new(
                    Cause::Transport,
                    format!("no publisher confirm within {timeout:?} (the connection is closed and opened again)"),
                    "ConfirmTimeout",
                ))
            }
        }
    })
}
