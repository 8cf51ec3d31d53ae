//! A real Redis Cluster of local `redis-server` processes on random loopback ports.

use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process;
use crate::redis::{RedisServer, RedisServerBuilder};

/// Environment variable naming the `redis-cli` binary to use instead of the one found
/// in `PATH` (it creates the cluster: `redis-cli --cluster create`).
pub const REDIS_CLI_ENV: &str = "STRATA_REDIS_CLI";

/// The number of hash slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u16 = 16384;

const CLI_NOT_FOUND: &str = "redis-cli not found: the Redis Cluster test support creates the cluster \
     with `redis-cli --cluster create`; install it (Debian: apt-get install redis-tools) or set \
     STRATA_REDIS_CLI";

/// How long [`RedisClusterBuilder::start`] waits for the new cluster to be healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node of a [`RedisCluster`] is right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves slots (or is a master without slots).
    Master,
    /// Replicates a master.
    Replica,
}

/// Builder of a [`RedisCluster`]: how many masters, how many replicas per master.
///
/// ```no_run
/// let cluster = strata_testkit::RedisCluster::builder().masters(3).replicas(1).start();
/// println!("{:?}", cluster.urls());
/// ```
#[derive(Debug, Clone)]
pub struct RedisClusterBuilder {
    masters: usize,
    replicas: usize,
    node_timeout: Duration,
    args: Vec<(String, String)>,
    die_with_parent: bool,
}

impl Default for RedisClusterBuilder {
    fn default() -> Self {
        Self {
            masters: 3,
            replicas: 1,
            node_timeout: Duration::from_secs(1),
            args: Vec::new(),
            die_with_parent: false,
        }
    }
}

impl RedisClusterBuilder {
    /// Number of masters (default 3; at least 3, as `redis-cli --cluster create` asks).
    #[must_use]
    pub fn masters(mut self, n: usize) -> Self {
        self.masters = n;
        self
    }

    /// Replicas per master (default 1; 0 for a cluster without failover).
    #[must_use]
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// `cluster-node-timeout` (default 1 s): how long a node may not answer before it
    /// is considered failing; a failover takes about 2–3 times this.
    #[must_use]
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// One more configuration directive for every node (see
    /// [`RedisServerBuilder::arg`]).
    #[must_use]
    pub fn arg(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.args.push((name.into(), value.into()));
        self
    }

    /// Starts the nodes, creates the cluster with `redis-cli --cluster create` and
    /// waits until it is healthy (see [`RedisCluster::wait_healthy`]).
    ///
    /// # Panics
    ///
    /// When `redis-server` or `redis-cli` is missing (the message says which Debian
    /// package to install: `redis-server`, `redis-tools`), or the cluster does not
    /// form (the message holds the output of `redis-cli` and the nodes' logs).
    pub fn start(self) -> RedisCluster {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`start`](Self::start) but returns the error instead of panicking.
    ///
    /// # Errors
    ///
    /// `NotFound` when a binary is missing; otherwise an error saying what failed.
    pub fn try_start(self) -> io::Result<RedisCluster> {
        if self.masters < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a Redis Cluster needs at least 3 masters (redis-cli --cluster create)",
            ));
        }
        let cli = redis_cli_binary()?;
        let began = Instant::now();
        let count = self.masters * (1 + self.replicas);
        let timeout_ms = self.node_timeout.as_millis().max(1).to_string();
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            let mut builder = RedisServerBuilder::default()
                .arg("cluster-enabled", "yes")
                .arg("cluster-config-file", "nodes.conf")
                .arg("cluster-node-timeout", timeout_ms.clone());
            for (name, value) in &self.args {
                builder = builder.arg(name.clone(), value.clone());
            }
            builder.cluster_bus = true;
            builder.die_with_parent = self.die_with_parent;
            nodes.push(builder.try_start()?);
        }
        let mut cluster = RedisCluster { nodes, paused: vec![false; count], cli, started_in: Duration::ZERO };
        cluster.create(self.replicas)?;
        cluster.try_wait_healthy(START_TIMEOUT)?;
        cluster.started_in = began.elapsed();
        Ok(cluster)
    }
}

/// A Redis Cluster of local `redis-server` processes, each on a random free port of
/// 127.0.0.1 (with its bus port, +10000, free too) in its own temporary directory,
/// without persistence (`save ""`, `appendonly no`; `nodes.conf` is kept, so a
/// [`restart`](Self::restart)ed node rejoins with its identity and an empty data set).
///
/// Nodes are addressed by index, `0..len()`, fixed for the cluster's life; a node's
/// [`role`](Self::role) changes with failovers. Every process is killed when this value
/// is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    paused: Vec<bool>,
    cli: PathBuf,
    started_in: Duration,
}

impl RedisCluster {
    /// Starts a cluster of 3 masters with 1 replica each.
    ///
    /// # Panics
    ///
    /// See [`RedisClusterBuilder::start`].
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// A builder for another shape.
    pub fn builder() -> RedisClusterBuilder {
        RedisClusterBuilder::default()
    }

    /// One cluster of 3 masters without replicas for the whole test process, started
    /// on first use (about 2 s), for the tests that do not break it: give each test its
    /// own key prefix, and do not kill, pause or restart its nodes (start a cluster of
    /// your own for that). Its nodes are started from a thread that lives as long as
    /// the process and die with it (Linux `PR_SET_PDEATHSIG`), since a static is never
    /// dropped.
    ///
    /// # Panics
    ///
    /// As [`RedisClusterBuilder::start`] (every later call panics too).
    pub fn shared() -> &'static Mutex<RedisCluster> {
        static SHARED: OnceLock<Result<Mutex<RedisCluster>, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned =
                std::thread::Builder::new().name("strata-shared-redis-cluster".into()).spawn(move || {
                    let builder = RedisCluster::builder().replicas(0);
                    let started = RedisClusterBuilder { die_with_parent: true, ..builder }.try_start();
                    let _ = tx.send(started.map_err(|e| e.to_string()));
                    // The nodes die when this thread does: at the end of the process.
                    loop {
                        std::thread::park();
                    }
                });
            match spawned {
                Ok(_) => rx.recv().map_err(|e| e.to_string()).and_then(|r| r).map(Mutex::new),
                Err(e) => Err(format!("cannot spawn the shared cluster's thread: {e}")),
            }
        });
        match shared {
            Ok(cluster) => cluster,
            Err(e) => panic!("the shared Redis Cluster did not start: {e}"),
        }
    }

    /// How long [`start`](Self::start) took, from the first `redis-server` to a healthy
    /// cluster.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's URL, `redis://127.0.0.1:PORT/`, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The server of node `i` (its port, URL, log, raw commands).
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// The node listening on `port`, if any.
    pub fn node_by_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// Whether node `i` runs and is not paused.
    pub fn is_live(&mut self, i: usize) -> bool {
        !self.paused[i] && self.nodes[i].is_running()
    }

    /// Sends one command to node `i` (see [`RedisServer::command`]).
    ///
    /// # Errors
    ///
    /// As [`RedisServer::command`].
    pub fn command(&self, i: usize, args: &[&str]) -> io::Result<String> {
        self.nodes[i].command(args)
    }

    /// What node `i` says it is (`CLUSTER NODES`, its `myself` line).
    ///
    /// # Errors
    ///
    /// When the node does not answer.
    pub fn role(&self, i: usize) -> io::Result<Role> {
        let text = bulk_text(&self.command(i, &["CLUSTER", "NODES"])?);
        let me = parse_nodes(&text)
            .into_iter()
            .find(|n| n.flags.iter().any(|f| f == "myself"))
            .ok_or_else(|| io::Error::other(format!("no `myself` line in CLUSTER NODES: {text}")))?;
        Ok(if me.is_master() { Role::Master } else { Role::Replica })
    }

    /// The nodes that are masters now, as a live node sees it.
    ///
    /// # Errors
    ///
    /// When no live node answers.
    pub fn masters(&mut self) -> io::Result<Vec<usize>> {
        let view = self.view()?;
        let mut out: Vec<usize> = view
            .iter()
            .filter(|n| n.is_master() && !n.failed())
            .filter_map(|n| self.node_by_port(n.port))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The master serving `slot`, as a live node sees it (`None` if no master claims
    /// it).
    ///
    /// # Errors
    ///
    /// When no live node answers.
    pub fn master_for_slot(&mut self, slot: u16) -> io::Result<Option<usize>> {
        let view = self.view()?;
        Ok(view
            .iter()
            .find(|n| n.is_master() && n.slots.iter().any(|r| r.contains(&slot)))
            .and_then(|n| self.node_by_port(n.port)))
    }

    /// The master serving `key`'s slot (see [`key_slot`]).
    ///
    /// # Errors
    ///
    /// When no live node answers.
    pub fn master_for_key(&mut self, key: &str) -> io::Result<Option<usize>> {
        self.master_for_slot(key_slot(key.as_bytes()))
    }

    /// Kills node `i` with SIGKILL (its data is gone; [`restart`](Self::restart) brings
    /// it back empty).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.paused[i] = false;
    }

    /// Freezes node `i` with SIGSTOP.
    ///
    /// # Errors
    ///
    /// If the node is not running.
    pub fn pause(&mut self, i: usize) -> io::Result<()> {
        self.nodes[i].pause()?;
        self.paused[i] = true;
        Ok(())
    }

    /// Resumes node `i` with SIGCONT.
    ///
    /// # Errors
    ///
    /// If the node is not running.
    pub fn resume(&mut self, i: usize) -> io::Result<()> {
        self.nodes[i].resume()?;
        self.paused[i] = false;
        Ok(())
    }

    /// Starts node `i` again on its port (killing it first if it runs), with an empty
    /// data set and its `nodes.conf`: it rejoins the cluster, as a replica if its slots
    /// were taken over meanwhile.
    ///
    /// # Panics
    ///
    /// When the server cannot start (see [`RedisServer::restart`]).
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
        self.paused[i] = false;
    }

    /// Waits until the cluster is healthy: every live node reports `cluster_state:ok`
    /// with all 16384 slots assigned and ok, every slot is served by a live master in
    /// every live node's view, and every live replica of a live master has its
    /// replication link up.
    ///
    /// # Panics
    ///
    /// When it is not healthy within `timeout` (the message says what was wrong last).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Duration {
        let began = Instant::now();
        self.try_wait_healthy(timeout).unwrap_or_else(|e| panic!("{e}"));
        began.elapsed()
    }

    /// Like [`wait_healthy`](Self::wait_healthy) but returns the error.
    ///
    /// # Errors
    ///
    /// `TimedOut`, with what was still wrong.
    pub fn try_wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = match self.health_problem() {
                Ok(None) => return Ok(()),
                Ok(Some(p)) => p,
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the Redis Cluster is not healthy after {timeout:?}: {problem}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What keeps the cluster from being healthy, or `None`.
    fn health_problem(&mut self) -> io::Result<Option<String>> {
        let live: Vec<usize> = (0..self.len()).filter(|&i| self.is_live(i)).collect();
        let live_ports: Vec<u16> = live.iter().map(|&i| self.nodes[i].port()).collect();
        for &i in &live {
            let port = self.nodes[i].port();
            let info = bulk_text(&self.command(i, &["CLUSTER", "INFO"])?);
            for want in ["cluster_state:ok", "cluster_slots_assigned:16384", "cluster_slots_ok:16384"] {
                if !info.lines().any(|l| l.trim() == want) {
                    return Ok(Some(format!("node {i} (port {port}) lacks {want}")));
                }
            }
            let view = parse_nodes(&bulk_text(&self.command(i, &["CLUSTER", "NODES"])?));
            let mut covered = 0usize;
            for n in view.iter().filter(|n| n.is_master() && !n.slots.is_empty()) {
                if n.failed() || !live_ports.contains(&n.port) {
                    return Ok(Some(format!(
                        "node {i} (port {port}) sees slots on master port {} which is not live",
                        n.port
                    )));
                }
                covered += n.slots.iter().map(|r| usize::from(r.end() - r.start()) + 1).sum::<usize>();
            }
            if covered != usize::from(CLUSTER_SLOTS) {
                return Ok(Some(format!("node {i} (port {port}) sees {covered} slots with a master")));
            }
            let me = view.iter().find(|n| n.flags.iter().any(|f| f == "myself"));
            if let Some(me) = me.filter(|m| !m.is_master())
                && view.iter().any(|n| n.id == me.master && live_ports.contains(&n.port))
            {
                let repl = bulk_text(&self.command(i, &["INFO", "replication"])?);
                if !repl.lines().any(|l| l.trim() == "master_link_status:up") {
                    return Ok(Some(format!("replica node {i} (port {port}) has no replication link")));
                }
            }
        }
        Ok(None)
    }

    /// `CLUSTER NODES` of the first live node that answers.
    fn view(&mut self) -> io::Result<Vec<NodeLine>> {
        let mut last = io::Error::other("no live node");
        for i in 0..self.len() {
            if !self.is_live(i) {
                continue;
            }
            match self.nodes[i].command_timeout(&["CLUSTER", "NODES"], Duration::from_secs(2)) {
                Ok(text) => return Ok(parse_nodes(&bulk_text(&text))),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn create(&mut self, replicas: usize) -> io::Result<()> {
        let mut cmd = Command::new(&self.cli);
        cmd.arg("--cluster").arg("create");
        for n in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = cmd
            .arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", self.cli.display())))?;
        if out.status.success() {
            return Ok(());
        }
        let mut logs = String::new();
        for n in &self.nodes {
            logs.push_str(&format!("---- node {} ----\n{}\n", n.port(), process::tail(&n.log(), 20)));
        }
        Err(io::Error::other(format!(
            "redis-cli --cluster create failed ({}):\n{}{}\n{logs}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// The hash slot of `key` as Redis Cluster computes it: CRC16 (XMODEM) of the key, or
/// of its hash tag (the text between the first `{` and the next `}`, when not empty),
/// modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(hashed) % CLUSTER_SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// The master's id, `-` for a master.
    master: String,
    slots: Vec<std::ops::RangeInclusive<u16>>,
}

impl NodeLine {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    fn failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?" || f == "noaddr")
    }
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // `ip:port@cport[,hostname]`
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                    None => s.parse().ok().map(|a| a..=a),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_owned(),
                port,
                flags: f[2].split(',').map(str::to_owned).collect(),
                master: f[3].to_owned(),
                slots,
            })
        })
        .collect()
}

/// The text of a RESP bulk string reply (`$n\r\n…\r\n`); other replies as they are.
fn bulk_text(reply: &str) -> String {
    match reply.strip_prefix('$').and_then(|r| r.split_once("\r\n")) {
        Some((_, body)) => body.strip_suffix("\r\n").unwrap_or(body).to_owned(),
        None => reply.to_owned(),
    }
}

fn redis_cli_binary() -> io::Result<PathBuf> {
    match std::env::var_os(REDIS_CLI_ENV) {
        Some(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            if process::is_executable(&path) {
                Ok(path)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{CLI_NOT_FOUND} (tried {})", path.display()),
                ))
            }
        }
        _ => {
            process::which("redis-cli").ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, CLI_NOT_FOUND))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
                    b2 127.0.0.1:30004@40004 slave a1 0 1 1 connected\n\
                    c3 127.0.0.1:30002@40002,host master,fail - 0 1 2 connected 5461 5462-10922 [5463->-x]\n";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].port, 30001);
        assert!(nodes[0].is_master() && !nodes[0].failed());
        assert_eq!(nodes[1].master, "a1");
        assert!(nodes[2].failed());
        assert_eq!(nodes[2].slots, vec![5461..=5461, 5462..=10922]);
        assert_eq!(bulk_text("$5\r\nhello\r\n"), "hello");
    }
}
