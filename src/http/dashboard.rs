//! The dashboard: a single-page app served by the binary at `/`, its files at `/ui/{file}`.
//!
//! The files under `dashboard/` are embedded at compile time, so the dashboard works offline
//! and needs nothing beside the binary; its charting library is vendored from npm with its
//! licence (`dashboard/vendor/`). The page calls the public API with the keys the user signs in
//! with (kept in the browser's session storage); it has no API of its own.
//!
//! Every file is answered with a strong `ETag` (its BLAKE3 digest) and `Cache-Control: no-cache`,
//! so a browser revalidates and gets `304` until the binary changes; gzip when the client
//! accepts it (compressed once, on first use). A strict Content-Security-Policy allows only
//! the dashboard's own scripts, styles and connections.

use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::http::errors::ApiError;

/// One embedded file.
struct Asset {
    /// Its name under `/ui/` (and under `dashboard/` in the repository).
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Every file of `dashboard/` (a unit test checks that none is missing).
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("app.css", CSS),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("charts.js", JS),
    asset!("ui.js", JS),
    asset!("views/live.js", JS),
    asset!("views/series.js", JS),
    asset!("views/top.js", JS),
    asset!("views/funnel.js", JS),
    asset!("views/data.js", JS),
    asset!("views/admin.js", JS),
    asset!("vendor/uplot/uPlot.iife.min.js", JS),
    asset!("vendor/uplot/uPlot.min.css", CSS),
    asset!("vendor/uplot/LICENSE", TEXT),
    asset!("vendor/uplot/VERSION", TEXT),
];

/// The page itself.
const INDEX: &str = "index.html";

/// Only the dashboard's own files and the API of the same origin (`'self'` covers the
/// WebSocket of the same host); nothing inline, no frames.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// An asset with what is computed once: its ETag and its gzip form (with its own ETag, as a
/// different representation).
struct Prepared {
    asset: &'static Asset,
    etag: String,
    gzip: Option<(String, actix_web::web::Bytes)>,
}

static PREPARED: LazyLock<Vec<Prepared>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = blake3::hash(asset.body).to_hex();
            Prepared {
                asset,
                etag: format!("\"{}\"", &digest[..32]),
                gzip: gzip(asset.body)
                    .map(|body| (format!("\"{}-gz\"", &digest[..32]), body.into())),
            }
        })
        .collect()
});

/// The gzip form, when it is smaller by a useful margin.
fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).ok()?;
    let compressed = encoder.finish().ok()?;
    (compressed.len() + 256 < body.len()).then_some(compressed)
}

/// `GET /`: the page.
pub async fn index(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    serve(&req, INDEX)
}

/// `GET /ui/{file}`: one of the page's files.
pub async fn file(req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    serve(&req, &path)
}

fn serve(req: &HttpRequest, name: &str) -> Result<HttpResponse, ApiError> {
    let Some(prepared) = PREPARED.iter().find(|p| p.asset.name == name) else {
        return Err(ApiError::NotFound(format!(
            "the dashboard has no file {name:?}"
        )));
    };
    let gzip = prepared.gzip.as_ref().filter(|_| accepts_gzip(req));
    let etag = gzip.map_or(prepared.etag.as_str(), |(etag, _)| etag.as_str());
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::VARY, "Accept-Encoding"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    if matches_etag(req, etag) {
        return Ok(response
            .status(actix_web::http::StatusCode::NOT_MODIFIED)
            .finish());
    }
    response.content_type(prepared.asset.content_type);
    match gzip {
        Some((_, compressed)) => Ok(response
            .insert_header((header::CONTENT_ENCODING, "gzip"))
            .body(compressed.clone())),
        None => Ok(response.body(prepared.asset.body)),
    }
}

fn matches_etag(req: &HttpRequest, etag: &str) -> bool {
    (req.headers().get_all(header::IF_NONE_MATCH))
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        })
}

fn accepts_gzip(req: &HttpRequest) -> bool {
    (req.headers().get_all(header::ACCEPT_ENCODING))
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            // `gzip;q=0` refuses it.
            let refused = parts.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every file under `dashboard/` is embedded, so adding one without listing it fails here.
    #[test]
    fn every_dashboard_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let name = path.strip_prefix(&root).unwrap().to_string_lossy();
                    found.push(name.replace('\\', "/"));
                }
            }
        }
        found.sort();
        let mut listed: Vec<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn gzip_is_offered_only_when_accepted() {
        let accepts = |value: &str| {
            let req = actix_web::test::TestRequest::default()
                .insert_header((header::ACCEPT_ENCODING, value))
                .to_http_request();
            accepts_gzip(&req)
        };
        assert!(accepts("gzip, deflate, br"));
        assert!(accepts("br;q=1.0, GZIP;q=0.5"));
        assert!(!accepts("br"));
        assert!(!accepts("gzip;q=0"));
    }
}
