//! Who may do what: public API users (HTTP Basic, argon2-hashed passwords,
//! roles) and the node-to-node shared secret.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Role, User};

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
}

/// The configured users, with a cache of verified credentials so that
/// argon2 (deliberately slow) runs once per user and password, not per
/// request. The cache holds SHA-256 digests, never passwords.
pub struct Users {
    users: HashMap<String, (String, Role)>,
    verified: Mutex<HashMap<String, [u8; 32]>>,
}

impl Users {
    pub fn new(users: &[User]) -> Users {
        Users {
            users: users
                .iter()
                .map(|u| (u.name.clone(), (u.password_hash.clone(), u.role)))
                .collect(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Check an `Authorization` header value (`Basic base64(user:pass)`).
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let encoded = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
            .ok_or(AuthError::Missing)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| AuthError::Invalid)?;
        let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Invalid)?;
        let (name, password) = decoded.split_once(':').ok_or(AuthError::Invalid)?;
        let Some((hash, role)) = self.users.get(name) else {
            return Err(AuthError::Invalid);
        };
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let cached = self.verified.lock().unwrap().get(name).copied();
        if let Some(known) = cached
            && bool::from(known.ct_eq(&digest))
        {
            return Ok(Caller {
                user: name.to_string(),
                role: *role,
            });
        }
        let (hash, password) = (hash.clone(), password.to_string());
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        if !ok {
            return Err(AuthError::Invalid);
        }
        self.verified
            .lock()
            .unwrap()
            .insert(name.to_string(), digest);
        Ok(Caller {
            user: name.to_string(),
            role: *role,
        })
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

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Does an `Authorization` header carry the cluster secret? (Constant
/// time in the secret's contents.)
pub fn has_cluster_secret(header: Option<&str>, secret: &str) -> bool {
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let a = Sha256::digest(token.as_bytes());
    let b = Sha256::digest(secret.as_bytes());
    bool::from(a.ct_eq(&b))
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

    #[tokio::test]
    async fn passwords_roles_and_the_cache() {
        let users = Users::new(&[User {
            name: "ops".into(),
            password_hash: hash_password("s3cret"),
            role: Role::ReadOnly,
        }]);
        let ok = users.authenticate(Some(&basic("ops", "s3cret"))).await;
        assert_eq!(ok.unwrap().role, Role::ReadOnly);
        // Second time from the cache; a wrong password must still fail.
        assert!(
            users
                .authenticate(Some(&basic("ops", "s3cret")))
                .await
                .is_ok()
        );
        assert_eq!(
            users.authenticate(Some(&basic("ops", "nope"))).await,
            Err(AuthError::Invalid)
        );
        assert_eq!(
            users.authenticate(Some(&basic("who", "s3cret"))).await,
            Err(AuthError::Invalid)
        );
        assert_eq!(users.authenticate(None).await, Err(AuthError::Missing));
        assert_eq!(
            users.authenticate(Some("Basic !!!")).await,
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn cluster_secret() {
        assert!(has_cluster_secret(Some("Bearer abc"), "abc"));
        assert!(!has_cluster_secret(Some("Bearer abd"), "abc"));
        assert!(!has_cluster_secret(Some("abc"), "abc"));
        assert!(!has_cluster_secret(None, "abc"));
    }
}
