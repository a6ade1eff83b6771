//! The web dashboard: one static page and its script, embedded in the binary, which draw the
//! daemons and jobs from the API (`mr/daemons`, `mr/jobs`) and follow each job's events live.

use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// The paths of the page and its script: they hold no data, so they are served without the
/// API's token (the script sends it with every call it makes).
pub(super) const PUBLIC: [&str; 2] = ["/", "/dashboard.js"];

pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            PUBLIC[0],
            get(|| async { asset(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            PUBLIC[1],
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
}

fn asset(body: &'static str, kind: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // The page runs only its own script and talks only to this API.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
                ),
            ),
        ],
        body,
    )
}
