//! Who is calling: tenant keys and the admin token.
//!
//! A key may come as HTTP Basic (the write key as user name, as Segment SDKs send it; the
//! password is ignored), as `Authorization: Bearer <key>`, or (ingestion only) as `writeKey` in
//! the body. Missing or unknown → 401; a key of the wrong kind (a read key sending events, a
//! tenant key on the admin API) → 403. A key only ever reaches its own tenant's data, because
//! every tenant endpoint takes the tenant from the key, never from the request.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::HttpRequest;
use base64::Engine;

use crate::http::errors::ApiError;
use crate::tenant::{KeyCheck, KeyKind, TenantDirectory, TenantRecord};

/// The credential in the `Authorization` header, if any.
pub fn header_credential(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not valid text".into()))?
        .trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() {
            return Err(ApiError::Unauthorized("Bearer credential is empty".into()));
        }
        return Ok(Some(rest.to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| {
                ApiError::Unauthorized("Basic credential is not valid base64 text".into())
            })?;
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        let key = if user.is_empty() { password } else { user };
        if key.is_empty() {
            return Err(ApiError::Unauthorized(
                "Basic credential has an empty user name".into(),
            ));
        }
        return Ok(Some(key.to_string()));
    }
    Err(ApiError::Unauthorized(
        "Authorization must use the Basic or Bearer scheme".into(),
    ))
}

/// Resolves a key that must be of kind `needed`.
pub fn tenant_for_key(
    directory: &TenantDirectory,
    key: Option<&str>,
    needed: KeyKind,
) -> Result<Arc<TenantRecord>, ApiError> {
    let Some(key) = key else {
        return Err(ApiError::Unauthorized(match needed {
            KeyKind::Write => "missing write key: send it as HTTP Basic user name, as a Bearer token, or as `writeKey` in the body".into(),
            KeyKind::Read => "missing read key: send `Authorization: Bearer <read key>`".into(),
        }));
    };
    match directory.check_key(key) {
        KeyCheck::Valid(tenant, kind) if kind == needed => Ok(tenant),
        KeyCheck::Valid(_, KeyKind::Read) => Err(ApiError::Forbidden(
            "a read key cannot send events; use the tenant's write key".into(),
        )),
        KeyCheck::Valid(_, KeyKind::Write) => Err(ApiError::Forbidden(
            "a write key cannot read; use the tenant's read key".into(),
        )),
        KeyCheck::Unknown if directory.is_admin(key) => Err(ApiError::Forbidden(
            "the admin token cannot be used as a tenant key".into(),
        )),
        KeyCheck::Unknown => Err(ApiError::Unauthorized("unknown key".into())),
    }
}

/// The tenant whose read key is in the `Authorization` header.
pub fn read_key_tenant(
    req: &HttpRequest,
    directory: &TenantDirectory,
) -> Result<Arc<TenantRecord>, ApiError> {
    let key = header_credential(req)?;
    tenant_for_key(directory, key.as_deref(), KeyKind::Read)
}

/// Requires `Authorization: Bearer <admin token>`.
pub fn require_admin(req: &HttpRequest, directory: &TenantDirectory) -> Result<(), ApiError> {
    let Some(token) = header_credential(req)? else {
        return Err(ApiError::Unauthorized(
            "missing admin token: send `Authorization: Bearer <admin token>`".into(),
        ));
    };
    if directory.is_admin(&token) {
        return Ok(());
    }
    match directory.check_key(&token) {
        KeyCheck::Valid(..) => Err(ApiError::Forbidden(
            "tenant keys cannot use the admin API".into(),
        )),
        KeyCheck::Unknown => Err(ApiError::Unauthorized("unknown admin token".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use actix_web::test::TestRequest;
    use proptest::prelude::*;

    fn credential(value: &str) -> Result<Option<String>, ApiError> {
        let req = TestRequest::default()
            .insert_header((header::AUTHORIZATION, value))
            .to_http_request();
        header_credential(&req)
    }

    #[test]
    fn basic_and_bearer_forms() {
        let basic = base64::engine::general_purpose::STANDARD.encode("sr_write_abc:");
        assert_eq!(
            credential(&format!("Basic {basic}")).unwrap().as_deref(),
            Some("sr_write_abc")
        );
        let password_only = base64::engine::general_purpose::STANDARD.encode(":sr_write_abc");
        assert_eq!(
            credential(&format!("basic {password_only}"))
                .unwrap()
                .as_deref(),
            Some("sr_write_abc")
        );
        assert_eq!(credential("Bearer  tok ").unwrap().as_deref(), Some("tok"));
        assert!(credential("Bearer").is_err());
        assert!(credential("Basic %%%").is_err());
        assert!(credential("Token abc").is_err());
        let none = TestRequest::default().to_http_request();
        assert_eq!(header_credential(&none).unwrap(), None);
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(value in "[ -~]{0,80}") {
            let _ = credential(&value);
            let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
            let _ = credential(&format!("Basic {encoded}"));
        }
    }
}
