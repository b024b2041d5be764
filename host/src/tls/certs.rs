//! `autocollect certs init`: a private cluster CA and one certificate per
//! node, written as PEM files with the right modes.
//!
//! Run again on the same directory, it keeps the CA (`ca.pem`,
//! `ca-key.pem`) and issues new certificates for the nodes it is given:
//! that is how a node is added or its certificate rotated.
//!
//! Each node certificate is valid for the host of the node's `[nodes]`
//! entry (its identity, see [`super::NodeIdentities`]) and serves both as
//! the node's server certificate and as its client certificate towards
//! other nodes.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// The CA's subject: fixed, so a CA found on disk is used again with its
/// key alone.
const CA_NAME: &str = "autocollect cluster CA";
const CA_DAYS: i64 = 3650;
const NODE_DAYS: i64 = 825;

/// One node to issue a certificate for.
#[derive(Debug, Clone)]
pub struct NodeHost {
    pub name: String,
    /// The host of its `[nodes]` entry: a DNS name or an IP address.
    pub host: String,
}

impl NodeHost {
    /// `NAME=HOST` (a `:PORT` after the host is ignored).
    pub fn parse(s: &str) -> Result<NodeHost> {
        let Some((name, host)) = s.split_once('=') else {
            bail!("{s:?}: expected NAME=HOST");
        };
        let host = match host.parse::<std::net::SocketAddr>() {
            Ok(addr) => addr.ip().to_string(),
            Err(_) => super::host_of(host).to_string(),
        };
        if name.is_empty()
            || name.contains(['/', '\\'])
            || name.starts_with('.')
            || !name.is_ascii()
        {
            bail!("{s:?}: node names for certificate files must be plain ASCII names");
        }
        if host.is_empty() || rustls::pki_types::ServerName::try_from(host.as_str()).is_err() {
            bail!("{s:?}: {host:?} is neither a DNS name nor an IP address");
        }
        Ok(NodeHost {
            name: name.to_string(),
            host,
        })
    }
}

/// The files made for one node.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    pub name: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    pub ca_file: PathBuf,
    /// Whether the CA was made now (false: an existing one was used).
    pub new_ca: bool,
    pub nodes: Vec<NodeFiles>,
}

impl Issued {
    /// The `[tls]` lines of each node's config.
    pub fn config_lines(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "# {name}'s config\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nca_file = {ca:?}\nclient_ca_file = {ca:?}\n\n",
                name = node.name,
                cert = node.cert_file.display().to_string(),
                key = node.key_file.display().to_string(),
                ca = self.ca_file.display().to_string(),
            ));
        }
        out
    }
}

/// Make (or reuse) the CA in `dir` and issue a certificate for each node.
pub fn init(dir: &Path, nodes: &[NodeHost]) -> Result<Issued> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let ca_file = dir.join(CA_CERT);
    let ca_key_file = dir.join(CA_KEY);
    let (issuer, new_ca) = match (ca_file.exists(), ca_key_file.exists()) {
        (true, true) => {
            let pem = std::fs::read_to_string(&ca_key_file)
                .with_context(|| format!("reading {}", ca_key_file.display()))?;
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM private key", ca_key_file.display()))?;
            (Issuer::new(ca_params()?, key), false)
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let params = ca_params()?;
            let cert = params.self_signed(&key)?;
            write_file(&ca_key_file, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&ca_file, cert.pem().as_bytes(), 0o644)?;
            (Issuer::new(params, key), true)
        }
        _ => bail!(
            "{} has one of {CA_CERT} and {CA_KEY} but not the other: restore it or use a new directory",
            dir.display()
        ),
    };
    let mut issued = Issued {
        ca_file,
        new_ca,
        nodes: Vec::new(),
    };
    for node in nodes {
        let key = KeyPair::generate()?;
        let cert = node_params(node)?.signed_by(&key, &issuer)?;
        let files = NodeFiles {
            name: node.name.clone(),
            cert_file: dir.join(format!("{}.pem", node.name)),
            key_file: dir.join(format!("{}-key.pem", node.name)),
        };
        write_file(&files.key_file, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&files.cert_file, cert.pem().as_bytes(), 0o644)?;
        issued.nodes.push(files);
    }
    Ok(issued)
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    name.push(DnType::OrganizationName, "autocollect");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time_now();
    params.not_before = now - rcgen_days(1);
    params.not_after = now + rcgen_days(CA_DAYS);
    Ok(params)
}

fn node_params(node: &NodeHost) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![node.host.clone()])?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, node.name.as_str());
    name.push(DnType::OrganizationName, "autocollect");
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let mut serial = rand::random::<[u8; 16]>();
    serial[0] &= 0x7f; // a positive number
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = time_now();
    params.not_before = now - rcgen_days(1);
    params.not_after = now + rcgen_days(NODE_DAYS);
    Ok(params)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

/// Write `bytes` to `path` with `mode`, replacing it atomically (a daemon
/// reloading on SIGHUP never reads half a file).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    // The umask may have narrowed the mode; never widened it.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{cert_is_valid_for, read_certs, read_roots};

    #[test]
    fn a_cluster_ca_issues_node_certificates_valid_for_their_hosts_only() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [
            NodeHost::parse("n1=127.0.0.1:9101").unwrap(),
            NodeHost::parse("n2=db2.example.com").unwrap(),
        ];
        let issued = init(dir.path(), &nodes).unwrap();
        assert!(issued.new_ca);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert_eq!(mode(&issued.nodes[0].key_file), 0o600);
        assert_eq!(mode(&issued.nodes[0].cert_file), 0o644);
        let n1 = &read_certs(&issued.nodes[0].cert_file).unwrap()[0];
        let n2 = &read_certs(&issued.nodes[1].cert_file).unwrap()[0];
        assert!(cert_is_valid_for(n1, "127.0.0.1"));
        assert!(!cert_is_valid_for(n1, "127.0.0.2"));
        assert!(cert_is_valid_for(n2, "db2.example.com"));
        assert!(!cert_is_valid_for(n2, "127.0.0.1"));

        // Run again: the same CA signs a new certificate for n1.
        let again = init(dir.path(), &nodes[..1]).unwrap();
        assert!(!again.new_ca);
        let n1_new = &read_certs(&again.nodes[0].cert_file).unwrap()[0];
        assert_ne!(n1, n1_new);
        let roots = read_roots(&issued.ca_file).unwrap();
        for cert in [n1_new, n2] {
            let ee = webpki::EndEntityCert::try_from(cert).unwrap();
            ee.verify_for_usage(
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .all,
                &roots.roots,
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .expect("chains to the cluster CA, usable as a client certificate");
        }
        assert!(issued.config_lines().contains("client_ca_file"));
    }

    #[test]
    fn bad_node_arguments_are_refused() {
        for bad in ["n1", "=127.0.0.1", "../x=127.0.0.1", "n1=", "n1=bad host"] {
            assert!(NodeHost::parse(bad).is_err(), "{bad}");
        }
    }
}
