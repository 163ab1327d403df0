//! Who is calling: an API token in `Authorization: Bearer …`, in `X-Api-Key` (what slicers
//! send), or in the dashboard's session cookie. Handlers say what they need by taking
//! [`Viewer`] or [`Operator`].
//!
//! CSRF: the cookie is `HttpOnly; SameSite=Strict`, and a cookie-signed request that is not a
//! GET must also carry `X-Printloop: 1`, a header no cross-site form can send and no
//! cross-site script may send without a CORS preflight (which this server never grants).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use protocol::web::{HttpErrorCode, Role, SessionInfo, SignIn};

use super::errors::{Body, HttpError};
use super::tokens::Principal;
use super::App;

/// The session cookie's name.
pub const COOKIE: &str = "printloop_session";
/// The header a cookie-signed change must carry.
pub const CSRF_HEADER: &str = "x-printloop";
/// How long a browser stays signed in.
const SESSION_S: u64 = 30 * 24 * 3600;

/// Where the token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Header,
    Cookie,
}

fn presented(headers: &HeaderMap) -> Option<(String, Source)> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some((t.trim().to_owned(), Source::Header));
        }
    }
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some((v.trim().to_owned(), Source::Header));
    }
    cookie(headers).map(|t| (t, Source::Cookie))
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The caller, whatever its role.
pub(crate) fn principal(app: &App, parts: &Parts) -> Result<Principal, HttpError> {
    let Some((token, source)) = presented(&parts.headers) else {
        return Err(HttpError::http(
            HttpErrorCode::Unauthorized,
            "no API token: send `Authorization: Bearer <token>` (or X-Api-Key), or sign in; \
             `printloop tokens add NAME --role operator` makes one",
        ));
    };
    let Some(who) = app.tokens.verify(&token) else {
        return Err(HttpError::http(
            HttpErrorCode::Unauthorized,
            "unknown API token (removed, mistyped, or from another farm)",
        ));
    };
    let safe = matches!(parts.method, Method::GET | Method::HEAD);
    if source == Source::Cookie && !safe && parts.headers.get(CSRF_HEADER).is_none() {
        return Err(HttpError::http(
            HttpErrorCode::Forbidden,
            "a change signed by the session cookie must carry the header `X-Printloop: 1`",
        ));
    }
    Ok(who)
}

/// A caller that may read.
pub(crate) struct Viewer(pub Principal);

/// A caller that may act.
pub(crate) struct Operator(pub Principal);

#[axum::async_trait]
impl FromRequestParts<App> for Viewer {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, HttpError> {
        principal(app, parts).map(Viewer)
    }
}

#[axum::async_trait]
impl FromRequestParts<App> for Operator {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, HttpError> {
        let who = principal(app, parts)?;
        if who.role != Role::Operator {
            return Err(HttpError::http(
                HttpErrorCode::Forbidden,
                format!(
                    "token {:?} is a viewer's: it may read, not act (an operator's token may)",
                    who.name.as_str()
                ),
            ));
        }
        Ok(Operator(who))
    }
}

/// `GET /api/v1/session`: who is signed in.
pub(crate) async fn whoami(Viewer(who): Viewer) -> Response {
    super::rest::json(&SessionInfo {
        name: who.name.as_str().to_owned(),
        role: who.role,
    })
    .into_response()
}

/// `POST /api/v1/session`: sign a browser in with a token (sets the session cookie).
pub(crate) async fn sign_in(
    State(app): State<App>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, HttpError> {
    // A cross-site form must not sign a browser in to someone else's session either.
    if headers.get(CSRF_HEADER).is_none() {
        return Err(HttpError::http(
            HttpErrorCode::Forbidden,
            "signing in must carry the header `X-Printloop: 1`",
        ));
    }
    let req: SignIn = super::rest::parse(&body)?;
    let Some(who) = app.tokens.verify(req.token.trim()) else {
        tracing::warn!("sign-in with an unknown token refused");
        return Err(HttpError::http(
            HttpErrorCode::Unauthorized,
            "unknown API token",
        ));
    };
    tracing::info!(name = %who.name, role = ?who.role, "browser signed in");
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_S}",
        req.token.trim()
    );
    let mut resp = super::rest::json(&SessionInfo {
        name: who.name.as_str().to_owned(),
        role: who.role,
    })
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `DELETE /api/v1/session`: sign out (clears the cookie).
pub(crate) async fn sign_out() -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "printloop_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}
