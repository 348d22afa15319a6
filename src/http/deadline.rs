//! The body deadline: every request body must arrive whole within `server.body_timeout` of its
//! head, on every route. A stalled or trickling upload then holds its connection, buffer and
//! handler no longer than that, however it is read (the ingestion reader, actix's JSON
//! extractor). Past the deadline the body stream ends with a [`timed_out`] error, which the
//! ingestion endpoints answer with 408 and close the connection.

use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest};
use actix_web::error::PayloadError;
use actix_web::http::header;
use futures_util::StreamExt;

/// The error a body stream ends with past its deadline.
pub fn timed_out() -> PayloadError {
    PayloadError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the request body did not arrive within server.body_timeout",
    ))
}

/// Whether `error` is the deadline's.
pub fn is_timeout(error: &PayloadError) -> bool {
    matches!(error, PayloadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

/// Puts the deadline on `req`'s body, if it has one.
pub fn limit_body(req: &mut ServiceRequest, timeout: Duration) {
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    if !has_body {
        return;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let (_, payload) = req.parts_mut();
    let inner = payload.take();
    let limited = futures_util::stream::unfold(Some(inner), move |state| async move {
        let mut inner = state?;
        match tokio::time::timeout_at(deadline, inner.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(inner))),
            Ok(None) => None,
            // One error, then the stream ends.
            Err(_) => Some((Err(timed_out()), None)),
        }
    });
    let boxed: std::pin::Pin<Box<dyn futures_util::Stream<Item = _>>> = Box::pin(limited);
    req.set_payload(Payload::Stream { payload: boxed });
}
