//! NATS JetStream behind the broker seam (async-nats, the NATS project's client): each message
//! published with `Nats-Msg-Id` = the event id and its PubAck awaited.
//!
//! - Order: JetStream stores what one connection sends in the order sent, but a message that
//!   fails does not stop the later ones. So a key's next message is published only once the
//!   previous one was acknowledged, within a batch and across the batches in flight (the relay
//!   reads later rows of a key in flight into later batches); after a failure it is not sent
//!   (`Released`), as Kafka's gapless producer fails a partition's later messages. A key's entry
//!   lasts until the relay completed the batch of its last message (`completed`): from then on the
//!   relay's own gate holds the key back while it waits for a retry.
//! - No reconnects: a connection that drops is dead, with whatever it still held, and the next
//!   send opens a new one. A reconnecting client would send what it queued while away after the
//!   relay had resent those rows and maybe later rows of their keys, or after another relay took
//!   the outbox over (`relay::fence`): an old state last.
//! - Dedup: a resend within the stream's duplicate_window is acknowledged as a duplicate and not
//!   stored again; past it, consumers deduplicate (the inbox).

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_nats::{
    connection::State,
    jetstream::{self, context::PublishErrorKind, ErrorCode},
    ConnectOptions, HeaderMap,
};
use futures::{future::BoxFuture, FutureExt};

use super::{
    chain::{self, Counted, KeyChain},
    Acked, Cause, Outgoing, Refusal,
};
pub use crate::core::nats_settings::{valid_subject, NatsAuth, NatsSettings};

/// Header JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// A message's key: NATS messages have none of their own.
pub const KEY_HEADER: &str = "lockstep-key";

/// A NATS publisher. Clones share its connection.
#[derive(Clone)]
pub struct NatsPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    settings: NatsSettings,
    /// Each key's last message, until the relay completed its batch.
    chain: KeyChain,
    current: Mutex<Option<Conn>>,
    /// One connect at a time.
    connecting: tokio::sync::Mutex<()>,
    next_server: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl Conn {
    fn alive(&self) -> bool {
        self.client.connection_state() != State::Disconnected
    }
}

impl NatsPublisher {
    pub fn new(settings: NatsSettings) -> Self {
        NatsPublisher {
            inner: Arc::new(Inner {
                settings,
                chain: KeyChain::default(),
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                next_server: AtomicUsize::new(0),
                in_flight: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    pub(super) fn batch(&self) -> NatsBatch<'_> {
        NatsBatch {
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

    /// The live connection, or a new one to the next server.
    async fn conn(&self) -> Result<Conn, Refusal> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _one = self.inner.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let s = &self.inner.settings;
        let n = self.inner.next_server.fetch_add(1, Ordering::Relaxed);
        let server = s.servers.get(n % s.servers.len().max(1)).cloned().unwrap_or_default();
        let client = options(s)
            .await?
            .connect(server.as_str())
            .await
            .map_err(|e| Refusal::new(Cause::Transport, format!("cannot connect to NATS at {server}: {e}"), "Connect"))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(s.ack_timeout)
            .max_ack_inflight(MAX_ACK_INFLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let conn = Conn { client, js };
        *self.inner.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Dead connections are replaced at the next send: nothing to rebuild.
    pub(super) fn fatal(&self) -> Option<String> {
        None
    }

    /// Close the connection without sending what it still queues (it never reconnects).
    pub(super) async fn purge(&self) {
        let old = self.inner.current.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = old {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.client.force_reconnect()).await;
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    pub(super) async fn reachable(&self) -> bool {
        match self.conn().await {
            Ok(c) => tokio::time::timeout(Duration::from_secs(2), c.client.flush())
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        }
    }

    pub(super) async fn flush(&self, timeout: Duration) {
        if let Some(c) = self.live() {
            let _ = tokio::time::timeout(timeout, c.js.wait_for_acks()).await;
        }
    }
}

/// PubAcks awaited at once per connection; a send waits for a free one.
const MAX_ACK_INFLIGHT: usize = 8192;

/// Connect options: one server, never reconnecting (see the module's notes), pings often
/// enough that a silent server is noticed within seconds.
pub(crate) async fn options(s: &NatsSettings) -> Result<ConnectOptions, Refusal> {
    let mut o = match &s.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::UserPassword { user, password } => ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned()),
        NatsAuth::Token(t) => ConnectOptions::with_token(t.expose().to_owned()),
        NatsAuth::NKey(seed) => ConnectOptions::with_nkey(seed.expose().to_owned()),
        // The parser's message may quote the file: say only that it is not one.
        NatsAuth::Credentials(c) => ConnectOptions::with_credentials(c.expose())
            .map_err(|_| Refusal::new(Cause::Transport, "the NATS credentials are not a valid .creds file", "Credentials"))?,
    };
    if let Some(ca) = &s.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &s.tls_client {
        o = o.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(name) = &s.name {
        o = o.name(name);
    }
    Ok(o.max_reconnects(1)
        .ignore_discovered_servers()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(5)))
}

/// One batch's sender.
pub struct NatsBatch<'a> {
    p: &'a NatsPublisher,
    id: u64,
    /// The batch's connection, or why there is none.
    conn: Option<Result<Conn, Refusal>>,
}

impl NatsBatch<'_> {
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) async fn send(&mut self, m: &Outgoing<'_>) -> Result<BoxFuture<'static, Result<Acked, Refusal>>, Refusal> {
        if !valid_subject(m.destination) {
            return Err(Refusal::new(
                Cause::Poison,
                format!(
                    "routing: {:?} is not a NATS subject (empty tokens, spaces, '*' or '>')",
                    m.destination
                ),
                "InvalidSubject",
            ));
        }
        // One connection attempt per batch: a server that does not answer fails the batch's
        // later messages at once, not one connect timeout each.
        if self.conn.is_none() {
            self.conn = Some(self.p.conn().await);
        }
        let conn = match self.conn.as_ref() {
            Some(Ok(c)) => c,
            Some(Err(r)) => return Err(r.clone()),
            None => return Err(Refusal::lost()),
        };
        let (subject, headers, payload) = (
            m.destination.to_owned(),
            headers(m)?,
            bytes::Bytes::copy_from_slice(m.payload.unwrap_or_default()),
        );
        // `stored` tells the key's next message whether this one was stored.
        let (stored, previous) = self.p.inner.chain.link(m.key, self.id);
        let counted = Counted::new(&self.p.inner.in_flight);
        Ok(match previous {
            None => {
                let pending = publish(conn, subject, headers, payload).await?;
                async move {
                    let _counted = counted;
                    let r = pending.await;
                    let _ = stored.send(r.is_ok());
                    r
                }
                .boxed()
            }
            Some(previous) => {
                let conn = conn.clone();
                async move {
                    let _counted = counted;
                    let r = if chain::previous_stored(Some(previous)).await {
                        match publish(&conn, subject, headers, payload).await {
                            Ok(pending) => pending.await,
                            Err(e) => Err(e),
                        }
                    } else {
                        Err(Refusal::behind_failed())
                    };
                    let _ = stored.send(r.is_ok());
                    r
                }
                .boxed()
            }
        })
    }
}

/// Hand a message to the connection; the future is its PubAck.
async fn publish(
    conn: &Conn,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
) -> Result<impl std::future::Future<Output = Result<Acked, Refusal>>, Refusal> {
    let pending = conn
        .js
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| refusal(&e))?;
    Ok(async move {
        match pending.await {
            Ok(ack) => Ok(Acked { duplicate: ack.duplicate }),
            Err(e) => Err(refusal(&e)),
        }
    })
}

/// The message's headers, its id as `Nats-Msg-Id`, its key, and its timestamp when the relay's
/// own headers do not carry it. A header name NATS cannot carry (a row's `headers` key with a
/// space, a ':' or a non-ASCII character; the client would panic on it) makes the message poison.
fn headers(m: &Outgoing<'_>) -> Result<HeaderMap, Refusal> {
    let mut h = HeaderMap::new();
    let mut id = uuid::Uuid::encode_buffer();
    h.insert(MSG_ID, &*m.id.hyphenated().encode_lower(&mut id));
    h.insert(KEY_HEADER, m.key);
    let stamp = crate::core::stamp::CREATED_AT_HEADER;
    for (k, v) in m.headers {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_graphic() && c != ':') {
            return Err(Refusal::new(
                Cause::Poison,
                format!("header name {k:?} cannot be sent to NATS (printable ASCII without ':' only)"),
                "InvalidHeader",
            ));
        }
        h.insert(k.as_ref(), v.as_ref());
    }
    if !m.headers.iter().any(|(k, _)| k == stamp) {
        h.insert(stamp, m.timestamp_ms.to_string().as_str());
    }
    Ok(h)
}

/// What a JetStream publish error says about the message: only a message over the stream's or
/// server's size limits is the message's own fault; a missing stream, a full one, a timeout or a
/// lost connection is the broker's, retried.
pub fn refusal(e: &jetstream::context::PublishError) -> Refusal {
    let (cause, reason): (Cause, Cow<'static, str>) = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => (Cause::Poison, "MaxPayloadExceeded".into()),
        PublishErrorKind::StreamNotFound => (Cause::Transport, "StreamNotFound".into()),
        PublishErrorKind::TimedOut => (Cause::Transport, "TimedOut".into()),
        PublishErrorKind::BrokenPipe => (Cause::Transport, "BrokenPipe".into()),
        _ => match api_code(e) {
            Some(c) if c == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM || c == ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => {
                (Cause::Poison, format!("JetStream{}", c.0).into())
            }
            Some(c) => (Cause::Transport, format!("JetStream{}", c.0).into()),
            None => (Cause::Transport, "Other".into()),
        },
    };
    Refusal::new(cause, e.to_string(), reason)
}

/// The JetStream API error code behind a publish error, if the server sent one.
fn api_code(e: &jetstream::context::PublishError) -> Option<ErrorCode> {
    use std::error::Error;
    let source = e.source()?;
    source.downcast_ref::<jetstream::Error>().map(|j| j.error_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_name_nats_cannot_carry_makes_the_message_poison() {
        let ok = [(Cow::from("source"), Cow::from("test"))];
        let m = |headers: &'static [(Cow<'static, str>, Cow<'static, str>)]| Outgoing {
            destination: "s",
            key: "k",
            id: uuid::Uuid::nil(),
            payload: None,
            headers,
            timestamp_ms: 7,
        };
        let h = headers(&m(Box::leak(Box::new(ok)))).unwrap();
        assert_eq!(h.get("source").map(|v| v.as_str()), Some("test"));
        assert_eq!(h.get(crate::core::stamp::CREATED_AT_HEADER).map(|v| v.as_str()), Some("7"));
        for bad in ["with space", "a:b", "caf\u{e9}", ""] {
            let list: &'static [(Cow<'static, str>, Cow<'static, str>)] = Box::leak(Box::new([(Cow::from(bad), Cow::from("v"))]));
            let r = headers(&m(list)).unwrap_err();
            assert_eq!(r.cause, Cause::Poison, "{bad:?}");
        }
    }

    #[test]
    fn only_size_is_the_messages_fault() {
        use jetstream::context::PublishError;
        assert_eq!(
            refusal(&PublishError::new(PublishErrorKind::MaxPayloadExceeded)).cause,
            Cause::Poison
        );
        for transport in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::Other,
        ] {
            assert_eq!(refusal(&PublishError::new(transport)).cause, Cause::Transport);
        }
    }
}
