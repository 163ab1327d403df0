//! A loopback TCP proxy in front of the broker, one per gateway, that can break the link.
//!
//! Modes ([`LinkMode`]):
//! - `Pass`: bytes flow both ways.
//! - `Cut`: every connection through the proxy is closed at once and new ones are closed as
//!   soon as they are accepted (a cable pulled out of a switch, a NAT table flushed).
//! - `Partition`: nothing is lost and nothing is delivered: connections stay open, bytes wait
//!   (the pumps stop reading, so TCP's own buffers fill), new connections are accepted but not
//!   connected upstream — a black hole. Both ends find out only through their keep-alives.
//!   When the partition heals the held bytes flow on; connections accepted during it are then
//!   connected upstream.
//! - `Delay(d)`: a delay line: every byte arrives `d` after it was sent, in both directions
//!   (a link with a round trip of `2d`), at full speed otherwise — up to [`DELAY_BUFFER`] bytes
//!   each way are on the wire at once, as a long fat link holds them.
//!
//! No byte is ever dropped or reordered inside a connection: a link is either whole, late, or
//! closed, as TCP promises. Every task ends when the proxy is dropped.
//!
//! Upstreams: one port ([`Proxy::start`]) or several in order of preference
//! ([`Proxy::start_multi`]), as a TCP load balancer in front of a broker cluster does it: each
//! new connection goes to the first upstream that accepts it, so a client whose node died is
//! closed with that node's connection and its reconnect lands on the next node. A connection
//! stays where it landed: nothing moves it back when a preferred node returns.
//! [`Proxy::connections_to`] tells which upstream a client is on now.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward.
    Pass,
    /// Close everything, refuse new connections.
    Cut,
    /// Hold every byte; accept new connections but connect nothing.
    Partition,
    /// Forward each chunk after this delay.
    Delay(Duration),
}

/// A running proxy.
pub struct Proxy {
    port: u16,
    mode: Arc<watch::Sender<LinkMode>>,
    open: OpenLinks,
    task: tokio::task::JoinHandle<()>,
}

/// Connections open upstream, by upstream port.
type OpenLinks = Arc<Mutex<BTreeMap<u16, usize>>>;

/// Counts one open upstream connection while it lives.
struct OpenGuard {
    open: OpenLinks,
    upstream: u16,
}

impl OpenGuard {
    fn new(open: &OpenLinks, upstream: u16) -> OpenGuard {
        if let Ok(mut m) = open.lock() {
            *m.entry(upstream).or_default() += 1;
        }
        OpenGuard {
            open: open.clone(),
            upstream,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.open.lock() {
            if let Some(n) = m.get_mut(&self.upstream) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// How long the proxy waits for one upstream to accept a connection before it tries the next.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Proxy> {
        Self::start_multi(vec![upstream]).await
    }

    /// Listens on a free loopback port and forwards each new connection to the first of
    /// `127.0.0.1:<upstreams>`, in this order, that accepts it within
    /// [`UPSTREAM_CONNECT_TIMEOUT`]; when none does, the connection is closed.
    pub async fn start_multi(upstreams: Vec<u16>) -> std::io::Result<Proxy> {
        if upstreams.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a proxy needs at least one upstream port",
            ));
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let (tx, _) = watch::channel(LinkMode::Pass);
        let mode = Arc::new(tx);
        let open = OpenLinks::default();
        let task = tokio::spawn(accept_loop(
            listener,
            upstreams.into(),
            mode.clone(),
            open.clone(),
        ));
        Ok(Proxy {
            port,
            mode,
            open,
            task,
        })
    }

    /// The port gateways connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections through the proxy that are open to `upstream` now.
    pub fn connections_to(&self, upstream: u16) -> usize {
        self.open
            .lock()
            .map_or(0, |m| m.get(&upstream).copied().unwrap_or(0))
    }

    /// Switches the mode (takes effect at once for every connection).
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(LinkMode::Cut);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstreams: Arc<[u16]>,
    mode: Arc<watch::Sender<LinkMode>>,
    open: OpenLinks,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((down, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if *mode.borrow() == LinkMode::Cut {
                    drop(down);
                    continue;
                }
                conns.spawn(connection(
                    down,
                    upstreams.clone(),
                    mode.subscribe(),
                    open.clone(),
                ));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Waits while the link is partitioned; `false` if it was cut (or the proxy is gone).
async fn usable(mode: &mut watch::Receiver<LinkMode>) -> bool {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            LinkMode::Cut => return false,
            LinkMode::Partition => {
                if mode.changed().await.is_err() {
                    return false;
                }
            }
            LinkMode::Pass | LinkMode::Delay(_) => return true,
        }
    }
}

/// The first upstream, in order, that accepts a connection, and its port.
async fn connect_first(upstreams: &[u16]) -> Option<(TcpStream, u16)> {
    for &port in upstreams {
        let attempt = TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(up)) = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, attempt).await {
            return Some((up, port));
        }
    }
    None
}

/// One proxied connection: connects upstream once the link allows it, then pumps both ways
/// until either side closes or the link is cut.
async fn connection(
    down: TcpStream,
    upstreams: Arc<[u16]>,
    mut mode: watch::Receiver<LinkMode>,
    open: OpenLinks,
) {
    if !usable(&mut mode).await {
        return;
    }
    let Some((up, port)) = connect_first(&upstreams).await else {
        return;
    };
    let _counted = OpenGuard::new(&open, port);
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (down_r, down_w) = down.into_split();
    let (up_r, up_w) = up.into_split();
    let a = pump(down_r, up_w, mode.clone());
    let b = pump(up_r, down_w, mode.clone());
    let mut cut = mode.clone();
    tokio::select! {
        _ = a => {}
        _ = b => {}
        _ = async { let _ = cut.wait_for(|m| *m == LinkMode::Cut).await; } => {}
    }
    // Returning drops both sockets: each end sees the connection close.
}

/// Bytes held on the delay line each way, at most (then the reader waits: back-pressure).
pub const DELAY_BUFFER: usize = 8 * 1024 * 1024;

/// Size of one read.
const READ_BUF: usize = 16 * 1024;

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    // The line: what was read, with when it may be written. The writer below honours each
    // chunk's time, so a delay holds bytes without slowing the stream down.
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(DELAY_BUFFER / READ_BUF);
    let mut write_mode = mode.clone();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // A partition that began while the bytes were on the line holds them too.
            if !usable(&mut write_mode).await || to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            if !usable(&mut mode).await {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let delay = match *mode.borrow() {
                LinkMode::Delay(d) => d,
                _ => Duration::ZERO,
            };
            let due = tokio::time::Instant::now() + delay;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    // The reader ending (the peer closed) lets the writer flush what is on the line first.
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> u16 {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut got)).await {
            Ok(Ok(_)) => Some(got),
            _ => None,
        }
    }

    /// A server that writes `tag` to every connection it accepts, then echoes.
    async fn tagged_server(listener: TcpListener, tag: u8) {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&[tag]).await;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Which tagged server a new connection through the proxy reached (`None`: closed).
    async fn reached(proxy: &Proxy) -> Option<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("connect");
        let mut tag = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut tag)).await {
            Ok(Ok(1)) => Some(tag[0]),
            _ => None,
        }
    }

    /// Waits (at most 5 s) until `proxy` counts `want` connections to `upstream`; the count.
    async fn count_becomes(proxy: &Proxy, upstream: u16, want: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while proxy.connections_to(upstream) != want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.connections_to(upstream)
    }

    #[tokio::test]
    async fn fails_over_in_order_of_preference_and_back() {
        let a = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind a");
        let b = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind b");
        let (pa, pb) = (
            a.local_addr().expect("a").port(),
            b.local_addr().expect("b").port(),
        );
        let server_a = tokio::spawn(tagged_server(a, b'a'));
        let _server_b = tokio::spawn(tagged_server(b, b'b'));
        let proxy = Proxy::start_multi(vec![pa, pb]).await.expect("proxy");
        assert_eq!(reached(&proxy).await, Some(b'a'), "the first choice");

        // An open connection is counted on its upstream while it lives.
        assert_eq!(count_becomes(&proxy, pa, 0).await, 0, "the probe closed");
        let mut held = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("connect");
        let mut tag = [0u8; 1];
        held.read_exact(&mut tag).await.expect("tag");
        assert_eq!((proxy.connections_to(pa), proxy.connections_to(pb)), (1, 0));
        drop(held);
        assert_eq!(
            count_becomes(&proxy, pa, 0).await,
            0,
            "not counted once closed"
        );

        // The first upstream goes away (its listener closed: connections are refused).
        server_a.abort();
        let _ = server_a.await;
        assert_eq!(reached(&proxy).await, Some(b'b'), "failed over");

        // It comes back on the same port: new connections prefer it again.
        let a = TcpListener::bind(("127.0.0.1", pa))
            .await
            .expect("rebind a");
        let _server_a = tokio::spawn(tagged_server(a, b'a'));
        assert_eq!(
            reached(&proxy).await,
            Some(b'a'),
            "back to the first choice"
        );

        // None accepts: the connection is closed.
        let dead = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let dead_port = dead.local_addr().expect("addr").port();
        drop(dead);
        let nowhere = Proxy::start_multi(vec![dead_port]).await.expect("proxy");
        assert_eq!(reached(&nowhere).await, None);
        assert!(Proxy::start_multi(Vec::new()).await.is_err());
    }

    #[tokio::test]
    async fn pass_partition_delay_cut() {
        let proxy = Proxy::start(echo_server().await).await.expect("proxy");
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("connect");
        let second = Duration::from_secs(1);
        assert_eq!(
            roundtrip(&mut s, b"hello", second).await.as_deref(),
            Some(&b"hello"[..])
        );

        // Partition: nothing arrives, nothing is lost.
        proxy.set(LinkMode::Partition);
        assert_eq!(
            roundtrip(&mut s, b"held", Duration::from_millis(300)).await,
            None
        );
        proxy.set(LinkMode::Pass);
        let mut got = vec![0u8; 4];
        tokio::time::timeout(second, s.read_exact(&mut got))
            .await
            .expect("the held bytes arrive after the partition")
            .expect("read");
        assert_eq!(&got, b"held");

        // Delay: late, whole.
        proxy.set(LinkMode::Delay(Duration::from_millis(150)));
        let t = std::time::Instant::now();
        assert_eq!(
            roundtrip(&mut s, b"late", second).await.as_deref(),
            Some(&b"late"[..])
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );

        // A delay line, not a throttle: 2 MiB through the 150 ms delay take about 150 ms more
        // than without (a throttle holding each 16 KiB read 150 ms would take 19 s).
        let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let t = std::time::Instant::now();
        let (mut r, mut w) = s.split();
        let (sent, got) = tokio::join!(w.write_all(&big), async {
            let mut got = vec![0u8; big.len()];
            tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut got))
                .await
                .map(|_| got)
        });
        sent.expect("write");
        assert!(got.expect("the bytes arrive") == big, "whole and in order");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "a delay line keeps the stream's speed: {:?}",
            t.elapsed()
        );

        // Cut: the connection closes and new ones are closed at once.
        proxy.set(LinkMode::Cut);
        let mut one = [0u8; 1];
        let r = tokio::time::timeout(second, s.read(&mut one)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "closed: {r:?}");
        let mut t = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("accepted");
        let r = tokio::time::timeout(second, t.read(&mut one)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "refused: {r:?}");

        // Healed: new connections work again.
        proxy.set(LinkMode::Pass);
        let mut u = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .expect("connect");
        assert_eq!(
            roundtrip(&mut u, b"again", second).await.as_deref(),
            Some(&b"again"[..])
        );
    }
}
