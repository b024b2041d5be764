//! A local cluster of real daemon processes on loopback, for the `demo`
//! command, the end-to-end tests and the benchmarks.
//!
//! Each node's listening socket is bound here (port 0) before any daemon
//! starts and handed to it as file descriptor 3 (`serve --listen-fd 3`),
//! so every address is known up front, no port can be taken in between,
//! and a request sent at once simply waits in the backlog until the
//! daemon is ready: no polling for readiness. Children are killed when
//! the cluster is dropped (and, on Linux, if this process dies).
//!
//! Each node's port also stays held for the cluster's life by a socket
//! bound to it that never listens ([`hold_port`]): a killed node's port
//! refuses connections, as a dead node's would, but no other socket of
//! the machine (another test's daemon, a connection's source port) can
//! take it before the node is restarted there.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::client::{ApiClient, ClientTls};
use crate::config::{Config, Role, TlsFiles, TlsSetting, User};
use crate::tls::certs::{self, NodeHost};

pub const ADMIN_USER: &str = "admin";
pub const READER_USER: &str = "reader";
/// The fd a daemon finds its listening socket on.
const LISTEN_FD: i32 = 3;

pub struct LocalNode {
    pub name: String,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub data_dir: PathBuf,
    /// Whether it serves TLS (`https://`).
    pub tls: bool,
    exe: PathBuf,
    netns: Option<PathBuf>,
    daemon_args: Vec<String>,
    launcher: Vec<String>,
    child: Option<Child>,
    /// Keeps the node's port while no daemon listens on it.
    _port: socket2::Socket,
}

impl LocalNode {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

pub struct LocalCluster {
    pub root: PathBuf,
    pub nodes: Vec<LocalNode>,
    pub admin_password: String,
    pub reader_password: String,
    pub secret: String,
    /// The cluster CA (`root/certs/ca.pem`) that signed every node's
    /// certificate; the node certificates are beside it.
    pub ca_file: PathBuf,
}

/// Where one node of a local cluster runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: String,
    /// The address it listens on (its port is chosen at launch).
    pub ip: std::net::IpAddr,
    /// A network namespace to run it in (`/run/netns/NAME`), if any: its
    /// socket is bound there and the daemon starts there.
    pub netns: Option<PathBuf>,
    /// More arguments for `autocollect serve` (e.g. `--log-format json`).
    pub daemon_args: Vec<String>,
    /// A command the daemon is started through, given the daemon's own
    /// command line after these words (e.g. `unshare -U -r` and a shell
    /// that lowers a limit, then `exec "$@"`): each must exec the next,
    /// so that the process started is the daemon. Empty: none.
    pub launcher: Vec<String>,
}

impl NodeSpec {
    /// A node on loopback.
    pub fn loopback(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            netns: None,
            daemon_args: Vec::new(),
            launcher: Vec::new(),
        }
    }
}

impl LocalCluster {
    /// Start one daemon per name under `root` (which must exist), using the
    /// `autocollect` binary `exe`. `customize` may change each node's
    /// config before it is written (plugin, options, limits...).
    pub async fn launch(
        exe: &Path,
        root: &Path,
        names: &[&str],
        customize: impl FnMut(&mut Config),
    ) -> Result<LocalCluster> {
        let specs: Vec<NodeSpec> = names.iter().map(|n| NodeSpec::loopback(n)).collect();
        LocalCluster::launch_on(exe, root, &specs, customize).await
    }

    /// As [`LocalCluster::launch`], each node where its spec says.
    pub async fn launch_on(
        exe: &Path,
        root: &Path,
        specs: &[NodeSpec],
        mut customize: impl FnMut(&mut Config),
    ) -> Result<LocalCluster> {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let admin_password = random_token();
        let reader_password = random_token();
        let secret = random_token();
        let users = vec![
            User {
                name: ADMIN_USER.into(),
                password_hash: crate::auth::hash_password(&admin_password),
                role: Role::Admin,
            },
            User {
                name: READER_USER.into(),
                password_hash: crate::auth::hash_password(&reader_password),
                role: Role::ReadOnly,
            },
        ];

        let listeners: Vec<TcpListener> = specs
            .iter()
            .map(|spec| bind_node(spec.netns.as_deref(), SocketAddr::new(spec.ip, 0)))
            .collect::<std::io::Result<_>>()?;
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<std::io::Result<_>>()?;
        let nodes_map: BTreeMap<String, String> = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();

        // TLS as in production: a private CA and one certificate per node,
        // valid for the node's address.
        let hosts: Vec<NodeHost> = specs
            .iter()
            .map(|spec| NodeHost {
                name: spec.name.clone(),
                host: spec.ip.to_string(),
            })
            .collect();
        let issued = certs::init(&root.join("certs"), &hosts).context("making certificates")?;

        let mut cluster = LocalCluster {
            root: root.to_path_buf(),
            nodes: Vec::new(),
            admin_password,
            reader_password,
            secret: secret.clone(),
            ca_file: issued.ca_file.clone(),
        };
        for ((((name, addr), listener), spec), files) in names
            .iter()
            .zip(&addrs)
            .zip(&listeners)
            .zip(specs)
            .zip(&issued.nodes)
        {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir)?;
            let mut config = Config {
                node: name.to_string(),
                listen: *addr,
                data_dir: dir.join("data"),
                tls: Some(TlsSetting::On(TlsFiles {
                    cert_file: files.cert_file.clone(),
                    key_file: files.key_file.clone(),
                    ca_file: Some(issued.ca_file.clone()),
                    client_ca_file: Some(issued.ca_file.clone()),
                })),
                allow_plaintext: false,
                cluster_secret: Some(secret.clone()),
                cluster_secret_file: None,
                nodes: nodes_map.clone(),
                users: users.clone(),
                collector: Default::default(),
                uploader: crate::config::PluginRole::uploader(),
                upload: Default::default(),
                coordinator: Default::default(),
                // A demo runs wherever it is asked to: keep a small reserve.
                storage: crate::config::StorageSettings {
                    min_free_mb: 64,
                    ..Default::default()
                },
                server: Default::default(),
                plugin_cache_dir: Some(root.join("plugin-cache")),
            };
            customize(&mut config);
            let config_path = dir.join("autocollect.toml");
            std::fs::write(&config_path, toml::to_string(&config)?)?;
            let log_path = dir.join("daemon.log");
            let child = spawn_daemon(
                exe,
                &config_path,
                &log_path,
                listener,
                spec.netns.as_deref(),
                &spec.daemon_args,
                &spec.launcher,
            )
            .with_context(|| format!("starting node {name}"))?;
            cluster.nodes.push(LocalNode {
                name: name.to_string(),
                addr: *addr,
                config_path,
                log_path,
                data_dir: config.data_dir.clone(),
                tls: matches!(config.tls, Some(TlsSetting::On(_))),
                exe: exe.to_path_buf(),
                netns: spec.netns.clone(),
                daemon_args: spec.daemon_args.clone(),
                launcher: spec.launcher.clone(),
                child: Some(child),
                _port: hold_port(spec.netns.as_deref(), *addr)
                    .with_context(|| format!("holding node {name}'s port"))?,
            });
        }
        drop(listeners); // the children hold them now
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// One request to each node: it is answered once the daemon serves.
    async fn wait_ready(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            let client = self.client_of(&self.nodes[i], "", "");
            if let Err(e) = client.health().await {
                let node = &mut self.nodes[i];
                // A daemon that refuses its config closes its socket
                // before it prints why: let it finish (or stop it).
                if let Some(child) = node.child.as_mut() {
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while matches!(child.try_wait(), Ok(None))
                        && std::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    let _ = child.kill();
                }
                bail!(
                    "node {} did not start: {e}\n--- its log ---\n{}",
                    node.name,
                    std::fs::read_to_string(&node.log_path).unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &LocalNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// How a client checks the nodes' certificates: the cluster CA.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca_file: Some(self.ca_file.clone()),
            no_verify: false,
        }
    }

    /// A client of `node` (trusting the cluster CA) as `user`.
    fn client_of(&self, node: &LocalNode, user: &str, password: &str) -> ApiClient {
        ApiClient::with_tls(&node.url(), user, password, &self.client_tls())
            .expect("the cluster CA is readable")
    }

    /// A plain HTTP client trusting the cluster CA; with `as_node`, it
    /// presents that node's certificate, as that node's daemon does when
    /// it calls another node.
    pub fn http_client(&self, as_node: Option<&str>) -> reqwest::Client {
        let ca = std::fs::read(&self.ca_file).expect("the cluster CA is readable");
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("a PEM CA"));
        if let Some(node) = as_node {
            let certs = self.ca_file.parent().expect("the certs directory");
            let mut pem = std::fs::read(certs.join(format!("{node}.pem"))).expect("its cert");
            pem.extend(std::fs::read(certs.join(format!("{node}-key.pem"))).expect("its key"));
            builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("a PEM identity"));
        }
        builder.build().expect("an HTTP client")
    }

    /// A client of `node` logged in as the admin user.
    pub fn admin(&self, node: &str) -> ApiClient {
        self.client_of(self.node(node), ADMIN_USER, &self.admin_password)
    }

    /// A client of `node` logged in as the read-only user.
    pub fn reader(&self, node: &str) -> ApiClient {
        self.client_of(self.node(node), READER_USER, &self.reader_password)
    }

    /// Send `signal` to one daemon: `SIGSTOP` hangs it (its sockets stay
    /// open, nothing answers), `SIGCONT` resumes it.
    pub fn signal(&self, name: &str, signal: i32) {
        if let Some(pid) = self.node(name).pid() {
            // SAFETY: a plain syscall on our own child.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Start `name` again (after a kill), on the same address, config and
    /// data directory, and wait until it serves.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        self.kill(name);
        let tls = self.client_tls();
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        let listener = bind_node(node.netns.as_deref(), node.addr)?;
        let child = spawn_daemon(
            &node.exe,
            &node.config_path,
            &node.log_path,
            &listener,
            node.netns.as_deref(),
            &node.daemon_args,
            &node.launcher,
        )
        .with_context(|| format!("restarting node {name}"))?;
        drop(listener);
        node.child = Some(child);
        let client = ApiClient::with_tls(&node.url(), "", "", &tls)?;
        client
            .health()
            .await
            .map_err(|e| anyhow::anyhow!("node {name} did not restart: {e}"))?;
        Ok(())
    }

    /// Kill one daemon (SIGKILL) and reap it. Its port stays held: it
    /// refuses connections until [`LocalCluster::restart`].
    pub fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Every node's log, for failure reports.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} ({}) ---\n{}",
                    n.name,
                    n.log_path.display(),
                    std::fs::read_to_string(&n.log_path).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A node's listening socket on `addr` (in network namespace `netns` if
/// given), as the daemon binds its own but sharing its port with the
/// node's [`hold_port`] (`SO_REUSEPORT`, which only the two of them set).
/// On port 0 the option is set once bound, so that the kernel chooses
/// the port as for any other socket; on a held port (a restart), before.
fn bind_node(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<TcpListener> {
    in_netns(netns, || {
        if addr.port() != 0 {
            return crate::server::listener::bind_sharing(addr, true);
        }
        let listener = crate::server::listener::bind(addr)?;
        socket2::SockRef::from(&listener).set_reuse_port(true)?;
        Ok(listener)
    })
}

/// A socket bound to `addr` that never listens, so that the port is
/// nobody else's while the node's daemon is down: connections to it are
/// refused, and any other socket's bind fails, but for the node's next
/// listener ([`bind_node`]: with `SO_REUSEPORT`, as this one).
fn hold_port(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    in_netns(netns, || {
        let socket = crate::server::listener::tcp_socket(addr)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    })
}

/// Run `bind` in network namespace `netns` if given (on a thread that
/// joins it, so this process stays where it is).
fn in_netns<T: Send>(
    netns: Option<&Path>,
    bind: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let Some(netns) = netns else {
        return bind();
    };
    let netns = File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on this thread only, with an open namespace fd.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                bind()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("binding thread panicked")))
    })
}

fn spawn_daemon(
    exe: &Path,
    config: &Path,
    log: &Path,
    listener: &TcpListener,
    netns: Option<&Path>,
    args: &[String],
    launcher: &[String],
) -> Result<Child> {
    let netns = netns.map(File::open).transpose()?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // Appended to, so a restarted node's log follows its first life.
    let log_file = File::options().create(true).append(true).open(log)?;
    let fd = listener.as_raw_fd();
    let mut cmd = match launcher.split_first() {
        Some((program, words)) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(exe);
            cmd
        }
        None => Command::new(exe),
    };
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--listen-fd")
        .arg(LISTEN_FD.to_string())
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl, setns)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == LISTEN_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If the parent dies, so does the daemon (Linux only). Note
            // that this follows the spawning *thread*.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(ns) = netns_fd
                && libc::setns(ns, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
