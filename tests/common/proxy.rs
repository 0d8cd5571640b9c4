//! A counting TCP relay between the operator and the SCG simulator.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use testkit::scgsim::REFRESH_PATH;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A TCP relay in front of the simulator that counts refresh requests as they *arrive*.
/// The simulator counts a call only once it has answered it (after any `Fault::Delay`),
/// so this is how a test knows that a call is in flight.
pub struct CallTap {
    addr: SocketAddr,
    seen: Arc<watch::Sender<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CallTap {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every relay.
        self.task.abort();
    }
}

/// What a refresh request starts with on the wire.
const REQUEST_LINE: &[u8] = b"GET /apptoken-refresh?";

impl CallTap {
    pub async fn start(upstream: SocketAddr) -> CallTap {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind tap");
        let addr = listener.local_addr().expect("tap address");
        let seen = Arc::new(watch::Sender::new(0usize));
        let counter = seen.clone();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        relays.spawn(relay(client, upstream, counter.clone()));
                    }
                    Some(_) = relays.join_next(), if !relays.is_empty() => {}
                }
            }
        });
        CallTap { addr, seen, task }
    }

    /// The refresh URL to put in `spec.endpoint`.
    pub fn refresh_url(&self) -> String {
        format!("http://{}{REFRESH_PATH}", self.addr)
    }

    /// Refresh requests that reached the relay so far.
    #[allow(dead_code)] // Not every test binary counts requests; some only wait for them.
    pub fn requests(&self) -> usize {
        *self.seen.borrow()
    }

    /// Waits until at least `n` refresh requests arrived; false on timeout.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.seen.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await,
            Ok(Ok(_))
        )
    }
}

/// Copies one connection both ways, counting request lines on the way in (before they
/// are passed on, so the count is up before the simulator can answer). Every request the
/// tap counts reaches the simulator's handler.
async fn relay(client: TcpStream, upstream: SocketAddr, seen: Arc<watch::Sender<usize>>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let inbound = async {
        let mut buf = vec![0u8; 16 * 1024];
        // The end of the previous chunk, so a request line split across reads counts.
        let mut window: Vec<u8> = Vec::new();
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            window.extend_from_slice(&buf[..n]);
            let hits = window
                .windows(REQUEST_LINE.len())
                .filter(|w| *w == REQUEST_LINE)
                .count();
            if hits > 0 {
                seen.send_modify(|c| *c += hits);
            }
            let keep_from = window.len().saturating_sub(REQUEST_LINE.len() - 1);
            window.drain(..keep_from);
            if server_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // The client's end of stream is not passed on. The simulator's HTTP server drops a
        // request whose connection is half-closed before the handler ran, so a request the
        // tap counted could go unanswered when the operator dies right after sending it.
        // Kept open, the connection ends when the answer cannot be delivered, or with the tap.
    };
    let outbound = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::join!(inbound, outbound);
}
