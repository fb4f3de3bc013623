//! The host side of the hooks' `http` import: an HTTP/1.1 client that reaches only the
//! `host:port` pairs on the hook's allow-list. The check happens before any connection is
//! made; redirects are not followed (a redirect could point anywhere) and no proxy from the
//! environment is used. Requests are bounded in time by the hook's own deadline.

use std::time::{Duration, Instant};

use super::sandbox::HttpAllow;

/// The most of a response body a hook may receive.
const MAX_BODY: u64 = 16 << 20;
/// The longest a single request may take when neither the hook nor its deadline say less.
const MAX_REQUEST_TIME: Duration = Duration::from_secs(30);

/// A request as the hook sent it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why a request got no answer; mirrors the WIT `http.error` variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Denied(String),
    InvalidUrl(String),
    Transport(String),
    Timeout,
}

/// The destinations one hook may reach, and its deadline.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    pub allow: Vec<HttpAllow>,
    pub deadline: Instant,
}

impl HttpPolicy {
    /// Checks the URL against the allow-list; returns it parsed.
    pub fn check(&self, url: &str) -> Result<url::Url, HttpError> {
        let parsed =
            url::Url::parse(url).map_err(|e| HttpError::InvalidUrl(format!("{url}: {e}")))?;
        if parsed.scheme() != "http" {
            return Err(HttpError::InvalidUrl(format!(
                "{url}: only http:// is supported, not {}://",
                parsed.scheme()
            )));
        }
        let host = match parsed.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(h) => h.to_string().to_ascii_lowercase(),
            None => return Err(HttpError::InvalidUrl(format!("{url}: no host"))),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        if self.allow.iter().any(|a| a.host == host && a.port == port) {
            Ok(parsed)
        } else if self.allow.is_empty() {
            Err(HttpError::Denied(format!(
                "{host}:{port} is not allowed: this hook may not use the network"
            )))
        } else {
            let allowed: Vec<String> = self
                .allow
                .iter()
                .map(|a| format!("{}:{}", a.host, a.port))
                .collect();
            Err(HttpError::Denied(format!(
                "{host}:{port} is not allowed (allowed: {})",
                allowed.join(", ")
            )))
        }
    }

    /// Sends the request if allowed. Blocking: call it off the async executor.
    pub fn send(&self, req: Request) -> Result<Response, HttpError> {
        let url = self.check(&req.url)?;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = req
            .timeout
            .unwrap_or(MAX_REQUEST_TIME)
            .min(MAX_REQUEST_TIME)
            .min(remaining);
        if timeout.is_zero() {
            return Err(HttpError::Timeout);
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .proxy(None)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        let method = ureq::http::Method::from_bytes(req.method.as_bytes()).map_err(|_| {
            HttpError::InvalidUrl(format!("`{}` is not an HTTP method", req.method))
        })?;
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(url.as_str());
        for (name, value) in &req.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(req.body)
            .map_err(|e| HttpError::InvalidUrl(format!("{}: {e}", req.url)))?;
        let mut response = agent.run(request).map_err(|e| match e {
            ureq::Error::Timeout(_) => HttpError::Timeout,
            e => HttpError::Transport(format!("{}: {e}", req.url)),
        })?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => HttpError::Timeout,
                e => HttpError::Transport(format!("{}: reading the body: {e}", req.url)),
            })?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> HttpPolicy {
        HttpPolicy {
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    #[test]
    fn only_listed_destinations_pass() {
        let p = policy(&["127.0.0.1:8080"]);
        assert!(p.check("http://127.0.0.1:8080/predict").is_ok());
        let denied = |u: &str| matches!(p.check(u), Err(HttpError::Denied(_)));
        assert!(denied("http://127.0.0.1:8081/"));
        assert!(denied("http://localhost:8080/"));
        assert!(denied("http://127.0.0.1/"));
        assert!(denied("http://169.254.169.254/latest/meta-data/"));
        // Userinfo does not smuggle a different host past the check.
        assert!(denied("http://127.0.0.1:8080@10.0.0.1:8080/"));
        assert!(matches!(
            p.check("https://127.0.0.1:8080/"),
            Err(HttpError::InvalidUrl(_))
        ));
        assert!(matches!(
            p.check("not a url"),
            Err(HttpError::InvalidUrl(_))
        ));
    }

    #[test]
    fn no_allow_list_means_no_network() {
        let Err(HttpError::Denied(why)) = policy(&[]).check("http://127.0.0.1:80/") else {
            panic!("expected a denial");
        };
        assert!(why.contains("may not use the network"), "{why}");
    }

    #[test]
    fn a_real_request_to_an_allowed_port_gets_its_answer() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /health HTTP/1.1"));
            s.write_all(
                b"HTTP/1.1 302 Found\r\nLocation: http://10.0.0.1/\r\nContent-Length: 2\r\n\r\nno",
            )
            .unwrap();
        });
        let p = policy(&[&format!("127.0.0.1:{port}")]);
        let r = p
            .send(Request {
                method: "GET".into(),
                url: format!("http://127.0.0.1:{port}/health"),
                headers: vec![],
                body: vec![],
                timeout: None,
            })
            .unwrap();
        // The redirect is handed to the hook, not followed.
        assert_eq!((r.status, r.body.as_slice()), (302, &b"no"[..]));
        server.join().unwrap();
    }
}
