//! A forward proxy for tests that speaks only `CONNECT`, the way an HTTPS client uses an
//! egress proxy: it opens a TCP tunnel to the requested `host:port` and copies bytes both
//! ways without looking inside.
//!
//! It listens on `127.0.0.1` (random port) and tunnels only to `127.0.0.1` or
//! `localhost`. With credentials set, a `CONNECT` without the matching
//! `Proxy-Authorization: Basic …` gets `407`. Every tunnel opened and every request
//! refused is recorded by target, before the client gets its answer, so a test can tell
//! which traffic went through it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head read before giving up on a client.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A request the proxy refused, with the status it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The request target as sent (`host:port` for a `CONNECT`).
    pub target: String,
    /// 400 malformed, 403 not loopback, 405 not `CONNECT`, 407 credentials missing or
    /// wrong, 502 the target refused the connection.
    pub status: u16,
}

#[derive(Debug, Default)]
struct Record {
    tunnels: Vec<String>,
    refusals: Vec<Refusal>,
}

struct Shared {
    /// `Basic <base64(user:password)>`, when credentials are required.
    expected_auth: Option<String>,
    record: Mutex<Record>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.lock());
    }
}

/// A running proxy. Dropping it stops it and closes every tunnel.
pub struct ConnectProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl std::fmt::Debug for ConnectProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ConnectProxy {
    /// Starts a proxy on `127.0.0.1` at a free port. With `credentials`
    /// (`(user, password)`), only requests carrying them in `Proxy-Authorization` are
    /// served.
    pub async fn start(credentials: Option<(&str, &str)>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let expected_auth = credentials.map(|(user, password)| basic_auth(user, password));
        let shared = Arc::new(Shared {
            expected_auth,
            record: Mutex::new(Record::default()),
        });
        let server = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(ConnectProxy {
            shared,
            addr,
            server,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT`. The values are put in as given, so keep
    /// them to characters that need no percent-encoding in a URL.
    pub fn url_with_credentials(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    /// Targets (`host:port`) of every tunnel opened so far, oldest first.
    pub fn tunnels(&self) -> Vec<String> {
        self.shared.lock().tunnels.clone()
    }

    /// How many tunnels were opened to `port` on `127.0.0.1` or `localhost`.
    pub fn tunnels_to_port(&self, port: u16) -> usize {
        self.shared
            .lock()
            .tunnels
            .iter()
            .filter(|t| target_port(t) == Some(port))
            .count()
    }

    /// Every refused request, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.shared.lock().refusals.clone()
    }
}

/// The `Proxy-Authorization` value for `user` and `password`: `Basic <base64>`. Tests
/// scan output for it, since a leaked header would show the credentials this way.
pub fn basic_auth(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn target_port(target: &str) -> Option<u16> {
    let (host, port) = target.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost")
        .then(|| port.parse().ok())
        .flatten()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                conns.spawn(handle(stream, shared.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Reads up to the end of the request head; returns the head and any bytes after it.
async fn read_head(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = buf.split_off(end + 4);
                return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn refuse(mut stream: TcpStream, shared: &Shared, target: &str, status: u16) {
    let (reason, extra) = match status {
        400 => ("Bad Request", ""),
        403 => ("Forbidden", ""),
        405 => ("Method Not Allowed", ""),
        407 => (
            "Proxy Authentication Required",
            "Proxy-Authenticate: Basic realm=\"testkit\"\r\n",
        ),
        _ => ("Bad Gateway", ""),
    };
    // Recorded before answering, so a client that has its answer finds it recorded.
    shared.note(|r| {
        r.refusals.push(Refusal {
            target: target.to_owned(),
            status,
        })
    });
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) {
    let Some((head, early)) = read_head(&mut client).await else {
        return;
    };
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (
        request.next().unwrap_or_default(),
        request.next().unwrap_or_default().to_owned(),
    );
    if method != "CONNECT" {
        return refuse(client, &shared, &target, 405).await;
    }
    if let Some(expected) = &shared.expected_auth {
        let given = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("proxy-authorization")
                .then(|| value.trim())
        });
        if given != Some(expected.as_str()) {
            return refuse(client, &shared, &target, 407).await;
        }
    }
    let Some((host, port)) = target.rsplit_once(':') else {
        return refuse(client, &shared, &target, 400).await;
    };
    let Ok(port) = port.parse::<u16>() else {
        return refuse(client, &shared, &target, 400).await;
    };
    // Loopback only: this proxy must never carry traffic off the machine.
    if !matches!(host, "127.0.0.1" | "localhost") {
        return refuse(client, &shared, &target, 403).await;
    }
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return refuse(client, &shared, &target, 502).await;
    };
    shared.note(|r| r.tunnels.push(target.clone()));
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    if !early.is_empty() && upstream.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
