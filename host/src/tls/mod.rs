//! TLS for the daemon's listener (public and node-to-node API) and for its
//! requests to other nodes, with rustls.
//!
//! - [`TlsSetting`] is the config's `tls`: `"off"` (plain HTTP, loopback
//!   only unless `allow_plaintext`) or a `[tls]` table of PEM files.
//! - [`TlsContext`] holds what those files make: the listener's server
//!   config and the client config for requests to other nodes. It is
//!   built at start and rebuilt on SIGHUP ([`TlsContext::reload`]); a
//!   connection keeps the config it was opened with, so a reload drops
//!   nothing that runs.
//! - A node's identity is its certificate: with `client_ca_file` set,
//!   every node-to-node request must come with a client certificate
//!   signed by that CA and valid for the host of the signing node's
//!   `[nodes]` entry ([`NodeIdentities`]).
//! - [`certs`] makes a private cluster CA and one certificate per node.

pub mod certs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// The config's `tls`: `tls = "off"`, or a `[tls]` table.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSetting {
    /// Plain HTTP.
    Off,
    On(TlsFiles),
}

/// `[tls]`: this node's certificate and key, and whom it trusts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM, leaf first): served on the API
    /// and presented to other nodes. Its SANs must include the host of
    /// this node's `[nodes]` entry.
    pub cert_file: PathBuf,
    /// Its private key (PEM). Keep it readable by the daemon only.
    pub key_file: PathBuf,
    /// CA certificates (PEM) that other nodes' certificates are checked
    /// against. Absent: the public web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS between nodes: CA certificates (PEM) that node-to-node
    /// requests' client certificates must chain to. Clients of the public
    /// API need no certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Relative paths resolved against `base` (the config file's
    /// directory).
    pub fn resolved(&self, base: &Path) -> TlsFiles {
        let join = |p: &PathBuf| base.join(p);
        TlsFiles {
            cert_file: join(&self.cert_file),
            key_file: join(&self.key_file),
            ca_file: self.ca_file.as_ref().map(join),
            client_ca_file: self.client_ca_file.as_ref().map(join),
        }
    }
}

impl Serialize for TlsSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TlsSetting::Off => s.serialize_str("off"),
            TlsSetting::On(files) => files.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TlsSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TlsSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""off" or a [tls] table with cert_file and key_file"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TlsSetting, E> {
                match v {
                    "off" => Ok(TlsSetting::Off),
                    other => Err(E::custom(format!(
                        r#"tls = {other:?}: the only word allowed is "off"; to serve TLS, give a [tls] table with cert_file and key_file"#
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TlsSetting, A::Error> {
                TlsFiles::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TlsSetting::On)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The crypto provider of every TLS config this crate builds (never the
/// process default, which depends on which crates are linked).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider of the client config for requests to other nodes: the
/// same suites, with TLS 1.3's AES-128-GCM-SHA256 first. A node's server
/// follows its client's order, so this is the suite between nodes, and
/// only between nodes (browsers, curl and upload servers keep theirs).
/// Against the default first suite (AES-256-GCM-SHA384) it gives up no
/// strength that counts: the keys are agreed by X25519 and nodes sign with
/// P-256, both 128-bit secure. What it saves is time: TLS 1.3 derives a
/// session's keys by a chain of HMACs, and current x86 and ARM server
/// CPUs compute SHA-256 in hardware (ring uses it) and SHA-384 in
/// software; SHA-384 took 2.4 % of the CPU of a 128-node collection
/// (BENCHMARKS.md).
fn peer_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let first = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.suite();
    provider.cipher_suites.sort_by_key(|s| s.suite() != first);
    Arc::new(provider)
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The private key in a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a PEM private key from {}", path.display()))
}

/// A root store of every certificate in a PEM file.
pub fn read_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    add_roots(&mut roots, path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(roots)
}

/// Add every certificate of a PEM file to `roots`; the error says which
/// one is wrong and how.
pub fn add_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        found += 1;
        let cert = cert.map_err(|e| format!("certificate {found} is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certificate {found} is not a usable CA certificate: {e}"))?;
    }
    if found == 0 {
        return Err(
            "holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")".into(),
        );
    }
    Ok(())
}

/// The public web roots.
pub fn public_roots() -> RootCertStore {
    RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// The ALPN protocol a node asks for when it connects to another node:
/// HTTP/2, under a name of our own, so that only nodes negotiate it (a
/// public client offering `h2` still gets HTTP/1.1). One connection then
/// carries a node's short requests to another (forwarded status, cancel
/// and events, settings); [`crate::server::listener`] serves only
/// node-to-node routes on it. Sessions go over `http/1.1`, upgraded.
pub const PEER_ALPN: &[u8] = b"autocollect-peer/h2";

/// How many nodes a node's client keeps a TLS session ticket for.
const REMEMBERED_NODES: usize = 16_384;
/// rustls's client cache counts 8 ticket slots per server.
const TICKETS_PER_NODE_SLOTS: usize = 8;

/// What the `[tls]` files make, at one moment.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    generation: u64,
}

/// This node's TLS configuration, reloadable.
pub struct TlsContext {
    files: TlsFiles,
    loaded: RwLock<Loaded>,
}

impl TlsContext {
    /// Load and check the files (an error names the file and what is
    /// wrong with it).
    pub fn load(files: &TlsFiles) -> Result<Arc<TlsContext>> {
        let (server, client) = build(files)?;
        Ok(Arc::new(TlsContext {
            files: files.clone(),
            loaded: RwLock::new(Loaded {
                server,
                client,
                generation: 0,
            }),
        }))
    }

    /// Read the files again. On an error the previous configuration
    /// stays in use. New connections use the new one; open connections
    /// (running sessions) keep theirs.
    pub fn reload(&self) -> Result<()> {
        let (server, client) = build(&self.files)?;
        let mut loaded = self.loaded.write().unwrap();
        let generation = loaded.generation + 1;
        *loaded = Loaded {
            server,
            client,
            generation,
        };
        Ok(())
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.loaded.read().unwrap().server.clone()
    }

    /// The client config for requests to other nodes, and its generation
    /// (which changes on every reload).
    pub fn client_config(&self) -> (Arc<ClientConfig>, u64) {
        let loaded = self.loaded.read().unwrap();
        (loaded.client.clone(), loaded.generation)
    }

    /// Whether node-to-node requests must present a client certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let chain = read_certs(&files.cert_file)?;
    let key = read_key(&files.key_file)?;
    let provider = provider();

    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let server = match &files.client_ca_file {
        Some(path) => {
            let roots = Arc::new(read_roots(path)?);
            // Public API clients (browsers, couchbase-cli) present no
            // certificate; node-to-node requests are checked per request.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .with_context(|| format!("client_ca_file {}", path.display()))?;
            server.with_client_cert_verifier(verifier)
        }
        None => server.with_no_client_auth(),
    };
    let mut server = server
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            anyhow!(
                "cert_file {} and key_file {} do not make a usable pair: {e}",
                files.cert_file.display(),
                files.key_file.display()
            )
        })?;
    // Other nodes negotiate HTTP/2 under a name of ours; every other
    // client (browsers, curl, couchbase-cli) gets HTTP/1.1.
    server.alpn_protocols = vec![PEER_ALPN.to_vec(), b"http/1.1".to_vec()];
    // Resumption, for a coordinator's sessions: a new connection to
    // each node per task. Tickets the clients keep, sealed with keys made
    // here (in memory only, rotated every 6 hours, new with each reload,
    // so a reload's new CA or certificate is never bypassed), rather than
    // a server-side cache that other clients' connections empty. One
    // ticket per connection: a coordinator uses one per connection, so it
    // keeps one per node.
    server.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| anyhow!("making TLS session ticket keys: {e}"))?;
    server.send_tls13_tickets = 1;

    let roots = match &files.ca_file {
        Some(path) => read_roots(path)?,
        None => public_roots(),
    };
    let mut client = ClientConfig::builder_with_provider(peer_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| anyhow!("cert_file {}: {e}", files.cert_file.display()))?;
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    // A ticket for every node of a large cluster (rustls's default
    // remembers 32 servers, first in first out: at 128 nodes every
    // session's connection made a full handshake). About a kilobyte per
    // node remembered.
    client.resumption =
        rustls::client::Resumption::in_memory_sessions(REMEMBERED_NODES * TICKETS_PER_NODE_SLOTS);
    Ok((Arc::new(server), Arc::new(client)))
}

/// The certificate a client presented on a TLS connection (set on every
/// request of the connection by the listener).
#[derive(Debug, Clone)]
pub struct ClientCertificate(pub Option<Arc<CertificateDer<'static>>>);

/// Which host each node's certificate must be valid for: the host part of
/// its `[nodes]` entry.
pub struct NodeIdentities {
    hosts: BTreeMap<String, String>,
}

impl NodeIdentities {
    pub fn new(nodes: &BTreeMap<String, String>) -> NodeIdentities {
        NodeIdentities {
            hosts: nodes
                .iter()
                .map(|(name, addr)| (name.clone(), host_of(addr).to_string()))
                .collect(),
        }
    }

    /// Check that `cert` (already verified against `client_ca_file` by the
    /// handshake) is `node`'s: valid for the host of its `[nodes]` entry.
    pub fn check(&self, node: &str, cert: Option<&CertificateDer<'_>>) -> Result<(), String> {
        let host = self
            .hosts
            .get(node)
            .ok_or_else(|| format!("{node} is not a node of this cluster"))?;
        let cert = cert.ok_or_else(|| {
            "node-to-node requests must present the node's TLS client certificate \
             (this node has [tls] client_ca_file)"
                .to_string()
        })?;
        if cert_is_valid_for(cert, host) {
            Ok(())
        } else {
            Err(format!(
                "the client certificate is not {node}'s: it is not valid for {host}, \
                 the host of {node}'s [nodes] entry"
            ))
        }
    }
}

/// Whether `cert`'s subject alternative names cover `host` (a DNS name or
/// an IP address).
pub fn cert_is_valid_for(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// `HOST` of `HOST:PORT` (`[V6]:PORT` gives `V6`).
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Handshake `client` with `server` in memory; the suite they agree.
    fn agreed_suite(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> rustls::CipherSuite {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut client = rustls::ClientConnection::new(client, name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return client.negotiated_cipher_suite().unwrap().suite();
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn nodes_agree_on_aes_128_and_other_clients_keep_their_choice() {
        let dir = tempfile::tempdir().unwrap();
        let node = certs::NodeHost::parse("n1=127.0.0.1").unwrap();
        let issued = certs::init(dir.path(), &[node]).unwrap();
        let files = TlsFiles {
            cert_file: issued.nodes[0].cert_file.clone(),
            key_file: issued.nodes[0].key_file.clone(),
            ca_file: Some(issued.ca_file.clone()),
            client_ca_file: Some(issued.ca_file.clone()),
        };
        let tls = TlsContext::load(&files).unwrap();
        let server = tls.server_config();
        assert_eq!(
            agreed_suite(tls.client_config().0, server.clone()),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A client that asks for AES-256 first (as curl and OpenSSL do)
        // gets it.
        let other = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(read_roots(&issued.ca_file).unwrap())
            .with_no_client_auth();
        assert_eq!(
            agreed_suite(Arc::new(other), server),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:9101"), "10.0.0.1");
        assert_eq!(host_of("db1.example.com:9101"), "db1.example.com");
        assert_eq!(host_of("[::1]:9101"), "::1");
        assert_eq!(host_of("nohost"), "nohost");
    }

    #[test]
    fn the_setting_is_off_or_a_table() {
        #[derive(Deserialize)]
        struct C {
            tls: TlsSetting,
        }
        let c: C = toml::from_str(r#"tls = "off""#).unwrap();
        assert_eq!(c.tls, TlsSetting::Off);
        let c: C = toml::from_str("[tls]\ncert_file = \"a.pem\"\nkey_file = \"k.pem\"\n").unwrap();
        assert!(matches!(c.tls, TlsSetting::On(f) if f.cert_file == Path::new("a.pem")));
        let e = toml::from_str::<C>(r#"tls = "on""#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(r#"the only word allowed is "off""#), "{e}");
        let e = toml::from_str::<C>("[tls]\ncert_file = \"a\"\nkey_file = \"k\"\nbogus = 1\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }
}
