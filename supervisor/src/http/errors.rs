//! Every HTTP error is JSON (`protocol::web::ErrorBody`) with a status that fits its code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use protocol::api::{ApiErrorCode, ApiResponse};
use protocol::web::{ErrorBody, ErrorCode, HttpErrorCode};

/// An answer that is not a success.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// Its status.
    pub status: StatusCode,
    /// Its body.
    pub body: ErrorBody,
}

impl HttpError {
    /// An error of the HTTP layer.
    pub fn http(code: HttpErrorCode, error: impl Into<String>) -> Self {
        let status = match code {
            HttpErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpErrorCode::Forbidden => StatusCode::FORBIDDEN,
            HttpErrorCode::NotFound => StatusCode::NOT_FOUND,
            HttpErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HttpErrorCode::NotGcode => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                code: ErrorCode::Http(code),
                retry_after_ms: None,
            },
        }
    }

    /// A refusal of the operation (the MQTT API's code).
    pub fn api(code: ApiErrorCode, error: impl Into<String>, retry_after_ms: Option<u64>) -> Self {
        Self {
            status: status_of(code),
            body: ErrorBody {
                error: error.into(),
                code: ErrorCode::Api(code),
                retry_after_ms,
            },
        }
    }

    /// A bad argument.
    pub fn invalid(error: impl Into<String>) -> Self {
        Self::api(ApiErrorCode::Invalid, error, None)
    }

    /// The machine's refusal, from its answer.
    pub fn refused(r: ApiResponse) -> Self {
        Self::api(
            r.code.unwrap_or(ApiErrorCode::Internal),
            r.error.unwrap_or_else(|| "refused".into()),
            r.retry_after_ms,
        )
    }
}

/// The HTTP status of each refusal.
pub fn status_of(code: ApiErrorCode) -> StatusCode {
    use ApiErrorCode as C;
    match code {
        C::Invalid | C::ReservedClient => StatusCode::BAD_REQUEST,
        C::Busy => StatusCode::TOO_MANY_REQUESTS,
        C::UnknownJob | C::UnknownPrinter => StatusCode::NOT_FOUND,
        C::FileNotStored
        | C::UploadRefused
        | C::JobEnded
        | C::NotRequeueable
        | C::AlreadyRequeued
        | C::NotQueued
        | C::PrinterNotDone
        | C::PrinterUnreachable
        | C::WrongPhase
        | C::PrinterOnline
        | C::PrinterHasJob => StatusCode::CONFLICT,
        C::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let retry = self.body.retry_after_ms;
        let mut resp = (self.status, super::rest::json(&self.body)).into_response();
        if let Some(ms) = retry {
            if let Ok(v) = HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"printloop\""),
            );
        }
        resp
    }
}

/// Anything not routed.
pub async fn not_found(uri: axum::http::Uri) -> HttpError {
    HttpError::http(
        HttpErrorCode::NotFound,
        format!(
            "no such endpoint: {} (the API is under /api/v1, see /api/v1/openapi.json)",
            shown(uri.path(), 100)
        ),
    )
}

/// `s` for a message: control characters escaped, at most `max` characters.
pub fn shown(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_debug).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// A request body, refused as JSON when it is too large or cannot be read (axum's own
/// rejection is plain text).
pub(crate) struct Body(pub axum::body::Bytes);

#[axum::async_trait]
impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = HttpError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, HttpError> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(Body(b)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(HttpError::http(
                HttpErrorCode::TooLarge,
                "the body is larger than this endpoint takes (64 KiB of JSON; 1 MiB per upload chunk)",
            )),
            Err(e) => Err(HttpError::invalid(format!("the body cannot be read: {}", e.body_text()))),
        }
    }
}
