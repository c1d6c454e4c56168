//! The integrator portal at `/portal`: a page, one script, one stylesheet and one icon, all
//! embedded in the binary (no CDN, no build step). The page talks to the public HTTP API only,
//! with the key the person typed, which the script keeps in a variable of the tab (never in a
//! cookie, local or session storage, or a URL): the API enforces every scope. See
//! docs/adr/0013-portal.md.
//!
//! Every portal response carries a strict Content-Security-Policy (scripts and styles from
//! this origin only, no inline script or style, Trusted Types required so no HTML string can
//! reach the DOM, requests to this origin only, no framing, no form submission), plus
//! `X-Frame-Options: DENY`, `nosniff`, `no-referrer` and `no-store`.

pub(crate) mod example;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// The Content-Security-Policy of every portal response.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// The portal's routes (no authentication: the page holds no data until a key is given).
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/portal",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route("/portal/", get(|| async { Redirect::permanent("/portal") }))
        // What a browser opened on the gateway's address gets: the portal, not a 404.
        .route("/", get(|| async { Redirect::temporary("/portal") }))
        .route(
            "/portal/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/portal/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/portal/icon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 8] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
        (
            HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_style_or_event_handler() {
        let lower = INDEX.to_ascii_lowercase();
        // Every <script> has a src; no style element or attribute; no on* handlers.
        for (i, _) in lower.match_indices("<script") {
            let tag_end = lower[i..].find('>').map_or(lower.len(), |e| i + e);
            assert!(lower[i..tag_end].contains(" src="), "inline script at {i}");
        }
        assert!(!lower.contains("<style"));
        assert!(!lower.contains(" style="));
        assert!(!lower.contains(" onclick=") && !lower.contains(" onload="));
        assert!(!lower.contains("http://") && !lower.contains("https://"));
    }

    #[test]
    fn the_script_never_writes_html_or_stores_the_key() {
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "localStorage",
            "sessionStorage",
            "document.cookie",
            "indexedDB",
            "eval(",
            "new Function",
            "EventSource",
        ] {
            assert!(!APP_JS.contains(forbidden), "app.js uses {forbidden}");
        }
    }
}
