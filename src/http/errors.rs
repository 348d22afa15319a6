//! The one place where errors become HTTP responses.
//!
//! Every error is answered as `application/problem+json` (RFC 9457): `type`, `title`, `status`,
//! `detail`, plus `errors` (rejected events) where it applies. Status codes follow the public
//! contract in DESIGN.md.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::http::segment::Rejection;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<Rejection>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// A new version of a schema that breaks its compatibility mode.
    #[error("{detail}")]
    Conflict {
        detail: String,
        breaking_changes: Vec<crate::schema::Change>,
    },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The client was too slow; the connection is closed after the answer.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    RateLimited {
        detail: String,
        retry_after: Duration,
        limit: u32,
        remaining: u32,
    },
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after_secs: u64,
    },
    /// This node's role does not serve the route (cluster mode).
    #[error("{0}")]
    NotImplemented(String),
    /// The text is logged with an error id; the client sees only the id.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError::Unavailable {
            detail: detail.into(),
            retry_after_secs: 1,
        }
    }

    fn slug_and_title(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest { .. } => ("bad-request", "Bad request"),
            ApiError::Unauthorized(_) => ("unauthorized", "Missing or unknown key"),
            ApiError::Forbidden(_) => ("forbidden", "Key not allowed here"),
            ApiError::NotFound(_) => ("not-found", "Not found"),
            ApiError::Conflict { .. } => ("incompatible-schema", "Incompatible schema version"),
            ApiError::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed"),
            ApiError::RequestTimeout(_) => ("request-timeout", "Request timeout"),
            ApiError::PayloadTooLarge(_) => ("payload-too-large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => (
                "unsupported-media-type",
                "Unsupported media type or encoding",
            ),
            ApiError::RateLimited { .. } => ("rate-limited", "Rate limit exceeded"),
            ApiError::Unavailable { .. } => ("unavailable", "Temporarily unavailable"),
            ApiError::NotImplemented(_) => ("not-implemented", "Not served by this node"),
            ApiError::Internal(_) => ("internal", "Internal error"),
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "<[Rejection]>::is_empty")]
    errors: &'a [Rejection],
    #[serde(skip_serializing_if = "Option::is_none")]
    breaking_changes: Option<&'a [crate::schema::Change]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_id: Option<String>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let (slug, title) = self.slug_and_title();
        let errors: &[Rejection] = match self {
            ApiError::BadRequest { errors, .. } => errors,
            _ => &[],
        };
        let mut error_id = None;
        let detail = match self {
            // Internal text (paths, engine messages) is for the operator's log only.
            ApiError::Internal(text) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(error_id = %id, error = %text, "request failed: internal error");
                let detail =
                    format!("internal error; the server log has its details under error id {id}");
                error_id = Some(id);
                detail
            }
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("https://statsremote.dev/problems/{slug}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
            breaking_changes: match self {
                ApiError::Conflict {
                    breaking_changes, ..
                } => Some(breaking_changes),
                _ => None,
            },
            error_id,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, "application/problem+json"));
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer, Basic realm=\"statsremote\""),
                ));
            }
            ApiError::RateLimited {
                retry_after,
                limit,
                remaining,
                ..
            } => {
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                response.insert_header((header::RETRY_AFTER, seconds.to_string()));
                response.insert_header(("RateLimit-Limit", limit.to_string()));
                response.insert_header(("RateLimit-Remaining", remaining.to_string()));
                response.insert_header(("RateLimit-Reset", seconds.to_string()));
            }
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::RequestTimeout(_) => {
                // The rest of a slow body may still be on its way: the connection cannot be
                // reused.
                response.force_close();
            }
            _ => {}
        }
        response.body(body)
    }
}

/// Problem+json for actix's own extractor errors (bad JSON body, query string, path).
pub fn extractor_error(what: &'static str, err: impl std::fmt::Display) -> actix_web::Error {
    ApiError::bad_request(format!("invalid {what}: {err}")).into()
}
