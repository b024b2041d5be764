//! Where collected data may be sent: the upload destination of a task
//! (Couchbase's rules for upload host, customer and ticket), the
//! operator's policy, and the reachability preflight.
//!
//! The URL of an artifact is `https://HOST/quote_plus(CUSTOMER)/` +
//! `quote_plus(TICKET)/` (if a ticket is given) + `quote_plus(FILE)`. The
//! plugin that uploads it may only talk to that URL's origin: see
//! [`Origin`] and `plugin::sandbox`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long the preflight waits for the upload host.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long resolving an upload host may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy as a start request may give it (ns_server takes `host:port`;
/// a URL is fine too), as a URL.
pub fn proxy_url(given: &str) -> String {
    let given = given.trim();
    if given.contains("://") {
        given.to_string()
    } else {
        format!("http://{given}")
    }
}

/// The operator's limits on upload destinations (`[upload]` in the config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadPolicy {
    /// Hosts uploads may go to (`host` or `host:port`). Empty: any host.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Allow plain `http://` upload hosts (tests on loopback; never for
    /// real customer data).
    #[serde(default)]
    pub allow_http: bool,
    /// An HTTP proxy every upload (and its preflight) goes through:
    /// `http://[user:password@]host:port`. Uploads tunnel with `CONNECT`,
    /// so the proxy must allow it to the upload host's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Proxies a start request's `uploadProxy` may name (`host:port` or
    /// `http://host:port`); `proxy` is always allowed. Empty: a request
    /// may name no other proxy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_proxies: Vec<String>,
    /// Let uploads (and their preflight) go to link-local and cloud
    /// metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
    /// 100.100.100.200, 168.63.129.16). Off: an upload host that resolves
    /// to one is refused.
    #[serde(default)]
    pub allow_link_local: bool,
    /// A PEM file of CA certificates trusted for uploads (the upload host,
    /// directly or inside a proxy's tunnel, and the preflight), added to
    /// the public roots. Relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Trust `ca_file` alone, not the public roots.
    #[serde(default)]
    pub ca_only: bool,
}

/// Addresses of cloud instance metadata and host services outside the
/// link-local ranges.
const METADATA_ADDRESSES: &[&str] = &["fd00:ec2::254", "100.100.100.200", "168.63.129.16"];

impl UploadPolicy {
    /// The configured proxy, parsed (checked when the config is loaded).
    pub fn proxy(&self) -> Result<Option<Proxy>, String> {
        self.proxy.as_deref().map(Proxy::parse).transpose()
    }

    /// Config-time checks; the message starts with the key. The CA file
    /// is read by [`UploadPolicy::tls_config`].
    pub fn check(&self) -> Result<(), String> {
        if self.ca_only && self.ca_file.is_none() {
            return Err(
                "ca_only = true needs ca_file: with ca_only, only ca_file's certificates are trusted"
                    .into(),
            );
        }
        self.proxy().map_err(|e| format!("proxy {e}"))?;
        for p in &self.allowed_proxies {
            Proxy::parse(&proxy_url(p)).map_err(|e| format!("allowed_proxies: {p:?} {e}"))?;
        }
        Ok(())
    }

    /// The TLS client configuration of every upload connection (to the
    /// upload host, directly or inside the proxy's tunnel) and of the
    /// preflight: the public roots built into the binary and the
    /// certificates of `ca_file`, or `ca_file`'s alone with `ca_only`.
    /// Reads `ca_file`: the daemon calls it once at start (and again to
    /// reload). The message starts with the key.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.check()?;
        let mut roots = match self.ca_only {
            true => rustls::RootCertStore::empty(),
            false => crate::tls::public_roots(),
        };
        if let Some(file) = &self.ca_file {
            crate::tls::add_roots(&mut roots, file)
                .map_err(|e| format!("ca_file {}: {e}", file.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The uploads' TLS configuration, reloadable ([`UploadTls`]).
    pub fn upload_tls(&self) -> Result<Arc<UploadTls>, String> {
        Ok(Arc::new(UploadTls {
            policy: self.clone(),
            current: std::sync::RwLock::new(self.tls_config()?),
        }))
    }

    /// May a start request route its uploads through `proxy`? Compared by
    /// host and port (credentials may differ).
    pub fn check_proxy(&self, proxy: &Proxy) -> Result<(), String> {
        let configured = self.proxy().ok().flatten();
        let allowed = configured.iter().any(|p| p.authority == proxy.authority)
            || self
                .allowed_proxies
                .iter()
                .any(|p| Proxy::parse(&proxy_url(p)).is_ok_and(|p| p.authority == proxy.authority));
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "proxy {} is not allowed by this cluster's configuration (allowed_proxies)",
                proxy.authority
            ))
        }
    }

    /// May an upload connect to `ip`?
    pub fn check_address(&self, ip: IpAddr) -> Result<(), String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let why = match ip {
            _ if ip.is_unspecified() => Some("the unspecified address"),
            _ if ip.is_multicast() => Some("a multicast address"),
            IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
            IpAddr::V4(v4) if v4.is_link_local() && !self.allow_link_local => {
                Some("a link-local or cloud metadata address (allow_link_local)")
            }
            IpAddr::V6(v6) if v6.is_unicast_link_local() && !self.allow_link_local => {
                Some("a link-local address (allow_link_local)")
            }
            _ if !self.allow_link_local
                && METADATA_ADDRESSES.iter().any(|m| m.parse() == Ok(ip)) =>
            {
                Some("a cloud metadata address (allow_link_local)")
            }
            _ => None,
        };
        match why {
            Some(why) => Err(format!("{ip} is {why}")),
            None => Ok(()),
        }
    }

    /// Resolve `origin`'s host once and check every address it gives:
    /// connections then go to these addresses only, so a name that
    /// resolves differently later (DNS rebinding) changes nothing. Any
    /// refused address refuses the host.
    pub async fn resolve(&self, origin: &Origin) -> Result<Vec<SocketAddr>, String> {
        let host = origin.host.trim_matches(['[', ']']);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, origin.port)],
            Err(_) => tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((host, origin.port)),
            )
            .await
            .map_err(|_| format!("resolving {host} took more than {RESOLVE_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        for addr in &addrs {
            self.check_address(addr.ip())
                .map_err(|e| format!("upload host {host} is refused: {e}"))?;
        }
        Ok(addrs)
    }

    /// The proxy an upload goes through: the one its request asked for,
    /// else the configured one (valid: the config was checked at load).
    pub fn proxy_for(&self, requested: Option<&Proxy>) -> Option<Proxy> {
        requested.cloned().or_else(|| self.proxy().ok().flatten())
    }
}

/// An HTTP proxy for uploads.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `http://host:port`, without credentials.
    pub url: String,
    /// `host:port`, to connect to.
    pub authority: String,
    /// `Proxy-Authorization` value, when the URL has credentials.
    pub authorization: Option<String>,
    /// The URL as given, credentials included: to hand it to other nodes.
    pub given: String,
}

impl std::fmt::Debug for Proxy {
    /// Never prints the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({})", self.url)
    }
}

impl Proxy {
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or("must be an http:// URL (http://[user:password@]host:port)")?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err("must be http://[user:password@]host:port, without a path".into());
        }
        let (credentials, host_port) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let authority: http::uri::Authority = host_port
            .parse()
            .map_err(|e| format!("bad proxy address {host_port:?}: {e}"))?;
        if authority.host().is_empty() {
            return Err("has no host".into());
        }
        let authority = format!(
            "{}:{}",
            authority.host().to_ascii_lowercase(),
            authority.port_u16().unwrap_or(80)
        );
        let authorization = credentials.map(|c| {
            use base64::Engine;
            let plain = percent_decode(c);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(plain)
            )
        });
        Ok(Proxy {
            url: format!("http://{authority}"),
            authority,
            authorization,
            given: url.to_string(),
        })
    }
}

/// A task's upload destination, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// `https://HOST/CUSTOMER/[TICKET/]`, ending with a slash.
    pub base_url: String,
}

impl Destination {
    /// Validate upload host, customer and ticket as ns_server does; every
    /// problem is reported, keyed by field. `None` everywhere: no upload.
    pub fn from_request(
        upload_host: Option<&str>,
        customer: Option<&str>,
        ticket: Option<&str>,
    ) -> Result<Option<Destination>, BTreeMap<String, String>> {
        let mut errors = BTreeMap::new();
        let ticket = ticket.map(str::trim).unwrap_or("");
        let (host, customer) = match (upload_host, customer) {
            (None, None) if ticket.is_empty() => return Ok(None),
            (None, None) => {
                errors.insert("customer".into(), MISSING_CUSTOMER.into());
                errors.insert("uploadHost".into(), MISSING_UPLOAD.into());
                return Err(errors);
            }
            (None, Some(_)) => {
                errors.insert("uploadHost".into(), MISSING_UPLOAD.into());
                return Err(errors);
            }
            (Some(_), None) => {
                errors.insert("customer".into(), MISSING_CUSTOMER.into());
                return Err(errors);
            }
            (Some(h), Some(c)) => (h.trim(), c.trim()),
        };
        let valid_customer = customer.len() <= 50
            && customer
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._ -".contains(c));
        if !valid_customer {
            errors.insert(
                "customer".into(),
                "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters".into(),
            );
        }
        if ticket.len() > 7 || !ticket.chars().all(|c| c.is_ascii_digit()) {
            errors.insert(
                "ticket".into(),
                "must contain only [0-9] and be no longer than 7 characters".into(),
            );
        }
        if customer.is_empty() {
            errors.insert("customer".into(), "cannot be empty".into());
        }
        if host.is_empty() {
            errors.insert("uploadHost".into(), "cannot be empty".into());
        }
        let without_scheme = host.split_once("://").map_or(host, |(_, rest)| rest);
        let authority = without_scheme.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            errors.insert(
                "uploadHost".into(),
                "must not contain credentials (user:password@): they would show in status and logs"
                    .into(),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let scheme = if host.starts_with("http://") || host.starts_with("https://") {
            ""
        } else {
            "https://"
        };
        let slash = if host.ends_with('/') { "" } else { "/" };
        let mut base_url = format!("{scheme}{host}{slash}{}/", quote_plus(customer));
        if !ticket.is_empty() {
            base_url.push_str(&quote_plus(ticket));
            base_url.push('/');
        }
        Ok(Some(Destination { base_url }))
    }

    /// The URL of `file` at this destination.
    pub fn url_for(&self, file: &str) -> String {
        format!("{}{}", self.base_url, quote_plus(file))
    }

    /// Check the destination against `policy`; the message is keyed
    /// `uploadHost`.
    pub fn check(&self, policy: &UploadPolicy) -> Result<Origin, String> {
        let origin =
            Origin::of(&self.base_url).map_err(|e| format!("is not a valid URL host ({e})"))?;
        if origin.scheme == "http" && !policy.allow_http {
            return Err(
                "http:// upload hosts are refused by this cluster's configuration (allow_http)"
                    .into(),
            );
        }
        if !policy.allowed_hosts.is_empty()
            && !policy.allowed_hosts.iter().any(|h| origin.matches_host(h))
        {
            return Err(format!(
                "upload host {} is not allowed by this cluster's configuration (allowed_hosts)",
                origin.authority()
            ));
        }
        Ok(origin)
    }
}

const MISSING_CUSTOMER: &str = "customer must be given if upload host or ticket is given";
const MISSING_UPLOAD: &str = "upload host must be given if customer or ticket is given";

/// Scheme, host and port of a URL: what an upload plugin may talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

impl Origin {
    pub fn of(url: &str) -> Result<Origin, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        Origin::of_uri(&uri)
    }

    pub fn of_uri(uri: &http::Uri) -> Result<Origin, String> {
        let scheme = uri.scheme_str().ok_or("no scheme")?.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            other => return Err(format!("unsupported scheme {other:?}")),
        };
        let authority = uri.authority().ok_or("no host")?;
        Ok(Origin {
            scheme,
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(default_port),
        })
    }

    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Does an `allowed_hosts` entry (`host` or `host:port`) cover us?
    fn matches_host(&self, entry: &str) -> bool {
        let entry = entry.trim().to_ascii_lowercase();
        match entry.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                host == self.host && port.parse() == Ok(self.port)
            }
            _ => entry == self.host,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// `%XX` escapes to bytes (for credentials in a URL); anything malformed
/// is kept as it is.
pub(crate) fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Python's / mochiweb's `quote_plus`: unreserved bytes as they are, space
/// as `+`, everything else `%XX`.
pub fn quote_plus(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Words for the operator when `error` (or an error it wraps) is the
/// refusal of the upload host's certificate; `None` for any other error.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::CertificateError as C;
    let mut next = Some(error);
    let mut found = None;
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            found = Some(tls);
            break;
        }
        // An io::Error shows its inner error's source, not the inner
        // error itself (which may be another io::Error): look inside.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    let rustls::Error::InvalidCertificate(problem) = found? else {
        return None;
    };
    let (detail, hint) = match problem {
        C::UnknownIssuer => (
            "it is not signed by a certificate authority this node trusts".to_string(),
            true,
        ),
        C::BadSignature => (
            "its signature does not match the certificate authority it names".to_string(),
            true,
        ),
        other => (other.to_string(), false),
    };
    let hint = if hint { " (set [upload] ca_file?)" } else { "" };
    Some(format!(
        "the upload host's certificate is not trusted: {detail}{hint}"
    ))
}

/// Can the upload host be reached? A `HEAD` of the base URL; any HTTP
/// answer counts (the real PUT decides), only transport failures do not.
/// Redirects are never followed (an allowed host could point anywhere).
/// Without a proxy, the request goes to the addresses `policy` checked.
/// TLS trusts what the uploads trust (`tls`, from
/// [`UploadPolicy::tls_config`]). The error is ns_server's message.
pub async fn preflight(
    destination: &Destination,
    policy: &UploadPolicy,
    tls: &Arc<rustls::ClientConfig>,
    proxy: Option<&Proxy>,
) -> Result<(), String> {
    let url = &destination.base_url;
    // The uploads' route exactly: the configured proxy or none, never the
    // environment's; the uploads' trust, never the system's.
    let builder = reqwest::Client::builder()
        .timeout(PREFLIGHT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls(rustls::ClientConfig::clone(tls));
    let builder = match proxy {
        None => {
            let origin = Origin::of(url).map_err(|e| format!("Unable to access '{url}' : {e}"))?;
            let addrs = policy
                .resolve(&origin)
                .await
                .map_err(|e| format!("Unable to access '{url}' : {e}"))?;
            builder
                .no_proxy()
                .resolve_to_addrs(origin.host.trim_matches(['[', ']']), &addrs)
        }
        Some(p) => {
            let mut rp = reqwest::Proxy::all(&p.url).map_err(|e| e.to_string())?;
            if let Some(auth) = &p.authorization {
                rp = rp.custom_http_auth(auth.parse().map_err(|_| "bad proxy credentials")?);
            }
            builder.proxy(rp)
        }
    };
    let client = builder.build().map_err(|e| e.to_string())?;
    match client.head(url).send().await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "Unable to access '{url}' : {}",
            certificate_problem(&e).unwrap_or_else(|| crate::client::error_chain(&e))
        )),
    }
}

/// The TLS client configuration of uploads and the preflight, read
/// again from `[upload] ca_file` on SIGHUP. An upload in flight keeps the
/// configuration it started with.
pub struct UploadTls {
    policy: UploadPolicy,
    current: std::sync::RwLock<Arc<rustls::ClientConfig>>,
}

impl UploadTls {
    pub fn current(&self) -> Arc<rustls::ClientConfig> {
        self.current.read().unwrap().clone()
    }

    /// Read `ca_file` again; on an error the previous configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = self.policy.tls_config()?;
        *self.current.write().unwrap() = fresh;
        Ok(())
    }

    pub fn ca_file(&self) -> Option<&Path> {
        self.policy.ca_file.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, customer: &str, ticket: Option<&str>) -> Destination {
        Destination::from_request(Some(host), Some(customer), ticket)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn proxies_are_http_urls_with_optional_credentials() {
        let p = Proxy::parse("http://proxy.corp:3128").unwrap();
        assert_eq!(p.authority, "proxy.corp:3128");
        assert_eq!(p.authorization, None);
        let p = Proxy::parse("http://u:p%40ss@Proxy.corp/").unwrap();
        assert_eq!(p.authority, "proxy.corp:80");
        assert_eq!(p.url, "http://proxy.corp:80");
        assert_eq!(p.authorization.as_deref(), Some("Basic dTpwQHNz"));
        assert!(
            !format!("{p:?}").contains("u:p"),
            "credentials never printed"
        );
        for bad in [
            "proxy:3128",
            "https://proxy:3128",
            "http://proxy:3128/path",
            "http://",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_built_as_couchbase_builds_them() {
        let d = dest("uploads.example.com", "Example inc.", Some("12345"));
        assert_eq!(
            d.base_url,
            "https://uploads.example.com/Example+inc./12345/"
        );
        assert_eq!(
            d.url_for("collectinfo-2026-n1.zip"),
            "https://uploads.example.com/Example+inc./12345/collectinfo-2026-n1.zip"
        );
        assert_eq!(
            dest("http://h:8080/", "a", None).base_url,
            "http://h:8080/a/"
        );
        assert_eq!(dest(" h ", " a ", Some(" ")).base_url, "https://h/a/");
    }

    #[test]
    fn every_rule_has_its_message() {
        let err = |h: Option<&str>, c: Option<&str>, t: Option<&str>| {
            Destination::from_request(h, c, t).unwrap_err()
        };
        assert_eq!(Destination::from_request(None, None, None), Ok(None));
        assert_eq!(Destination::from_request(None, None, Some("")), Ok(None));
        assert_eq!(
            err(Some("h"), Some("bad/name"), None)["customer"],
            "must contain only [A-Za-z0-9._ -] and be no longer than 50 characters"
        );
        assert!(err(Some("h"), Some(&"x".repeat(51)), None).contains_key("customer"));
        assert_eq!(
            err(Some("h"), Some("a"), Some("12345678"))["ticket"],
            "must contain only [0-9] and be no longer than 7 characters"
        );
        assert!(err(Some("h"), Some("a"), Some("12a")).contains_key("ticket"));
        assert_eq!(err(Some("h"), None, None)["customer"], MISSING_CUSTOMER);
        assert_eq!(err(None, Some("a"), None)["uploadHost"], MISSING_UPLOAD);
        let both = err(None, None, Some("1"));
        assert_eq!(
            (both["customer"].as_str(), both["uploadHost"].as_str()),
            (MISSING_CUSTOMER, MISSING_UPLOAD)
        );
        assert_eq!(
            err(Some(" "), Some("a"), None)["uploadHost"],
            "cannot be empty"
        );
        assert_eq!(
            err(Some("h"), Some(""), None)["customer"],
            "cannot be empty"
        );
    }

    #[test]
    fn the_policy_limits_scheme_and_hosts() {
        let open = UploadPolicy::default();
        let https = dest("uploads.example.com", "a", None);
        assert_eq!(
            https.check(&open).unwrap().to_string(),
            "https://uploads.example.com:443"
        );
        assert!(dest("http://127.0.0.1:9", "a", None).check(&open).is_err());
        let strict = UploadPolicy {
            allowed_hosts: vec!["uploads.example.com".into(), "127.0.0.1:9".into()],
            allow_http: true,
            ..Default::default()
        };
        assert!(https.check(&strict).is_ok());
        assert!(dest("http://127.0.0.1:9", "a", None).check(&strict).is_ok());
        assert!(
            dest("http://127.0.0.1:10", "a", None)
                .check(&strict)
                .is_err()
        );
        assert!(dest("evil.example.com", "a", None).check(&strict).is_err());
    }

    #[test]
    fn credentials_in_the_upload_host_are_refused() {
        for host in ["https://u:p@h", "u:p@h", "http://u@h:80/x"] {
            let e = Destination::from_request(Some(host), Some("a"), None).unwrap_err();
            assert!(e["uploadHost"].contains("credentials"), "{host}: {e:?}");
        }
        assert!(Destination::from_request(Some("h/p@x"), Some("a"), None).is_ok());
    }

    #[test]
    fn link_local_and_metadata_addresses_are_refused_unless_allowed() {
        let policy = UploadPolicy::default();
        for refused in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "168.63.129.16",
            "0.0.0.0",
            "224.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            let ip: IpAddr = refused.parse().unwrap();
            assert!(policy.check_address(ip).is_err(), "{refused}");
        }
        for allowed in ["127.0.0.1", "10.1.2.3", "2001:db8::1", "93.184.216.34"] {
            assert!(
                policy.check_address(allowed.parse().unwrap()).is_ok(),
                "{allowed}"
            );
        }
        let open = UploadPolicy {
            allow_link_local: true,
            ..Default::default()
        };
        assert!(
            open.check_address("169.254.169.254".parse().unwrap())
                .is_ok()
        );
        assert!(open.check_address("0.0.0.0".parse().unwrap()).is_err());
    }

    #[test]
    fn request_proxies_must_be_allowed() {
        let policy = UploadPolicy {
            proxy: Some("http://corp:3128".into()),
            allowed_proxies: vec!["other:8080".into()],
            ..Default::default()
        };
        policy.check().unwrap();
        let p = |u: &str| Proxy::parse(&proxy_url(u)).unwrap();
        assert!(policy.check_proxy(&p("corp:3128")).is_ok());
        assert!(policy.check_proxy(&p("http://u:pw@other:8080")).is_ok());
        let e = policy.check_proxy(&p("127.0.0.1:22")).unwrap_err();
        assert!(e.contains("allowed_proxies"), "{e}");
        assert!(
            UploadPolicy::default()
                .check_proxy(&p("corp:3128"))
                .is_err()
        );
    }

    #[test]
    fn quote_plus_matches_python() {
        assert_eq!(quote_plus("Example inc."), "Example+inc.");
        assert_eq!(quote_plus("a/b&c=d"), "a%2Fb%26c%3Dd");
        assert_eq!(quote_plus("~_-."), "~_-.");
    }

    fn policy_with_ca(file: &std::path::Path, ca_only: bool) -> UploadPolicy {
        UploadPolicy {
            ca_file: Some(file.to_path_buf()),
            ca_only,
            ..Default::default()
        }
    }

    /// A TLS handshake in memory with a server whose certificate `ca`
    /// signed: the client's error, if any.
    async fn handshake(
        client: &Arc<rustls::ClientConfig>,
        ca: &crate::local_tls::LocalCa,
    ) -> Result<(), std::io::Error> {
        let server = ca.server_config(&["uploads.example.com"]).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(b);
        let name = rustls::pki_types::ServerName::try_from("uploads.example.com").unwrap();
        let connect = tokio_rustls::TlsConnector::from(client.clone()).connect(name, a);
        let (connected, _) = tokio::join!(connect, accept);
        connected.map(drop)
    }

    #[tokio::test]
    async fn the_ca_file_adds_to_the_public_roots_or_replaces_them() {
        use crate::local_tls::LocalCa;
        let dir = tempfile::tempdir().unwrap();
        let (ours, other) = (
            LocalCa::new("ours").unwrap(),
            LocalCa::new("other").unwrap(),
        );
        // Two certificates, with text around them, as bundles have.
        let both = dir.path().join("both.pem");
        std::fs::write(
            &both,
            format!("# ours\n{}\n# other\n{}", ours.pem(), other.pem()),
        )
        .unwrap();
        let just_other = dir.path().join("other.pem");
        std::fs::write(&just_other, other.pem()).unwrap();

        let public = UploadPolicy::default().tls_config().unwrap();
        let e = handshake(&public, &ours).await.unwrap_err();
        assert_eq!(
            certificate_problem(&e).as_deref(),
            Some(
                "the upload host's certificate is not trusted: it is not signed by a \
                 certificate authority this node trusts (set [upload] ca_file?)"
            ),
            "{e}"
        );
        for ca_only in [false, true] {
            let config = policy_with_ca(&both, ca_only).tls_config().unwrap();
            handshake(&config, &ours).await.unwrap();
            handshake(&config, &other).await.unwrap();
        }
        let config = policy_with_ca(&just_other, true).tls_config().unwrap();
        let e = handshake(&config, &ours).await.unwrap_err();
        assert!(certificate_problem(&e).is_some(), "{e}");
        // Not a certificate problem: no words about certificates.
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(certificate_problem(&refused), None);
    }

    #[test]
    fn a_bad_ca_file_is_refused_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = policy_with_ca(&missing, false).tls_config().unwrap_err();
        assert!(
            e.starts_with(&format!("ca_file {}: cannot be read: ", missing.display())),
            "{e}"
        );

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let e = policy_with_ca(&empty, false).tls_config().unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");

        let key_only = dir.path().join("key.pem");
        std::fs::write(
            &key_only,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let e = policy_with_ca(&key_only, true).tls_config().unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = policy_with_ca(&garbage, false).tls_config().unwrap_err();
        assert!(
            e.contains("certificate 1 is not a usable CA certificate"),
            "{e}"
        );

        let no_file = UploadPolicy {
            ca_only: true,
            ..Default::default()
        };
        assert_eq!(
            no_file.check().unwrap_err(),
            "ca_only = true needs ca_file: with ca_only, only ca_file's certificates are trusted"
        );
        assert!(no_file.tls_config().is_err());
    }
}
