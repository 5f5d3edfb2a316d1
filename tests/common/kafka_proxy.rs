//! A TCP proxy in front of a broker that tells Kafka clients apart by the `client.id` of the first
//! request on each connection, and can stall one client: its connections are closed and new ones
//! closed as soon as they name it, so what its producer is given stays queued in the producer
//! (nothing is held on the wire), as when its broker is away for it; other clients go on. The
//! broker must advertise this proxy's address (`PrivateBroker::start_advertising`), or clients
//! would connect to it directly after their first metadata request.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{AbortHandle, JoinHandle},
};

pub struct KafkaProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    upstream: OnceLock<SocketAddr>,
    state: Mutex<State>,
    refused: AtomicUsize,
}

/// Stalled client ids, and each forwarding connection with its client id.
#[derive(Default)]
struct State(HashSet<String>, Vec<(String, AbortHandle)>);

impl KafkaProxy {
    /// Listening on 127.0.0.1 (a port of its own); forwards once `forward_to` names the broker.
    pub async fn bind() -> KafkaProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the Kafka proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept(listener, shared.clone()));
        KafkaProxy { addr, shared, accept }
    }

    pub fn forward_to(&self, broker_port: u16) {
        let upstream = SocketAddr::from(([127, 0, 0, 1], broker_port));
        self.shared.upstream.set(upstream).expect("forward_to once");
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Close `client_id`'s connections and refuse its new ones until `resume`.
    pub fn stall(&self, client_id: &str) {
        let mut state = self.shared.state.lock().unwrap();
        state.0.insert(client_id.to_owned());
        state.1.retain(|(id, task)| {
            if id == client_id {
                task.abort();
            }
            id != client_id
        });
    }

    pub fn resume(&self, client_id: &str) {
        self.shared.state.lock().unwrap().0.remove(client_id);
    }

    /// Connections closed because their client was stalled.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for KafkaProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, task) in self.shared.state.lock().unwrap().1.drain(..) {
            task.abort();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(serve(client, shared.clone()));
    }
}

/// The client id of a Kafka request at the start of `buf`, once enough of it came: size (4),
/// api key (2), api version (2), correlation id (4), then the client id as a nullable string
/// (a 2-byte length, -1 for null), in every request header version.
fn client_id(buf: &[u8]) -> Option<String> {
    let len = i16::from_be_bytes(buf.get(12..14)?.try_into().unwrap());
    if len < 0 {
        return Some(String::new());
    }
    let id = buf.get(14..14 + len as usize)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::new();
    let id = loop {
        if let Some(id) = client_id(&head) {
            break id;
        }
        let mut chunk = [0u8; 1024];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    };
    let upstream = *shared.upstream.get().expect("KafkaProxy::forward_to before use");
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    // Registered and checked under one lock, so a stall cannot miss a connection being set up.
    let mut state = shared.state.lock().unwrap();
    if state.0.contains(&id) {
        shared.refused.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let task = tokio::spawn(async move {
        if server.write_all(&head).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
    });
    state.1.push((id, task.abort_handle()));
}
