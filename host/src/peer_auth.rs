//! Node-to-node request authentication: every request is signed with an
//! HMAC-SHA256 keyed by the cluster secret, over its method, path and
//! query, the sending node's name, a timestamp, a random nonce and the
//! SHA-256 of its body. The secret itself never crosses the wire.
//!
//! A node accepts a request only if it names a node of `[nodes]`, its
//! timestamp is within [`CLOCK_SKEW`] of the node's own clock, its nonce
//! has not been seen in the replay window, and the signature matches. A
//! captured request can therefore not be replayed (same nonce), nor
//! altered (signature), nor held back and sent later (timestamp).
//!
//! A session ([`crate::protocol`]) is one connection that outlives its
//! opening request: the coordinator's commands on it are lines, each
//! signed too ([`LineSigner`], [`LineVerifier`]), bound to the signed
//! request that opened the session (its nonce) and numbered from 1, so a
//! line cannot be forged, altered, replayed, reordered or moved to
//! another session, on plain TCP as over TLS.

use crate::hex;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};

/// `Authorization: AC1-HMAC-SHA256 <hex signature>`.
pub const SCHEME: &str = "AC1-HMAC-SHA256";
/// The signing node's name (percent-encoded).
pub const NODE_HEADER: HeaderName = HeaderName::from_static("x-autocollect-node");
/// Unix time of signing, in seconds.
pub const TIME_HEADER: HeaderName = HeaderName::from_static("x-autocollect-time");
/// 128 random bits, hex.
pub const NONCE_HEADER: HeaderName = HeaderName::from_static("x-autocollect-nonce");
/// How far a request's timestamp may be from the receiver's clock, either
/// way: the replay window is twice this.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Nonces remembered at most (they expire after the replay window).
/// Only correctly signed requests add one.
const NONCES_MAX: usize = 200_000;

type HmacSha256 = Hmac<Sha256>;

/// The headers that sign one request, now, with a fresh nonce.
pub fn sign(
    secret: &str,
    node: &str,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
) -> Vec<(HeaderName, HeaderValue)> {
    let nonce = format!("{:032x}", rand::random::<u128>());
    sign_at(
        secret,
        node,
        method,
        path_and_query,
        body,
        unix_now(),
        &nonce,
    )
}

/// The headers that sign one request as made at unix time `time` with
/// `nonce` (32 hex digits). Tests use it to forge old or replayed requests.
pub fn sign_at(
    secret: &str,
    node: &str,
    method: &Method,
    path_and_query: &str,
    body: &[u8],
    time: i64,
    nonce: &str,
) -> Vec<(HeaderName, HeaderValue)> {
    let signature = signature(secret, node, method, path_and_query, time, nonce, body);
    let value = |s: String| HeaderValue::from_str(&s).expect("ASCII header values");
    vec![
        (
            http::header::AUTHORIZATION,
            value(format!("{SCHEME} {}", hex(&signature))),
        ),
        (NODE_HEADER, value(crate::upload::quote_plus(node))),
        (TIME_HEADER, value(time.to_string())),
        (NONCE_HEADER, value(nonce.to_string())),
    ]
}

fn signature(
    secret: &str,
    node: &str,
    method: &Method,
    path_and_query: &str,
    time: i64,
    nonce: &str,
    body: &[u8],
) -> [u8; 32] {
    let mut mac = keyed(secret);
    let body_digest = hex(&Sha256::digest(body));
    // Each field on its own line; none of them can hold a newline.
    for part in [
        "autocollect-peer-v1",
        method.as_str(),
        path_and_query,
        node,
        &time.to_string(),
        nonce,
        &body_digest,
    ] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac.finalize().into_bytes().into()
}

/// The signature of session command number `seq` (`json`) in the
/// session opened by the request signed with `open_nonce`.
/// `seq` is the number as the line writes it, so that no other spelling
/// of it (`01`, `+1`) passes with the same signature.
fn line_signature(key: &HmacSha256, open_nonce: &str, seq: &str, json: &str) -> [u8; 32] {
    let mut mac = key.clone();
    for part in ["autocollect-session-v1", open_nonce, seq, json] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac.finalize().into_bytes().into()
}

fn keyed(secret: &str) -> HmacSha256 {
    HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key")
}

/// The nonce of a request signed by [`sign`] (what its session's lines
/// are bound to).
pub fn nonce_of(signed: &[(HeaderName, HeaderValue)]) -> &str {
    signed
        .iter()
        .find(|(name, _)| *name == NONCE_HEADER)
        .and_then(|(_, value)| value.to_str().ok())
        .expect("sign() sets a nonce")
}

/// Signs the coordinator's command lines on one session: `SEQ MAC JSON`.
pub struct LineSigner {
    key: HmacSha256,
    open_nonce: String,
    next: u64,
}

impl LineSigner {
    /// For the session opened by a request signed with `open_nonce`.
    pub fn new(secret: &str, open_nonce: &str) -> LineSigner {
        LineSigner {
            key: keyed(secret),
            open_nonce: open_nonce.to_string(),
            next: 1,
        }
    }

    /// The next line (ending in `\n`) carrying `json`, which holds no
    /// newline (compact JSON).
    pub fn line(&mut self, json: &str) -> String {
        debug_assert!(!json.contains('\n'));
        let seq = self.next.to_string();
        self.next += 1;
        let mac = line_signature(&self.key, &self.open_nonce, &seq, json);
        format!("{seq} {} {json}\n", hex(&mac))
    }
}

/// Checks the command lines of one session, in order.
pub struct LineVerifier {
    key: HmacSha256,
    open_nonce: String,
    next: u64,
}

impl LineVerifier {
    /// The JSON of `line` (without its newline) if it is the session's
    /// next command, genuine.
    pub fn verify<'a>(&mut self, line: &'a str) -> Result<&'a str, PeerAuthError> {
        let mut parts = line.splitn(3, ' ');
        let (Some(seq), Some(mac), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(PeerAuthError::Malformed("session command"));
        };
        let given = unhex32(mac).ok_or(PeerAuthError::Malformed("signature"))?;
        let expected = line_signature(&self.key, &self.open_nonce, seq, json);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &given[..])) {
            return Err(PeerAuthError::BadSignature);
        }
        let seq: u64 = seq
            .parse()
            .map_err(|_| PeerAuthError::Malformed("session command number"))?;
        if seq != self.next {
            return Err(PeerAuthError::OutOfOrder {
                got: seq,
                expected: self.next,
            });
        }
        self.next += 1;
        Ok(json)
    }
}

/// Why a node-to-node request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    #[error("missing node-to-node signature")]
    Missing,
    #[error("malformed node-to-node signature: {0}")]
    Malformed(&'static str),
    #[error("node {0:?} is not a node of this cluster")]
    UnknownNode(String),
    #[error(
        "the request's time is {0} s off this node's clock (at most {skew} s allowed): check the nodes' clocks (NTP)",
        skew = CLOCK_SKEW.as_secs()
    )]
    Skewed(i64),
    #[error("replayed request (its nonce was already used)")]
    Replayed,
    #[error("bad signature (is the cluster secret the same on both nodes?)")]
    BadSignature,
    #[error("too many node-to-node requests in the replay window")]
    Overloaded,
    #[error("session command {got} came where {expected} was due (replayed or dropped)")]
    OutOfOrder { got: u64, expected: u64 },
}

/// Checks signed requests for one node.
pub struct PeerVerifier {
    secret: String,
    nodes: BTreeSet<String>,
    nonces: Mutex<Nonces>,
}

#[derive(Default)]
struct Nonces {
    seen: HashMap<u128, i64>,
    /// (expiry, nonce), oldest first.
    order: VecDeque<(i64, u128)>,
}

impl Nonces {
    fn prune(&mut self, now: i64) {
        while let Some(&(expires, nonce)) = self.order.front() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&nonce);
        }
    }
}

impl PeerVerifier {
    pub fn new(secret: &str, nodes: impl IntoIterator<Item = String>) -> PeerVerifier {
        PeerVerifier {
            secret: secret.to_string(),
            nodes: nodes.into_iter().collect(),
            nonces: Mutex::default(),
        }
    }

    /// The checker of the command lines of the session opened by a
    /// request, genuine, signed with `open_nonce`.
    pub fn session_lines(&self, open_nonce: &str) -> LineVerifier {
        LineVerifier {
            key: keyed(&self.secret),
            open_nonce: open_nonce.to_string(),
            next: 1,
        }
    }

    /// The name of the node that signed this request, if it is genuine.
    pub fn verify(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<String, PeerAuthError> {
        self.verify_at(method, path_and_query, headers, body, unix_now())
    }

    fn verify_at(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<String, PeerAuthError> {
        let header = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let authorization = header(&http::header::AUTHORIZATION).ok_or(PeerAuthError::Missing)?;
        let given = authorization
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or(PeerAuthError::Missing)?;
        let given = unhex32(given.trim()).ok_or(PeerAuthError::Malformed("signature"))?;
        let node = header(&NODE_HEADER).ok_or(PeerAuthError::Malformed("node"))?;
        let node = String::from_utf8(crate::upload::percent_decode(&node.replace('+', " ")))
            .map_err(|_| PeerAuthError::Malformed("node"))?;
        let time: i64 = header(&TIME_HEADER)
            .and_then(|t| t.parse().ok())
            .ok_or(PeerAuthError::Malformed("time"))?;
        let nonce_text = header(&NONCE_HEADER).ok_or(PeerAuthError::Malformed("nonce"))?;
        let hex = nonce_text.len() == 32 && nonce_text.bytes().all(|b| b.is_ascii_hexdigit());
        let nonce = hex
            .then(|| u128::from_str_radix(nonce_text, 16).ok())
            .flatten()
            .ok_or(PeerAuthError::Malformed("nonce"))?;
        if !self.nodes.contains(&node) {
            return Err(PeerAuthError::UnknownNode(node));
        }
        let skew = time.saturating_sub(now);
        if skew.unsigned_abs() > CLOCK_SKEW.as_secs() {
            return Err(PeerAuthError::Skewed(skew));
        }
        let expected = signature(
            &self.secret,
            &node,
            method,
            path_and_query,
            time,
            nonce_text,
            body,
        );
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &given[..])) {
            return Err(PeerAuthError::BadSignature);
        }
        let mut nonces = self.nonces.lock().unwrap();
        nonces.prune(now);
        if nonces.seen.contains_key(&nonce) {
            return Err(PeerAuthError::Replayed);
        }
        if nonces.seen.len() >= NONCES_MAX {
            return Err(PeerAuthError::Overloaded);
        }
        // Remembered (by this node's clock, so the queue stays in order)
        // until no request with this time can pass the skew check: its
        // time is at most `now + skew`, and passes until `time + skew`.
        let expires = now + 2 * CLOCK_SKEW.as_secs() as i64 + 1;
        nonces.seen.insert(nonce, expires);
        nonces.order.push_back((expires, nonce));
        Ok(node)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    fn headers(signed: Vec<(HeaderName, HeaderValue)>) -> HeaderMap {
        signed.into_iter().collect()
    }

    fn verifier() -> PeerVerifier {
        PeerVerifier::new(SECRET, ["n1".to_string(), "node two".to_string()])
    }

    #[test]
    fn a_signed_request_passes_once() {
        let v = verifier();
        let h = headers(sign(SECRET, "node two", &Method::POST, "/x?a=1", b"{}"));
        assert_eq!(
            v.verify(&Method::POST, "/x?a=1", &h, b"{}").unwrap(),
            "node two"
        );
        assert_eq!(
            v.verify(&Method::POST, "/x?a=1", &h, b"{}"),
            Err(PeerAuthError::Replayed)
        );
    }

    #[test]
    fn anything_changed_breaks_the_signature() {
        let v = verifier();
        let h = || headers(sign(SECRET, "n1", &Method::POST, "/x", b"body"));
        for (method, path, body) in [
            (Method::GET, "/x", &b"body"[..]),
            (Method::POST, "/y", &b"body"[..]),
            (Method::POST, "/x", &b"bodY"[..]),
        ] {
            assert_eq!(
                v.verify(&method, path, &h(), body),
                Err(PeerAuthError::BadSignature)
            );
        }
        let mut forged = h();
        forged.insert(NODE_HEADER, HeaderValue::from_static("node+two"));
        assert_eq!(
            v.verify(&Method::POST, "/x", &forged, b"body"),
            Err(PeerAuthError::BadSignature)
        );
        let wrong_key = headers(sign("another secret!!", "n1", &Method::POST, "/x", b"body"));
        assert_eq!(
            v.verify(&Method::POST, "/x", &wrong_key, b"body"),
            Err(PeerAuthError::BadSignature)
        );
    }

    #[test]
    fn old_unknown_and_malformed_requests_are_refused() {
        let v = verifier();
        let now = unix_now();
        let nonce = "0123456789abcdef0123456789abcdef";
        let h = headers(sign_at(SECRET, "n1", &Method::GET, "/x", b"", now, nonce));
        assert_eq!(
            v.verify_at(&Method::GET, "/x", &h, b"", now + 31),
            Err(PeerAuthError::Skewed(-31))
        );
        let stranger = headers(sign(SECRET, "n9", &Method::GET, "/x", b""));
        assert_eq!(
            v.verify(&Method::GET, "/x", &stranger, b""),
            Err(PeerAuthError::UnknownNode("n9".into()))
        );
        assert_eq!(
            v.verify(&Method::GET, "/x", &HeaderMap::new(), b""),
            Err(PeerAuthError::Missing)
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 0123456789abcdef"),
        );
        assert_eq!(
            v.verify(&Method::GET, "/x", &bearer, b""),
            Err(PeerAuthError::Missing)
        );
        let mut bad = h.clone();
        bad.insert(NONCE_HEADER, HeaderValue::from_static("xyz"));
        assert_eq!(
            v.verify(&Method::GET, "/x", &bad, b""),
            Err(PeerAuthError::Malformed("nonce"))
        );
    }

    #[test]
    fn nonces_expire_with_the_window() {
        let v = verifier();
        let now = unix_now();
        let nonce = "0123456789abcdef0123456789abcdef";
        let h = headers(sign_at(SECRET, "n1", &Method::GET, "/x", b"", now, nonce));
        v.verify_at(&Method::GET, "/x", &h, b"", now).unwrap();
        assert_eq!(v.nonces.lock().unwrap().seen.len(), 1);
        // Far later the nonce is forgotten, and the time check refuses.
        assert_eq!(
            v.verify_at(&Method::GET, "/x", &h, b"", now + 120),
            Err(PeerAuthError::Skewed(-120))
        );
        v.nonces.lock().unwrap().prune(now + 120);
        assert!(v.nonces.lock().unwrap().seen.is_empty());
    }

    #[test]
    fn session_lines_pass_once_in_order_and_only_in_their_session() {
        let v = verifier();
        let nonce = "0123456789abcdef0123456789abcdef";
        let mut signer = LineSigner::new(SECRET, nonce);
        let first = signer.line(r#"{"command":"ping"}"#);
        let second = signer.line(r#"{"command":"cancel"}"#);
        let line = |l: &str| l.trim_end().to_string();

        let mut lines = v.session_lines(nonce);
        assert_eq!(lines.verify(&line(&first)), Ok(r#"{"command":"ping"}"#));
        // Replayed, or the next one dropped: refused.
        assert_eq!(
            lines.verify(&line(&first)),
            Err(PeerAuthError::OutOfOrder {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(lines.verify(&line(&second)), Ok(r#"{"command":"cancel"}"#));

        // Another session (another opening nonce) takes none of them.
        let mut other = v.session_lines("ffeeddccbbaa99887766554433221100");
        assert_eq!(
            other.verify(&line(&first)),
            Err(PeerAuthError::BadSignature)
        );
        // Altered, or signed with another secret, or not a line at all.
        let mut lines = v.session_lines(nonce);
        let altered = line(&first).replace("ping", "pong");
        assert_eq!(lines.verify(&altered), Err(PeerAuthError::BadSignature));
        let forged = LineSigner::new("another secret!!", nonce).line(r#"{"command":"ping"}"#);
        assert_eq!(
            lines.verify(&line(&forged)),
            Err(PeerAuthError::BadSignature)
        );
        assert!(matches!(
            lines.verify("hello"),
            Err(PeerAuthError::Malformed(_))
        ));
        let renumbered = line(&first).replacen('1', "2", 1);
        assert_eq!(lines.verify(&renumbered), Err(PeerAuthError::BadSignature));
        // The same number spelt otherwise is another line.
        for spelt in ["01", "+1"] {
            let respelt = line(&first).replacen('1', spelt, 1);
            assert_eq!(lines.verify(&respelt), Err(PeerAuthError::BadSignature));
        }
        assert_eq!(lines.verify(&line(&first)), Ok(r#"{"command":"ping"}"#));
    }
}
