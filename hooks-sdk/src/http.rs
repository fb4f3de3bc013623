//! A small HTTP/1.1 client that reaches only the `host:port` pairs the agent allows, so a
//! ValidateService hook can probe the application's local endpoint and nothing else.
//!
//! ```no_run
//! # fn f() -> shoal_hooks::Result<()> {
//! let answer = shoal_hooks::http::post("http://127.0.0.1:8080/predict")
//!     .header("content-type", "application/json")
//!     .body(br#"{"input":[1.0,2.0]}"#.to_vec())
//!     .send()?;
//! assert_eq!(answer.status, 200);
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

/// An HTTP request; build it with [`get`], [`post`] or [`request`], send it with
/// [`Request::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Option<Duration>,
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a request got no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The destination is not on the hook's allow-list.
    Denied(String),
    /// The URL could not be parsed or uses an unsupported scheme.
    InvalidUrl(String),
    /// Connecting, sending or receiving failed.
    Transport(String),
    /// No answer within the timeout.
    Timeout,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(why) => write!(f, "HTTP request denied: {why}"),
            HttpError::InvalidUrl(why) => write!(f, "invalid URL: {why}"),
            HttpError::Transport(why) => write!(f, "HTTP transport error: {why}"),
            HttpError::Timeout => f.write_str("HTTP request timed out"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A request with any method.
pub fn request(method: &str, url: &str) -> Request {
    Request {
        method: method.to_string(),
        url: url.to_string(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout: None,
    }
}

/// A GET request.
pub fn get(url: &str) -> Request {
    request("GET", url)
}

/// A POST request.
pub fn post(url: &str) -> Request {
    request("POST", url)
}

impl Request {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request through the agent (or, natively, through the test host).
    pub fn send(self) -> Result<Response, HttpError> {
        #[cfg(target_arch = "wasm32")]
        return send_wasm(self);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::answer_http(self);
    }
}

impl Response {
    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(&self.body)
    }

    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(target_arch = "wasm32")]
fn send_wasm(req: Request) -> Result<Response, HttpError> {
    use crate::bindings::shoal::hooks::http as wit;
    let timeout_ms = req
        .timeout
        .map(|t| t.as_millis().min(u32::MAX as u128) as u32);
    let answer = wit::send(&wit::Request {
        method: req.method,
        url: req.url,
        headers: req.headers,
        body: req.body,
        timeout_ms,
    });
    match answer {
        Ok(r) => Ok(Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }),
        Err(wit::Error::Denied(why)) => Err(HttpError::Denied(why)),
        Err(wit::Error::InvalidUrl(why)) => Err(HttpError::InvalidUrl(why)),
        Err(wit::Error::Transport(why)) => Err(HttpError::Transport(why)),
        Err(wit::Error::Timeout) => Err(HttpError::Timeout),
    }
}
