//! Bank access tokens at rest: AES-256-GCM with a random nonce per token, the consent
//! id as associated data (a ciphertext moved to another consent does not decrypt).

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use secrecy::{ExposeSecret as _, SecretString};

const NONCE_LEN: usize = 12;

/// Encrypts and decrypts bank access tokens with the configured `crypto.key`.
#[derive(Clone)]
pub struct TokenCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCipher(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the stored token cannot be decrypted with the configured crypto.key")]
    Decrypt,
    #[error("the token cannot be encrypted")]
    Encrypt,
}

impl TokenCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)),
        }
    }

    /// `nonce || ciphertext`, bound to `context` (the consent id).
    pub fn encrypt(&self, token: &SecretString, context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: token.expose_secret().as_bytes(),
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn decrypt(&self, stored: &[u8], context: &[u8]) -> Result<SecretString, CryptoError> {
        if stored.len() < NONCE_LEN {
            return Err(CryptoError::Decrypt);
        }
        let (nonce, sealed) = stored.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::Decrypt)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let cipher = TokenCipher::new(&[7; 32]);
        let token = SecretString::from("bank-token-123");
        let sealed = cipher.encrypt(&token, b"consent-a").unwrap();
        assert!(
            !sealed.windows(5).any(|w| w == b"token"),
            "the token is not stored in clear"
        );
        assert_eq!(
            cipher
                .decrypt(&sealed, b"consent-a")
                .unwrap()
                .expose_secret(),
            "bank-token-123"
        );
        assert!(
            cipher.decrypt(&sealed, b"consent-b").is_err(),
            "bound to its consent"
        );
        assert!(
            TokenCipher::new(&[8; 32])
                .decrypt(&sealed, b"consent-a")
                .is_err(),
            "needs the key"
        );
        assert!(cipher.decrypt(&sealed[..5], b"consent-a").is_err());
        let again = cipher.encrypt(&token, b"consent-a").unwrap();
        assert_ne!(sealed, again, "a fresh nonce per encryption");
    }
}
