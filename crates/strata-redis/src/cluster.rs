//! The connection every call goes through, to one server or to a Redis Cluster
//! ([`RedisConn`]), and the clients that open it ([`Connector`]).
//!
//! A cluster connection is redis-rs's `cluster_async::ClusterConnection`: it routes
//! each command by its first key (a script by its first `KEYS` entry), follows `MOVED`
//! and `ASK`, and refreshes the slot map when a node fails. Its client is configured
//! for a cache: few retries with short waits (redis-rs's defaults, 16 retries sleeping
//! at least 1.28 s each, would hold a call for many seconds during a failover), each
//! connection attempt bounded by [`ConnectionOptions::connect_timeout`], and no
//! response timeout of its own: the callers bound every call with theirs.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use strata::error::{Error, ErrorKind};

use crate::connection::{ConnectionOptions, bad_url, map_redis_error, open_client, redact_url};

/// Retries of a cluster call after a connection error or `TRYAGAIN`/`CLUSTERDOWN`
/// (`MOVED` and `ASK` are followed at once, without counting).
const CLUSTER_RETRIES: u32 = 2;

/// Bounds of the wait before each such retry, in ms (jittered, growing as 10·2ⁿ).
const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (10, 100);

/// Where a push connection's messages go: handed to redis-rs, which calls it from its
/// connection task and must not block (so it can only drop what does not fit).
pub(crate) type PushSink = Box<dyn Fn(redis::PushInfo) -> Result<(), ()> + Send + Sync>;

/// A connection to one server or to a Redis Cluster; commands, scripts and pipelines
/// run on either unchanged (a pipeline must stay in one slot on a cluster). Cloning
/// gives another handle to the same connection.
#[derive(Clone)]
pub(crate) enum RedisConn {
    /// One server, through a reconnecting manager (the tier, publishers).
    Single(ConnectionManager),
    /// One server, a plain connection (a subscriber's dedicated one).
    Plain(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Runs `cmd` on the node that serves `key` (on one server: on it). For commands
    /// redis-rs would otherwise send to every node, such as `CLIENT SETNAME`.
    pub(crate) async fn query_on_node_of(&mut self, key: &str, cmd: Cmd) -> RedisResult<Value> {
        match self {
            RedisConn::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                c.route_command(cmd, routing).await
            }
            other => cmd.query_async(other).await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Plain(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Plain(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The client that opens connections for a component's [`ConnectionOptions`]: to one
/// server, or to a Redis Cluster.
// One per component, made at build time: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub(crate) enum Connector {
    Single(redis::Client),
    Cluster(ClusterClient),
}

impl Connector {
    /// Opens the client, with an error that says how to fix a bad URL (passwords
    /// redacted). Nothing is sent.
    pub(crate) fn open(options: &ConnectionOptions, what: &str) -> Result<Self, Error> {
        if !options.is_cluster() {
            return open_client(&options.url, what, options.tls.as_ref()).map(Connector::Single);
        }
        // Each URL is checked as one server's would be (scheme, TLS settings, syntax).
        for url in &options.cluster_nodes {
            open_client(url, what, options.tls.as_ref())?;
        }
        let nodes: Vec<&str> = options.cluster_nodes.iter().map(String::as_str).collect();
        let builder = ClusterClientBuilder::new(nodes)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_RETRY_WAIT_MS.0)
            .max_retry_wait(CLUSTER_RETRY_WAIT_MS.1)
            .retry_wait_formula(10, 2)
            .connection_timeout(options.connect_timeout);
        let builder = with_certs(builder, options);
        builder.build().map(Connector::Cluster).map_err(|e| {
            let shown: Vec<String> = options.cluster_nodes.iter().map(|u| redact_url(u)).collect();
            let e = bad_url(what, &shown.join(", "), e);
            Error::new(
                ErrorKind::InvalidInput,
                format!("{e}; every node of a cluster needs the same credentials, TLS mode and db 0"),
            )
            .with_source(e)
        })
    }

    /// The one-server client (`None` for a cluster).
    pub(crate) fn single(&self) -> Option<&redis::Client> {
        match self {
            Connector::Single(c) => Some(c),
            Connector::Cluster(_) => None,
        }
    }

    /// A dedicated connection (for a subscriber's blocking reads), connected now:
    /// each connection attempt bounded by `connect_timeout`, no response timeout (the
    /// caller bounds each read). With `pushes`, a RESP3 connection to one server whose
    /// push messages (Pub/Sub deliveries, and a last one when it disconnects) go to
    /// it; a cluster has none (the caller reads instead).
    pub(crate) async fn dedicated(
        &self,
        connect_timeout: Duration,
        pushes: Option<PushSink>,
    ) -> RedisResult<RedisConn> {
        match self {
            Connector::Single(client) => {
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(None);
                let Some(pushes) = pushes else {
                    return client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                        .map(RedisConn::Plain);
                };
                // The same server, credentials and TLS settings, spoken in RESP3 (Redis
                // 6 and later): one connection both reads the stream and receives pushes.
                let info = client.get_connection_info().clone();
                let settings = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(settings))?;
                let cfg = cfg.set_push_sender(pushes);
                client.get_multiplexed_async_connection_with_config(&cfg).await.map(RedisConn::Plain)
            }
            Connector::Cluster(client) => {
                if pushes.is_some() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "push delivery is for one server; a cluster subscriber reads",
                    )));
                }
                let cfg = ClusterConfig::new().set_connection_timeout(connect_timeout);
                client.get_async_connection_with_config(cfg).await.map(RedisConn::Cluster)
            }
        }
    }

    /// [`dedicated`](Self::dedicated), within `limit`, then named `name` (`CLIENT
    /// SETNAME`, within `grace`) on the node that serves `key`; `what` names the caller
    /// in errors (of kind `Backplane`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn dedicated_named(
        &self,
        connect_timeout: Duration,
        limit: Duration,
        name: &str,
        key: &str,
        grace: Duration,
        what: &str,
        pushes: Option<PushSink>,
    ) -> Result<RedisConn, Error> {
        let mut conn = match tokio::time::timeout(limit, self.dedicated(connect_timeout, pushes)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(map_redis_error(ErrorKind::Backplane, &format!("{what} connect"), e)),
            Err(_) => return Err(Error::timeout(&format!("{what} connect"), limit)),
        };
        let mut setname = redis::cmd("CLIENT");
        setname.arg("SETNAME").arg(name);
        match tokio::time::timeout(grace, conn.query_on_node_of(key, setname)).await {
            Ok(Ok(_)) => Ok(conn),
            Ok(Err(e)) => Err(map_redis_error(ErrorKind::Backplane, &format!("{what} setname"), e)),
            Err(_) => Err(Error::timeout(&format!("{what} setname"), grace)),
        }
    }

    /// A cluster connection that connects on first use (needs a Tokio runtime).
    pub(crate) fn lazy_cluster(client: &ClusterClient) -> RedisConn {
        RedisConn::Cluster(client.get_pending_async_connection_with_config(ClusterConfig::new()))
    }
}

#[cfg(feature = "tls")]
fn with_certs(builder: ClusterClientBuilder, options: &ConnectionOptions) -> ClusterClientBuilder {
    match &options.tls {
        None => builder,
        Some(t) => builder.certs(redis::TlsCertificates {
            client_tls: t.client_auth_pem.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: t.root_cert_pem.clone(),
        }),
    }
}

#[cfg(not(feature = "tls"))]
fn with_certs(builder: ClusterClientBuilder, _options: &ConnectionOptions) -> ClusterClientBuilder {
    builder
}
