//! Bank access tokens at rest: AES-256-GCM with a random nonce per token, the consent
//! id as associated data (a ciphertext moved to another consent does not decrypt).
//!
//! A sealed token names the key that sealed it: `MAGIC || key id || nonce || ciphertext`,
//! the key id being the first 8 bytes of SHA-256 over a label and the key (it tells keys
//! apart and says nothing about them). Tokens sealed before key ids were kept are
//! `nonce || ciphertext`; they stay readable (every configured key is tried, the AEAD
//! tag tells which one fits) until a re-encryption seals them with `crypto.key`.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

const NONCE_LEN: usize = 12;
/// Opens a sealed token that names its key.
pub(crate) const MAGIC: [u8; 4] = *b"rk1:";
const KEY_ID_LEN: usize = 8;
/// `MAGIC || key id`: a token sealed with a key starts with this.
pub(crate) const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN;

/// Which key sealed a token: a short hash of the key, safe to log.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"refreshd token key id v1\0")
            .chain_update(key)
            .finalize();
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self(id)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_ID_LEN] {
        &self.0
    }

    /// `MAGIC || id`, the first bytes of every token this key seals.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        let mut header = [0; HEADER_LEN];
        header[..MAGIC.len()].copy_from_slice(&MAGIC);
        header[MAGIC.len()..].copy_from_slice(&self.0);
        header
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

#[derive(Clone)]
struct SealingKey {
    id: KeyId,
    cipher: Aes256Gcm,
}

impl SealingKey {
    fn new(key: &[u8; 32]) -> Self {
        Self {
            id: KeyId::of(key),
            cipher: Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)),
        }
    }

    /// `nonce || ciphertext` opened with this key, if it is the one.
    fn open(&self, body: &[u8], context: &[u8]) -> Option<SecretString> {
        if body.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let plain = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: context,
                },
            )
            .ok()?;
        String::from_utf8(plain).ok().map(SecretString::from)
    }
}

/// Encrypts bank access tokens with `crypto.key` and decrypts them with it or one of
/// `crypto.retired_keys`.
#[derive(Clone)]
pub struct TokenCipher {
    current: SealingKey,
    retired: Vec<SealingKey>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCipher(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the stored token cannot be decrypted with crypto.key nor any of crypto.retired_keys")]
    Decrypt,
    #[error(
        "the stored token was encrypted with key {0}, which is neither crypto.key nor one of crypto.retired_keys"
    )]
    UnknownKey(KeyId),
    #[error("the token cannot be encrypted")]
    Encrypt,
}

/// Which key opened a stored token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedWith {
    /// `crypto.key`, in the format that names it: nothing to re-encrypt.
    Current,
    /// A retired key, or the format without a key id: to be re-encrypted.
    Other,
}

impl TokenCipher {
    /// A cipher with `key` only.
    pub fn new(key: &[u8; 32]) -> Self {
        Self::with_retired(key, &[])
    }

    /// A cipher that encrypts with `key` and decrypts with it or one of `retired`.
    pub fn with_retired(key: &[u8; 32], retired: &[[u8; 32]]) -> Self {
        let current = SealingKey::new(key);
        let mut kept: Vec<SealingKey> = Vec::with_capacity(retired.len());
        for key in retired {
            let key = SealingKey::new(key);
            if key.id != current.id && kept.iter().all(|k| k.id != key.id) {
                kept.push(key);
            }
        }
        Self {
            current,
            retired: kept,
        }
    }

    /// The id of `crypto.key`.
    pub fn key_id(&self) -> KeyId {
        self.current.id
    }

    /// The ids of the retired keys.
    pub fn retired_key_ids(&self) -> Vec<KeyId> {
        self.retired.iter().map(|k| k.id).collect()
    }

    /// `MAGIC || key id || nonce || ciphertext`, bound to `context` (the consent id).
    pub fn encrypt(&self, token: &SecretString, context: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .current
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: token.expose_secret().as_bytes(),
                    aad: context,
                },
            )
            .map_err(|_| CryptoError::Encrypt)?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(&self.current.id.header());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    pub fn decrypt(&self, stored: &[u8], context: &[u8]) -> Result<SecretString, CryptoError> {
        self.open(stored, context).map(|(token, _)| token)
    }

    /// The token and whether it needs re-encrypting.
    pub fn open(
        &self,
        stored: &[u8],
        context: &[u8],
    ) -> Result<(SecretString, SealedWith), CryptoError> {
        let keys = || std::iter::once(&self.current).chain(&self.retired);
        let mut named = None;
        if stored.len() > HEADER_LEN && stored[..MAGIC.len()] == MAGIC {
            let mut id = [0; KEY_ID_LEN];
            id.copy_from_slice(&stored[MAGIC.len()..HEADER_LEN]);
            let id = KeyId(id);
            named = Some(id);
            if let Some(key) = keys().find(|k| k.id == id)
                && let Some(token) = key.open(&stored[HEADER_LEN..], context)
            {
                let with = if key.id == self.current.id {
                    SealedWith::Current
                } else {
                    SealedWith::Other
                };
                return Ok((token, with));
            }
        }
        // The format without a key id (whose random nonce may even start like a
        // header): the tag tells which key, if any, sealed it.
        if let Some(token) = keys().find_map(|k| k.open(stored, context)) {
            return Ok((token, SealedWith::Other));
        }
        match named {
            Some(id) if keys().all(|k| k.id != id) => Err(CryptoError::UnknownKey(id)),
            _ => Err(CryptoError::Decrypt),
        }
    }

    /// The token sealed again with `crypto.key`, or `None` if it already is.
    pub fn reseal(&self, stored: &[u8], context: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        match self.open(stored, context)? {
            (_, SealedWith::Current) => Ok(None),
            (token, SealedWith::Other) => self.encrypt(&token, context).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nonce || ciphertext`, as tokens were sealed before they named their key.
    fn legacy(key: &[u8; 32], token: &str, context: &[u8]) -> Vec<u8> {
        let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key));
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: token.as_bytes(),
                    aad: context,
                },
            )
            .unwrap();
        [&nonce[..], &sealed].concat()
    }

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

    #[test]
    fn a_sealed_token_names_its_key() {
        let cipher = TokenCipher::new(&[7; 32]);
        let sealed = cipher.encrypt(&SecretString::from("t"), b"c").unwrap();
        assert_eq!(&sealed[..HEADER_LEN], &KeyId::of(&[7; 32]).header());
        assert_eq!(KeyId::of(&[7; 32]).to_string().len(), 16);
        assert_ne!(KeyId::of(&[7; 32]), KeyId::of(&[8; 32]));
    }

    #[test]
    fn retired_keys_decrypt_and_reseal_with_the_current_key() {
        let (a, b) = ([1; 32], [2; 32]);
        let old = TokenCipher::new(&a).encrypt(&"tok-a".into(), b"c").unwrap();
        let rotated = TokenCipher::with_retired(&b, &[a]);
        let (token, with) = rotated.open(&old, b"c").unwrap();
        assert_eq!((token.expose_secret(), with), ("tok-a", SealedWith::Other));
        let resealed = rotated.reseal(&old, b"c").unwrap().expect("resealed");
        assert_eq!(&resealed[..HEADER_LEN], &KeyId::of(&b).header());
        assert_eq!(rotated.reseal(&resealed, b"c").unwrap(), None, "once");
        // Once every token is resealed, the retired key can go.
        let b_only = TokenCipher::new(&b);
        assert_eq!(
            b_only.decrypt(&resealed, b"c").unwrap().expose_secret(),
            "tok-a"
        );
        assert!(
            matches!(b_only.decrypt(&old, b"c"), Err(CryptoError::UnknownKey(id)) if id == KeyId::of(&a)),
            "a token of a key no longer configured names that key"
        );
    }

    #[test]
    fn tokens_sealed_before_key_ids_stay_readable() {
        let (a, b) = ([1; 32], [2; 32]);
        for _ in 0..50 {
            let old = legacy(&a, "tok-legacy", b"c");
            for cipher in [TokenCipher::new(&a), TokenCipher::with_retired(&b, &[a])] {
                let (token, with) = cipher.open(&old, b"c").unwrap();
                assert_eq!(token.expose_secret(), "tok-legacy");
                assert_eq!(with, SealedWith::Other, "resealed to name its key");
            }
            assert!(matches!(
                TokenCipher::new(&b).open(&old, b"c"),
                Err(CryptoError::Decrypt)
            ));
        }
        // A legacy token whose random nonce starts like a header still opens.
        let mut old = legacy(&a, "tok", b"c");
        old[..MAGIC.len()].copy_from_slice(&MAGIC);
        let cipher = Aes256Gcm::new(&Key::<Aes256Gcm>::from(a));
        let nonce: [u8; NONCE_LEN] = old[..NONCE_LEN].try_into().unwrap();
        let sealed = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: b"tok".as_slice(),
                    aad: b"c",
                },
            )
            .unwrap();
        let old = [nonce.as_slice(), &sealed].concat();
        assert_eq!(
            TokenCipher::new(&a)
                .decrypt(&old, b"c")
                .unwrap()
                .expose_secret(),
            "tok"
        );
    }

    #[test]
    fn a_retired_key_equal_to_the_current_one_is_ignored() {
        let cipher = TokenCipher::with_retired(&[1; 32], &[[1; 32], [2; 32], [2; 32]]);
        assert_eq!(cipher.retired_key_ids(), vec![KeyId::of(&[2; 32])]);
    }
}
