//! Who may use the public API: users with argon2-hashed passwords and
//! roles, checked over HTTP Basic, at a bounded cost to the daemon.
//!
//! argon2 is slow and memory-hungry on purpose (about 19 MiB and tens of
//! milliseconds per check), so an unauthenticated client must not be able
//! to make the daemon run many at once:
//!
//! - verified credentials are cached (as a SHA-256 digest per user), so a
//!   known user pays argon2 once, not per request;
//! - every other check runs on a small pool of low-priority threads (one
//!   per core) behind a short queue; when the queue is full the request is
//!   answered 503 at once ([`AuthError::Busy`]);
//! - failed attempts are counted per client address (per /64 for IPv6):
//!   after [`FREE_FAILURES`], the address must wait, doubling from 1 s up
//!   to [`MAX_BACKOFF`], and is answered 429 without any check
//!   ([`AuthError::Throttled`]);
//! - an unknown user name costs the same check as a known one (against a
//!   dummy hash), so user names cannot be told apart by timing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::config::{Role, User};

/// Failed attempts an address may make before it has to wait.
pub const FREE_FAILURES: u32 = 5;
/// The first wait; each further failure doubles it.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An address with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most.
const MAX_ADDRESSES: usize = 100_000;
/// Checks waiting for a thread, per thread.
const QUEUE_PER_THREAD: usize = 2;
/// What an unknown user name is checked against: a hash with the default
/// parameters (the cost of a real user's check). Its password does not
/// matter: an unknown name fails whatever the check says.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bRX4Xm650Nrz2avD/czTNg$hawJJUm2BO+w5XJnR5lg3YSdIdcqPheYwbmul9tCFaU";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Authentication required")]
    Missing,
    #[error("Invalid username or password")]
    Invalid,
    #[error(
        "Too many failed sign-ins from this address: retry in {} s",
        .retry_after.as_secs().max(1)
    )]
    Throttled { retry_after: Duration },
    #[error("Too many sign-ins being checked: retry in a moment")]
    Busy,
}

/// The configured users, the cache of verified credentials, the
/// verification pool and the per-address throttle.
pub struct Users {
    users: HashMap<String, (String, Role)>,
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// Checked for unknown user names, at the same cost as a real one.
    dummy_hash: String,
    pool: VerifierPool,
    throttle: Mutex<Throttle>,
}

impl Users {
    pub fn new(users: &[User]) -> Users {
        Users {
            users: users
                .iter()
                .map(|u| (u.name.clone(), (u.password_hash.clone(), u.role)))
                .collect(),
            verified: Mutex::new(HashMap::new()),
            dummy_hash: DUMMY_HASH.to_string(),
            pool: VerifierPool::start(),
            throttle: Mutex::new(Throttle::default()),
        }
    }

    /// Check an `Authorization` header value (`Basic base64(user:pass)`)
    /// from `client`.
    pub async fn authenticate(
        &self,
        header: Option<&str>,
        client: IpAddr,
    ) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let encoded = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
            .ok_or(AuthError::Missing)?;
        if encoded.len() > 4096 {
            return Err(AuthError::Invalid);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| AuthError::Invalid)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Invalid)?;
        let (name, password) = decoded.split_once(':').ok_or(AuthError::Invalid)?;
        let user = self.users.get(name);
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        if let Some((_, role)) = user {
            let cached = self.verified.lock().unwrap().get(name).copied();
            if let Some(known) = cached
                && bool::from(known.ct_eq(&digest))
            {
                return Ok(Caller {
                    user: name.to_string(),
                    role: *role,
                });
            }
        }
        let key = AddressKey::of(client);
        if let Some(retry_after) = self.throttle.lock().unwrap().blocked(key, Instant::now()) {
            return Err(AuthError::Throttled { retry_after });
        }
        let hash = user.map_or(&self.dummy_hash, |(hash, _)| hash).clone();
        let ok = self.pool.verify(hash, password.to_string()).await?;
        let now = Instant::now();
        match user {
            Some((_, role)) if ok => {
                self.throttle.lock().unwrap().succeeded(key);
                self.verified
                    .lock()
                    .unwrap()
                    .insert(name.to_string(), digest);
                Ok(Caller {
                    user: name.to_string(),
                    role: *role,
                })
            }
            _ => {
                self.throttle.lock().unwrap().failed(key, now);
                Err(AuthError::Invalid)
            }
        }
    }
}

/// A PHC string (argon2id, random salt) for `password`.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes encode");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default params")
        .to_string()
}

/// Does `password` match the PHC string `hash`? `memory` is the caller's
/// argon2 work area, reused from check to check: a verification thread
/// holds one while checks queue up, so memory stays at one work area per
/// thread however many checks run (a fresh 19 MiB allocation per check let
/// glibc keep hundreds of MiB around under a flood), and frees it when
/// the queue is empty.
fn verify_password(memory: &mut Vec<argon2::Block>, hash: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let algorithm = match argon2::Algorithm::try_from(parsed.algorithm) {
        Ok(a) => a,
        Err(_) => return false,
    };
    let version = match parsed.version.map(argon2::Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let (Ok(params), Some(salt), Some(expected)) =
        (argon2::Params::try_from(&parsed), parsed.salt, parsed.hash)
    else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    memory.resize(params.block_count(), argon2::Block::default());
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..])
        .is_ok()
        && bool::from(out.ct_eq(expected.as_bytes()))
}

/// Largest argon2 memory cost a configured hash may ask for, in KiB.
pub const MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;

/// Is this PHC string one the daemon can check (argon2, memory within
/// [`MAX_HASH_MEMORY_KIB`])?
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC string ({e})"))?;
    argon2::Algorithm::try_from(parsed.algorithm)
        .map_err(|_| format!("{} is not argon2", parsed.algorithm))?;
    let params =
        argon2::Params::try_from(&parsed).map_err(|e| format!("bad argon2 parameters ({e})"))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return Err(format!(
            "its memory cost ({} KiB) is over {MAX_HASH_MEMORY_KIB} KiB",
            params.m_cost()
        ));
    }
    Ok(())
}

/// A few threads that run argon2, behind a bounded queue.
struct VerifierPool {
    queue: std::sync::Arc<Queue>,
}

/// The checks waiting for a thread.
struct Queue {
    checks: Mutex<std::collections::VecDeque<Check>>,
    ready: std::sync::Condvar,
    capacity: usize,
}

struct Check {
    hash: String,
    password: String,
    reply: oneshot::Sender<bool>,
}

impl VerifierPool {
    fn start() -> VerifierPool {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let queue = std::sync::Arc::new(Queue {
            checks: Mutex::default(),
            ready: std::sync::Condvar::new(),
            capacity: threads * QUEUE_PER_THREAD,
        });
        for i in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("auth-verify-{i}"))
                .spawn(move || {
                    // Below the threads that serve requests: a flood of
                    // wrong passwords must not slow down everyone else.
                    // SAFETY: setpriority on this thread's own id.
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                    }
                    queue.serve();
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a password verification thread: {e}");
            }
        }
        VerifierPool { queue }
    }

    async fn verify(&self, hash: String, password: String) -> Result<bool, AuthError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut checks = self.queue.checks.lock().unwrap();
            if checks.len() >= self.queue.capacity {
                return Err(AuthError::Busy);
            }
            checks.push_back(Check {
                hash,
                password,
                reply,
            });
        }
        self.queue.ready.notify_one();
        answer.await.map_err(|_| AuthError::Busy)
    }
}

impl Queue {
    /// One verification thread: checks, one at a time, for good.
    fn serve(&self) {
        let mut memory = Vec::new();
        loop {
            let check = {
                let mut checks = self.checks.lock().unwrap();
                loop {
                    if let Some(check) = checks.pop_front() {
                        break check;
                    }
                    // Under load the work area is reused; once nothing
                    // waits, it goes back to the system.
                    memory = Vec::new();
                    checks = self.ready.wait(checks).unwrap();
                }
            };
            let ok = verify_password(&mut memory, &check.hash, &check.password);
            let _ = check.reply.send(ok);
        }
    }
}

/// Whom failures are counted against: an IPv4 address, or an IPv6 /64
/// (one host usually has a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AddressKey(u128);

impl AddressKey {
    fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey(u32::from(v4) as u128),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(u32::from(v4) as u128),
                None => AddressKey((u128::from(v6) >> 64) << 64 | 1),
            },
        }
    }
}

#[derive(Default)]
struct Throttle {
    addresses: HashMap<AddressKey, Failures>,
}

struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

impl Throttle {
    fn blocked(&self, key: AddressKey, now: Instant) -> Option<Duration> {
        let until = self.addresses.get(&key)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    fn succeeded(&mut self, key: AddressKey) {
        self.addresses.remove(&key);
    }

    fn failed(&mut self, key: AddressKey, now: Instant) {
        if self.addresses.len() >= MAX_ADDRESSES && !self.addresses.contains_key(&key) {
            self.addresses
                .retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if self.addresses.len() >= MAX_ADDRESSES {
                // Forget the address that failed longest ago.
                if let Some(oldest) = self
                    .addresses
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| *k)
                {
                    self.addresses.remove(&oldest);
                }
            }
        }
        let f = self.addresses.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: None,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        if f.count > FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES - 1).min(16);
            let wait = (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF);
            f.blocked_until = Some(now + wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[tokio::test]
    async fn passwords_roles_and_the_cache() {
        let users = Users::new(&[User {
            name: "ops".into(),
            password_hash: hash_password("s3cret"),
            role: Role::ReadOnly,
        }]);
        let ok = users
            .authenticate(Some(&basic("ops", "s3cret")), HOME)
            .await;
        assert_eq!(ok.unwrap().role, Role::ReadOnly);
        // Second time from the cache; a wrong password must still fail.
        assert!(
            users
                .authenticate(Some(&basic("ops", "s3cret")), HOME)
                .await
                .is_ok()
        );
        assert_eq!(
            users.authenticate(Some(&basic("ops", "nope")), HOME).await,
            Err(AuthError::Invalid)
        );
        assert_eq!(
            users
                .authenticate(Some(&basic("who", "s3cret")), HOME)
                .await,
            Err(AuthError::Invalid)
        );
        assert_eq!(
            users.authenticate(None, HOME).await,
            Err(AuthError::Missing)
        );
        assert_eq!(
            users.authenticate(Some("Basic !!!"), HOME).await,
            Err(AuthError::Invalid)
        );
    }

    #[tokio::test]
    async fn an_address_that_keeps_failing_waits_but_known_credentials_pass() {
        let users = Users::new(&[User {
            name: "ops".into(),
            password_hash: hash_password("s3cret"),
            role: Role::Admin,
        }]);
        let attacker: IpAddr = "192.0.2.7".parse().unwrap();
        users
            .authenticate(Some(&basic("ops", "s3cret")), HOME)
            .await
            .unwrap();
        for _ in 0..FREE_FAILURES + 1 {
            assert_eq!(
                users
                    .authenticate(Some(&basic("ops", "guess")), attacker)
                    .await,
                Err(AuthError::Invalid)
            );
        }
        let throttled = users
            .authenticate(Some(&basic("ops", "guess")), attacker)
            .await;
        assert!(
            matches!(throttled, Err(AuthError::Throttled { .. })),
            "{throttled:?}"
        );
        // The right password, already verified, is not held up.
        assert!(
            users
                .authenticate(Some(&basic("ops", "s3cret")), attacker)
                .await
                .is_ok()
        );
        // Another address is not affected.
        assert_eq!(
            users.authenticate(Some(&basic("ops", "guess")), HOME).await,
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn verification_matches_the_argon2_crate_and_reuses_its_memory() {
        let hash = hash_password("s3cret");
        let mut memory = Vec::new();
        assert!(verify_password(&mut memory, &hash, "s3cret"));
        let area = memory.len();
        assert!(!verify_password(&mut memory, &hash, "s3creT"));
        assert_eq!(memory.len(), area);
        assert!(!verify_password(&mut memory, "not a hash", "s3cret"));
        assert!(check_hash(&hash).is_ok());
        assert!(check_hash("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
        // The dummy for unknown names is a real hash, with the default cost.
        assert!(check_hash(DUMMY_HASH).is_ok());
        assert!(DUMMY_HASH.starts_with(&hash_password("x")[..30]));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_ipv6_counts_per_64() {
        let mut t = Throttle::default();
        let key = AddressKey::of("2001:db8::1".parse().unwrap());
        assert_eq!(key, AddressKey::of("2001:db8::ffff".parse().unwrap()));
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.failed(key, now);
        }
        assert_eq!(t.blocked(key, now), None);
        t.failed(key, now);
        assert_eq!(t.blocked(key, now), Some(FIRST_BACKOFF));
        t.failed(key, now);
        assert_eq!(t.blocked(key, now), Some(FIRST_BACKOFF * 2));
        for _ in 0..20 {
            t.failed(key, now);
        }
        assert_eq!(t.blocked(key, now), Some(MAX_BACKOFF));
        assert_eq!(t.blocked(key, now + MAX_BACKOFF), None);
    }
}
