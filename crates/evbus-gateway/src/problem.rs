//! RFC 9457 problem details: every error the gateway answers is `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// The media type of problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem: status, title, detail and extension members.
///
/// Details never quote request data: they name what was wrong (a JSON pointer, an attribute)
/// but not the values, so a payload cannot leak through an error body.
#[derive(Clone, Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem with `status` and a human `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            status,
            detail: detail.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Adds an extension member.
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.extra.insert(name.to_owned(), value);
        self
    }

    /// Sets `Retry-After` (seconds).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// 400.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }
    /// 401, with `WWW-Authenticate: Bearer`.
    pub fn unauthorized() -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required: Authorization: Bearer evb_…",
        )
    }
    /// 403.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }
    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }
    /// 500; the detail is generic, the cause goes to the log.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; the gateway log has the details",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Value::Object(map) = &mut body {
            map.extend(self.extra);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        Problem::internal(e)
    }
}

/// Turns framework errors (a rejected path, query or body; 404 and 405 of the router) into
/// problems. Their original text may quote request input, so only the status is kept.
pub(crate) async fn normalise(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if (status.is_client_error() || status.is_server_error()) && !is_problem {
        let detail = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large",
            StatusCode::NOT_FOUND => "no such resource",
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this resource",
            StatusCode::REQUEST_TIMEOUT => "the request took too long",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported content type",
            _ => "the request could not be processed",
        };
        return Problem::new(status, detail).into_response();
    }
    response
}
