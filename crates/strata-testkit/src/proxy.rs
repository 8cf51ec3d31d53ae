//! A TCP proxy that injects network faults between a client and a server.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// Size of one read, i.e. the largest chunk forwarded at once.
const CHUNK: usize = 16 * 1024;
/// Chunks buffered per direction between reading and forwarding (latency
/// pipeline); beyond that the proxy stops reading and TCP back-pressure
/// reaches the sender.
const PIPELINE: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the client sends to the server (requests).
    ClientToServer,
    /// Bytes the server sends to the client (replies, Pub/Sub messages).
    ServerToClient,
}

/// The faults in force; see the setters of [`FaultProxy`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fixed delay added to every forwarded chunk.
    pub latency: Duration,
    /// Random extra delay in `0..=jitter` per chunk.
    pub jitter: Duration,
    /// Nothing is forwarded in either direction.
    pub blackhole: bool,
    /// Client-to-server bytes are not forwarded.
    pub cut_client_to_server: bool,
    /// Server-to-client bytes are not forwarded.
    pub cut_server_to_client: bool,
    /// New connections are closed (reset) right after accept.
    pub refuse: bool,
}

impl Faults {
    fn holds(&self, dir: Direction) -> bool {
        self.blackhole
            || match dir {
                Direction::ClientToServer => self.cut_client_to_server,
                Direction::ServerToClient => self.cut_server_to_client,
            }
    }
}

/// Counters of a [`FaultProxy`] since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted (including refused ones).
    pub connections_accepted: u64,
    /// Connections closed at once because of [`FaultProxy::refuse`].
    pub connections_refused: u64,
    /// Connections currently open (client side).
    pub active_connections: u64,
    /// Bytes forwarded from clients to the server.
    pub bytes_client_to_server: u64,
    /// Bytes forwarded from the server to clients.
    pub bytes_server_to_client: u64,
}

struct Conn {
    client: Arc<TcpStream>,
    upstream: Option<Arc<TcpStream>>,
    task: AbortHandle,
}

struct Shared {
    target: SocketAddr,
    faults: watch::Sender<Faults>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    rng: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    bytes_c2s: AtomicU64,
    bytes_s2c: AtomicU64,
}

impl Shared {
    fn delay(&self) -> Duration {
        let faults = self.faults.borrow();
        let jitter = u64::try_from(faults.jitter.as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter == 0 {
            0
        } else {
            let seed = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            splitmix64(seed) % jitter.saturating_add(1)
        };
        faults.latency + Duration::from_nanos(extra)
    }

    fn counter(&self, dir: Direction) -> &AtomicU64 {
        match dir {
            Direction::ClientToServer => &self.bytes_c2s,
            Direction::ServerToClient => &self.bytes_s2c,
        }
    }

    /// Closes every open connection abruptly (RST on both sides).
    fn reset_all(&self) {
        let conns: Vec<Conn> = self.conns.lock().drain().map(|(_, c)| c).collect();
        for conn in conns {
            reset(&conn.client);
            if let Some(upstream) = &conn.upstream {
                reset(upstream);
            }
            conn.task.abort();
        }
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Arms SO_LINGER 0 so the last close sends RST instead of FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// A TCP proxy on a random port of 127.0.0.1 that forwards to a target and
/// injects faults, changeable at any time and applied to existing and new
/// connections alike: latency with jitter, blackhole, one-way cuts, refusing
/// new connections, and resetting all connections.
///
/// Blackholes and cuts *hold* bytes rather than dropping them, as a network
/// partition under TCP does: nothing is forwarded while the fault is on
/// (after a buffer of a few chunks fills, the proxy stops reading and the
/// sender sees back-pressure), and held bytes flow again, in order, when it is
/// lifted. The byte stream is never corrupted. To make a partition fatal for
/// the connections that saw it, call [`reset_all`](Self::reset_all) before
/// lifting it.
///
/// It runs as tasks on the Tokio runtime it was started on; dropping it stops
/// them and resets all its connections.
///
/// ```no_run
/// # async fn demo(target: std::net::SocketAddr) -> std::io::Result<()> {
/// use std::time::Duration;
/// use strata_testkit::{Direction, FaultProxy};
///
/// let proxy = FaultProxy::start(target).await?;
/// // point the client at proxy.addr() instead of target, then:
/// proxy.set_latency(Duration::from_millis(5), Duration::from_millis(2));
/// proxy.cut(Direction::ServerToClient, true); // e.g. a silent subscriber
/// proxy.clear();
/// proxy.reset_all();
/// # Ok(())
/// # }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("faults", &self.faults())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Binds a random port of 127.0.0.1 and starts forwarding connections to
    /// `target` (each accepted connection opens one to `target`; if that
    /// fails, the client connection is reset).
    ///
    /// # Errors
    ///
    /// If the listening socket cannot be bound.
    ///
    /// # Panics
    ///
    /// If called outside a Tokio runtime.
    pub async fn start(target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
            ^ u64::from(addr.port());
        let shared = Arc::new(Shared {
            target,
            faults: watch::Sender::new(Faults::default()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes_c2s: AtomicU64::new(0),
            bytes_s2c: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { addr, shared, accept_task })
    }

    /// The proxy's listening address (point clients here).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's listening port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// A snapshot of the faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.faults.borrow().clone()
    }

    /// Delays every chunk read from now on by `base` plus a random
    /// `0..=jitter`. Delays are pipelined (like real latency, they do not
    /// throttle throughput) and order is preserved. Zero for both turns it
    /// off.
    pub fn set_latency(&self, base: Duration, jitter: Duration) {
        self.shared.faults.send_modify(|f| {
            f.latency = base;
            f.jitter = jitter;
        });
    }

    /// Blackhole on: connections are still accepted and read, but nothing is
    /// forwarded in either direction (bytes are held, see the type docs).
    pub fn blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.blackhole = on);
    }

    /// Stops (or resumes) forwarding in one direction (bytes are held, see
    /// the type docs).
    pub fn cut(&self, direction: Direction, on: bool) {
        self.shared.faults.send_modify(|f| match direction {
            Direction::ClientToServer => f.cut_client_to_server = on,
            Direction::ServerToClient => f.cut_server_to_client = on,
        });
    }

    /// While on, new connections are reset right after they are accepted
    /// (the client's connect succeeds, then the connection dies). Existing
    /// connections are not affected.
    pub fn refuse(&self, on: bool) {
        self.shared.faults.send_modify(|f| f.refuse = on);
    }

    /// Turns all faults off (held bytes start flowing again). Does not touch
    /// connections.
    pub fn clear(&self) {
        self.shared.faults.send_replace(Faults::default());
    }

    /// Closes every current connection abruptly on both sides (RST via
    /// SO_LINGER 0). New connections are accepted as usual.
    pub fn reset_all(&self) {
        self.shared.reset_all();
    }

    /// Counters since start.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections_accepted: s.accepted.load(Ordering::Relaxed),
            connections_refused: s.refused.load(Ordering::Relaxed),
            active_connections: u64::try_from(s.conns.lock().len()).unwrap_or(u64::MAX),
            bytes_client_to_server: s.bytes_c2s.load(Ordering::Relaxed),
            bytes_server_to_client: s.bytes_s2c.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.faults.borrow().refuse {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            reset(&stream);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(stream);
        // Hold the lock while spawning so the task cannot deregister before
        // it is registered.
        let mut conns = shared.conns.lock();
        let task = tokio::spawn(run_conn(Arc::clone(&shared), id, Arc::clone(&client)));
        conns.insert(id, Conn { client, upstream: None, task: task.abort_handle() });
    }
}

async fn run_conn(shared: Arc<Shared>, id: u64, client: Arc<TcpStream>) {
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.target)).await {
        Ok(Ok(upstream)) => Arc::new(upstream),
        _ => {
            if shared.conns.lock().remove(&id).is_some() {
                reset(&client);
            }
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Some(conn) = shared.conns.lock().get_mut(&id) {
        conn.upstream = Some(Arc::clone(&upstream));
    }
    let (c2s_tx, c2s_rx) = mpsc::channel(PIPELINE);
    let (s2c_tx, s2c_rx) = mpsc::channel(PIPELINE);
    let result = tokio::try_join!(
        pump_read(&shared, &client, c2s_tx),
        pump_write(&shared, &upstream, c2s_rx, Direction::ClientToServer),
        pump_read(&shared, &upstream, s2c_tx),
        pump_write(&shared, &client, s2c_rx, Direction::ServerToClient),
    );
    if shared.conns.lock().remove(&id).is_some() && result.is_err() {
        // One side failed (e.g. reset): fail the other side the same way.
        reset(&client);
        reset(&upstream);
    }
}

enum Chunk {
    Data(Vec<u8>, Instant),
    Eof,
}

async fn pump_read(shared: &Shared, src: &TcpStream, tx: mpsc::Sender<Chunk>) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_some(src, &mut buf).await?;
        if n == 0 {
            let _ = tx.send(Chunk::Eof).await;
            return Ok(());
        }
        let due = Instant::now() + shared.delay();
        if tx.send(Chunk::Data(buf[..n].to_vec(), due)).await.is_err() {
            return Ok(());
        }
    }
}

async fn pump_write(
    shared: &Shared,
    dst: &TcpStream,
    mut rx: mpsc::Receiver<Chunk>,
    dir: Direction,
) -> io::Result<()> {
    let mut faults = shared.faults.subscribe();
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Chunk::Data(bytes, due) => {
                tokio::time::sleep_until(due).await;
                wait_until_open(&mut faults, dir).await;
                // Counted before writing, so that a peer that has seen the
                // bytes also sees them in the stats.
                shared.counter(dir).fetch_add(u64::try_from(bytes.len()).unwrap_or(0), Ordering::Relaxed);
                write_all(dst, &bytes).await?;
            }
            Chunk::Eof => {
                wait_until_open(&mut faults, dir).await;
                socket2::SockRef::from(dst).shutdown(Shutdown::Write)?;
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn wait_until_open(faults: &mut watch::Receiver<Faults>, dir: Direction) {
    loop {
        if !faults.borrow_and_update().holds(dir) {
            return;
        }
        if faults.changed().await.is_err() {
            return;
        }
    }
}

async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        match dst.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
