//! Bearer JWT authentication (SPEC §3): HS256 secret or RS256 public key; the `scope`
//! must contain `api:stored_data` or `api:admin`; the tenant is the `tenant_id` claim.
//! `exp` is required and `nbf` checked when present (5 s leeway each); `iss` and
//! `aud` are required and checked when `auth.issuer` / `auth.audience` are set.

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use refresh_core::{Problem, TenantId};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

pub const SCOPE_STORED_DATA: &str = "api:stored_data";
pub const SCOPE_ADMIN: &str = "api:admin";

/// The verified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's tenant (always set for a tenant; optional for an operator).
    pub tenant: Option<TenantId>,
    /// `api:admin`: may act on any tenant, recorded as `ADMIN`.
    pub admin: bool,
}

impl Principal {
    /// The tenant whose data the caller may see (`None`: every tenant).
    pub fn scope_tenant(&self) -> Option<&TenantId> {
        if self.admin {
            None
        } else {
            self.tenant.as_ref()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth: set auth.jwt_hs256_secret or auth.jwt_rs256_public_key_pem")]
    Missing,
    #[error("auth.jwt_rs256_public_key_pem is not an RSA public key in PEM")]
    BadPem(#[source] jsonwebtoken::errors::Error),
}

/// Checks bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Scope {
    Text(String),
    List(Vec<String>),
}

impl Scope {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Self::Text(text) => text.split_whitespace().any(|s| s == wanted),
            Self::List(list) => list.iter().any(|s| s == wanted),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    tenant_id: Option<String>,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
}

impl Verifier {
    pub fn new(
        hs256_secret: Option<&SecretString>,
        rs256_pem: Option<&str>,
    ) -> Result<Self, AuthConfigError> {
        let (key, algorithm) = match (rs256_pem, hs256_secret) {
            (Some(pem), _) => (
                DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(AuthConfigError::BadPem)?,
                Algorithm::RS256,
            ),
            (None, Some(secret)) => (
                DecodingKey::from_secret(secret.expose_secret().as_bytes()),
                Algorithm::HS256,
            ),
            (None, None) => return Err(AuthConfigError::Missing),
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.leeway = 5;
        Ok(Self { key, validation })
    }

    /// Also requires the token's `iss` to be `issuer` and its `aud` to contain
    /// `audience`, each when given.
    #[must_use]
    pub fn with_issuer_audience(mut self, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut required = vec!["exp"];
        if let Some(issuer) = issuer {
            self.validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if let Some(audience) = audience {
            self.validation.set_audience(&[audience]);
            self.validation.validate_aud = true;
            required.push("aud");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// The principal of an `Authorization` header value, or the 401/403 problem.
    pub fn verify(&self, authorization: Option<&str>) -> Result<Principal, Box<Problem>> {
        let Some(value) = authorization else {
            return Err(Box::new(Problem::unauthorized(
                "A bearer token is required",
            )));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Box::new(Problem::unauthorized(
                    "The Authorization header must be 'Bearer <token>'",
                ))
            })?;
        self.verify_token(token).map(|(principal, _)| principal)
    }

    /// The principal of a bare token and when the token expires (the portal's
    /// session lives exactly as long).
    pub fn verify_token(&self, token: &str) -> Result<(Principal, DateTime<Utc>), Box<Problem>> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| {
                Box::new(match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        Problem::unauthorized("The token has expired")
                    }
                    jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                        Problem::unauthorized("The token is not valid yet")
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidIssuer => {
                        Problem::unauthorized("The token's issuer is not accepted")
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                        Problem::unauthorized("The token's audience is not accepted")
                    }
                    _ => Problem::unauthorized("The token is invalid"),
                })
            })?
            .claims;
        let scope = claims.scope.as_ref();
        let admin = scope.is_some_and(|s| s.contains(SCOPE_ADMIN));
        if !admin && !scope.is_some_and(|s| s.contains(SCOPE_STORED_DATA)) {
            return Err(Box::new(Problem::insufficient_scope()));
        }
        let tenant = match claims.tenant_id.as_deref().map(TenantId::parse) {
            Some(Ok(tenant)) => Some(tenant),
            Some(Err(_)) => {
                return Err(Box::new(Problem::unauthorized(
                    "The token's tenant_id claim is invalid",
                )));
            }
            None if admin => None,
            None => {
                return Err(Box::new(Problem::unauthorized(
                    "The token has no tenant_id claim",
                )));
            }
        };
        let expires_at =
            DateTime::from_timestamp(claims.exp, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
        Ok((Principal { tenant, admin }, expires_at))
    }
}

/// An HS256 token (for `refreshctl token`, `make run` and tests).
pub fn mint_hs256(
    secret: &SecretString,
    tenant: Option<&TenantId>,
    scope: &str,
    expires_at: DateTime<Utc>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        scope: Some(Scope::Text(scope.to_owned())),
        tenant_id: tenant.map(|t| t.as_str().to_owned()),
        exp: expires_at.timestamp(),
        sub: Some("refreshctl".to_owned()),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use refresh_core::ProblemCode;

    use super::*;

    #[test]
    fn tokens() {
        let secret = SecretString::from("s3cret");
        let verifier = Verifier::new(Some(&secret), None).unwrap();
        let acme = TenantId::parse("acme").unwrap();
        let later = Utc::now() + chrono::TimeDelta::hours(1);
        let token = |tenant: Option<&TenantId>, scope: &str, exp| {
            mint_hs256(&secret, tenant, scope, exp).unwrap()
        };
        let check = |header: Option<String>, expected: Result<Principal, ProblemCode>| {
            let got = verifier.verify(header.as_deref()).map_err(|p| p.code);
            assert_eq!(got, expected, "{header:?}");
        };
        let bearer = |t: String| Some(format!("Bearer {t}"));
        check(
            bearer(token(Some(&acme), "api:stored_data", later)),
            Ok(Principal {
                tenant: Some(acme.clone()),
                admin: false,
            }),
        );
        check(
            bearer(token(Some(&acme), "openid api:stored_data x", later)),
            Ok(Principal {
                tenant: Some(acme.clone()),
                admin: false,
            }),
        );
        check(
            bearer(token(None, "api:admin", later)),
            Ok(Principal {
                tenant: None,
                admin: true,
            }),
        );
        check(
            bearer(token(Some(&acme), "api:other", later)),
            Err(ProblemCode::InsufficientScope),
        );
        check(
            bearer(token(None, "api:stored_data", later)),
            Err(ProblemCode::Unauthorized),
        );
        check(
            bearer(token(
                Some(&acme),
                "api:stored_data",
                Utc::now() - chrono::TimeDelta::hours(1),
            )),
            Err(ProblemCode::Unauthorized),
        );
        check(
            bearer(
                mint_hs256(
                    &SecretString::from("other"),
                    Some(&acme),
                    "api:stored_data",
                    later,
                )
                .unwrap(),
            ),
            Err(ProblemCode::Unauthorized),
        );
        check(None, Err(ProblemCode::Unauthorized));
        check(Some("Basic abc".into()), Err(ProblemCode::Unauthorized));
        check(
            Some("Bearer not.a.jwt".into()),
            Err(ProblemCode::Unauthorized),
        );
    }

    /// A token with any claims, signed with `secret`.
    fn signed(secret: &str, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn detail(verifier: &Verifier, token: &str) -> Result<Principal, (ProblemCode, String)> {
        verifier
            .verify(Some(&format!("Bearer {token}")))
            .map_err(|p| (p.code, p.detail.clone()))
    }

    #[test]
    fn not_before_issuer_and_audience() {
        let secret = "0123456789abcdef0123456789abcdef";
        let key = SecretString::from(secret);
        let now = Utc::now().timestamp();
        let acme = Ok(Principal {
            tenant: Some(TenantId::parse("acme").unwrap()),
            admin: false,
        });
        let claims = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({
                "scope": "api:stored_data", "tenant_id": "acme", "exp": now + 3600,
            });
            if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
                claims.extend(extra.clone());
            }
            signed(secret, &claims)
        };
        let unauthorized = |text: &str| Err((ProblemCode::Unauthorized, text.to_owned()));

        let plain = Verifier::new(Some(&key), None).unwrap();
        let early = claims(serde_json::json!({"nbf": now + 600}));
        assert_eq!(
            detail(&plain, &early),
            unauthorized("The token is not valid yet")
        );
        let started = claims(serde_json::json!({"nbf": now - 1}));
        assert_eq!(detail(&plain, &started), acme);
        // Without auth.issuer / auth.audience neither claim is looked at.
        let foreign = claims(serde_json::json!({"iss": "elsewhere", "aud": "other"}));
        assert_eq!(detail(&plain, &foreign), acme);

        let strict = Verifier::new(Some(&key), None)
            .unwrap()
            .with_issuer_audience(Some("https://idp.example"), Some("refreshd"));
        let good =
            claims(serde_json::json!({"iss": "https://idp.example", "aud": ["x", "refreshd"]}));
        assert_eq!(detail(&strict, &good), acme);
        assert_eq!(
            detail(
                &strict,
                &claims(serde_json::json!({"iss": "elsewhere", "aud": "refreshd"}))
            ),
            unauthorized("The token's issuer is not accepted")
        );
        assert_eq!(
            detail(
                &strict,
                &claims(serde_json::json!({"iss": "https://idp.example", "aud": "other"}))
            ),
            unauthorized("The token's audience is not accepted")
        );
        assert_eq!(
            detail(&strict, &claims(serde_json::json!({"aud": "refreshd"}))),
            unauthorized("The token is invalid")
        );
        assert_eq!(
            detail(
                &strict,
                &claims(serde_json::json!({"iss": "https://idp.example"}))
            ),
            unauthorized("The token is invalid")
        );
    }
}
