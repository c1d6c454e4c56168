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
        let mut text = body.to_string();
        if text.len() > MAX_PROBLEM_BYTES {
            // A bounded body whatever the members: keep the status and detail only.
            let detail = cut(&self.detail, 1024);
            text = json!({
                "type": "about:blank",
                "title": self.status.canonical_reason().unwrap_or("Error"),
                "status": self.status.as_u16(),
                "detail": detail,
                "truncated": true,
            })
            .to_string();
        }
        let mut response = (self.status, text).into_response();
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

/// At most this many violations are listed in a 422 body (the body says how many there were).
pub const MAX_VIOLATIONS: usize = 20;
/// Longest violation message kept, in bytes (longer ones are cut on a character boundary).
const MAX_MESSAGE_BYTES: usize = 300;
/// Longest violation pointer kept, in bytes (longer ones are cut at a token boundary).
const MAX_POINTER_BYTES: usize = 300;
/// Largest problem body: beyond it the extension members are dropped.
pub const MAX_PROBLEM_BYTES: usize = 16 * 1024;

/// Keywords whose messages may name something of the request (an undeclared property name,
/// the closest alternative's own violations): replaced by a fixed text.
const REQUEST_NAMING: [(&str, &str); 5] = [
    (
        "additionalProperties",
        "has a property the schema does not declare",
    ),
    (
        "unevaluatedProperties",
        "has a property the schema does not declare",
    ),
    ("propertyNames", "has a property name that is not allowed"),
    ("anyOf", "matches none of the allowed alternatives (anyOf)"),
    (
        "oneOf",
        "matches none or several of the alternatives, exactly one is allowed (oneOf)",
    ),
];

/// Every property name the schema declares (the keys of every `properties`, at any depth),
/// and the names it requires: the only names a problem body may repeat.
fn declared_names(schema: &Value, out: &mut std::collections::HashSet<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(props)) = map.get("properties") {
                out.extend(props.keys().cloned());
            }
            if let Some(Value::Array(req)) = map.get("required") {
                out.extend(req.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            map.values().for_each(|v| declared_names(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| declared_names(v, out)),
        _ => {}
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A pointer that names only what the schema declares: it stops before the first token that
/// is neither an array index nor a declared property name (that token came from the request).
fn scrub_pointer(pointer: &str, names: &std::collections::HashSet<String>) -> String {
    let mut out = String::new();
    if pointer.is_empty() {
        return out;
    }
    for raw in pointer.trim_start_matches('/').split('/') {
        let token = raw.replace("~1", "/").replace("~0", "~");
        let is_index = (1..=10).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_digit());
        if !is_index && !names.contains(&token) {
            break;
        }
        if out.len() + raw.len() + 1 > MAX_POINTER_BYTES {
            break;
        }
        out.push('/');
        out.push_str(raw);
    }
    out
}

impl Problem {
    /// 422 for data that breaks the schema of `version`: at most [`MAX_VIOLATIONS`]
    /// violations, each with a JSON pointer (cut before any name the schema does not declare),
    /// the rule (`keyword`) and a message built from the schema alone; never a request value.
    pub fn schema_violations(
        version: &evbus::schema::EventVersion,
        errors: &evbus::schema::ValidationErrors,
    ) -> Self {
        let mut names = std::collections::HashSet::new();
        declared_names(version.schema(), &mut names);
        let mut violations: Vec<Value> = Vec::new();
        for v in errors.iter() {
            let pointer = scrub_pointer(v.pointer(), &names);
            let message = REQUEST_NAMING
                .iter()
                .find(|(k, _)| *k == v.keyword())
                .map_or_else(
                    || cut(v.message(), MAX_MESSAGE_BYTES),
                    |(_, m)| (*m).to_owned(),
                );
            let item =
                json!({"pointer": pointer, "keyword": cut(v.keyword(), 64), "message": message});
            if !violations.contains(&item) {
                violations.push(item);
            }
            if violations.len() == MAX_VIOLATIONS {
                break;
            }
        }
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the data breaks the schema of its event type ({} violation{}{})",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" },
                if errors.len() > violations.len() {
                    format!("; the first {} are listed", violations.len())
                } else {
                    String::new()
                }
            ),
        )
        .with("violations", Value::Array(violations))
        .with("violations_total", json!(errors.len()))
    }

    /// 400 for a request that is not a CloudEvent. The decoder's message may quote the
    /// request (an extension name, a value), so only a standard attribute it names is kept.
    pub fn invalid_cloudevent(decoder_message: &str) -> Self {
        const ATTRIBUTES: [&str; 10] = [
            "specversion",
            "id",
            "source",
            "type",
            "datacontenttype",
            "dataschema",
            "subject",
            "time",
            "data",
            "data_base64",
        ];
        let named = decoder_message
            .split('`')
            .skip(1)
            .step_by(2)
            .find_map(|name| ATTRIBUTES.iter().find(|a| **a == name));
        let detail = match named {
            Some(a) => format!(
                "not a valid CloudEvent: attribute `{a}` is missing or malformed (CloudEvents 1.0 JSON format)"
            ),
            None => "not a valid CloudEvent: an attribute is missing or malformed; extension \
                     names are 1 to 20 lowercase letters or digits and values are strings, \
                     numbers or booleans (CloudEvents 1.0 JSON format)"
                .to_owned(),
        };
        Problem::bad_request(detail)
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
