//! Many simulated nodes in one process, for the scale benchmark and the
//! scale test: each node speaks the real node-to-node protocol over its
//! own loopback address, through the real handlers ([`crate::api`]'s
//! node-to-node router, signature checks included) and a real
//! [`NodeService`] (session slot, lease, heartbeats), but its job runs no
//! plugin ([`NodeService::simulated`]): it reports `started`, then
//! `collected`. A coordinator (a real daemon whose `[nodes]` lists these
//! addresses) cannot tell them from real nodes, except that they collect
//! in no time and cannot upload.
//!
//! Node `sim-I` listens on `127.1.X.Y` (the `I+1`-th address after
//! `127.1.0.0`), all on one port: a single socket bound to `0.0.0.0`
//! accepts for all of them (only connections from loopback are served),
//! and each connection is served as the node its local address names. One
//! socket instead of one per node leaves the descriptors to the
//! connections: a coordinator keeps one per node (HTTP/2: the session
//! stream, commands and pings are streams of it), and so does this
//! process.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::api::{self, AppState};
use crate::config::{Config, PluginRole, StorageSettings, TlsSetting};
use crate::node::storage::Storage;
use crate::node::{ActivePlugins, NodeService, PluginSet, Roles};
use crate::peer_auth::PeerVerifier;

/// The name of simulated node `i` (from 0).
pub fn node_name(i: usize) -> String {
    format!("sim-{i}")
}

/// The loopback address of simulated node `i`.
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i as u32 + 1)
}

/// The cluster the simulated nodes take part in.
#[derive(Debug, Clone)]
pub struct ClusterOf {
    /// The node that coordinates (the only one whose requests they take).
    pub coordinator: String,
    /// `cluster_secret`.
    pub secret: String,
    /// How often a node sends a heartbeat: the coordinator's
    /// `heartbeat_interval_ms`, or it calls the nodes lost.
    pub heartbeat: Duration,
    /// Where the (never run) plugins' compiled forms are cached.
    pub plugin_cache_dir: Option<std::path::PathBuf>,
}

pub struct SimulatedNodes {
    /// `sim-I` -> `127.1.X.Y:PORT`, for the coordinator's `[nodes]`.
    pub addresses: BTreeMap<String, String>,
    nodes: Vec<Arc<NodeService>>,
    stop: CancellationToken,
}

impl SimulatedNodes {
    /// Serve `count` simulated nodes of `cluster`. `dir` (which must
    /// exist) holds their one shared data directory.
    pub async fn start(count: usize, cluster: &ClusterOf, dir: &Path) -> Result<SimulatedNodes> {
        let (coordinator, secret) = (cluster.coordinator.as_str(), cluster.secret.as_str());
        anyhow::ensure!(count < 1 << 16, "at most 65,535 simulated nodes");
        let listener = crate::server::listener::bind((Ipv4Addr::UNSPECIFIED, 0).into())
            .context("binding the simulated nodes' socket")?;
        let port = listener.local_addr()?.port();
        let addresses: BTreeMap<String, String> = (0..count)
            .map(|i| {
                (
                    node_name(i),
                    SocketAddr::new(node_ip(i).into(), port).to_string(),
                )
            })
            .collect();

        // What every node shares: plugins (loaded once, never run), the
        // coordinator side (never used), users, settings, audit.
        let mut nodes_map = addresses.clone();
        nodes_map.insert(coordinator.to_string(), "127.0.0.1:1".to_string());
        let config = Config {
            node: node_name(0),
            listen: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            data_dir: dir.join("data"),
            tls: Some(TlsSetting::Off),
            allow_plaintext: false,
            cluster_secret: Some(secret.to_string()),
            cluster_secret_file: None,
            nodes: nodes_map,
            users: Vec::new(),
            collector: Default::default(),
            uploader: PluginRole::uploader(),
            upload: Default::default(),
            coordinator: Default::default(),
            storage: StorageSettings {
                min_free_mb: 0,
                ..Default::default()
            },
            server: Default::default(),
            plugin_cache_dir: cluster.plugin_cache_dir.clone(),
        };
        std::fs::create_dir_all(&config.data_dir)?;
        let (shared, _) = crate::server::build(&config, &dir.join("simulated.toml")).await?;
        let storage = Arc::new(Storage::open(
            &config.data_dir,
            "simulated",
            config.storage.clone(),
        )?);
        let plugins = shared.node.plugins().current();
        let heartbeat = cluster.heartbeat;

        let mut nodes = Vec::with_capacity(count);
        let mut routers: HashMap<IpAddr, Router> = HashMap::with_capacity(count);
        for i in 0..count {
            let roles = Roles {
                plugins: ActivePlugins::new(PluginSet {
                    collector: plugins.collector.clone(),
                    uploader: plugins.uploader.clone(),
                }),
                upload_policy: config.upload.clone(),
                upload_tls: shared.node.upload_tls().clone(),
            };
            let node = NodeService::simulated(node_name(i), storage.clone(), roles, heartbeat);
            let state = AppState {
                node: node.clone(),
                peer_auth: Arc::new(PeerVerifier::new(secret, [coordinator.to_string()])),
                ..shared.clone()
            };
            routers.insert(node_ip(i).into(), api::node_to_node_router(state));
            nodes.push(node);
        }

        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, routers, stop.clone()));
        Ok(SimulatedNodes {
            addresses,
            nodes,
            stop,
        })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Wait (up to `wait` each) until no node holds a session; whether
    /// every one is idle.
    pub async fn wait_idle(&self, wait: Duration) -> bool {
        futures::future::join_all(self.nodes.iter().map(|n| n.wait_idle(wait)))
            .await
            .into_iter()
            .all(|idle| idle)
    }
}

impl Drop for SimulatedNodes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    routers: HashMap<IpAddr, Router>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("simulated nodes: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let app = stream
            .local_addr()
            .ok()
            .and_then(|local| routers.get(&local.ip()));
        let Some(app) = app.filter(|_| peer.ip().is_loopback()).cloned() else {
            continue; // dropped: not from loopback, or to no simulated node
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                app.clone().oneshot(request.map(axum::body::Body::new))
            });
            // As a real node serves plain HTTP: HTTP/2 for short
            // requests (prior knowledge), HTTP/1.1 for sessions, whose
            // connections are upgraded.
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let connection = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
