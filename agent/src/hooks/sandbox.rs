//! The sandbox a hook runs in, as the caller grants it: which host directories it sees
//! (each read-only or read-write, under a guest path), which `host:port` pairs its HTTP
//! client may reach, extra environment variables, a deadline, a memory cap and an output
//! bound. Everything not granted here is denied: no ambient filesystem, network,
//! environment or stdin.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// A host directory made visible to the hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirGrant {
    pub host: PathBuf,
    /// Where the hook sees it, e.g. `/revision`.
    pub guest: String,
    pub writable: bool,
}

impl FromStr for DirGrant {
    type Err = String;

    /// `HOST_PATH[:GUEST_PATH][:ro|:rw]`; the guest path defaults to the host path, access
    /// to read-only.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let writable = match parts.last() {
            Some(&"rw") if parts.len() > 1 => {
                parts.pop();
                true
            }
            Some(&"ro") if parts.len() > 1 => {
                parts.pop();
                false
            }
            _ => false,
        };
        let (host, guest) = match parts.as_slice() {
            [host] => (*host, *host),
            [host, guest] => (*host, *guest),
            _ => return Err(format!("`{s}`: expected HOST_PATH[:GUEST_PATH][:ro|:rw]")),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("`{s}`: empty path"));
        }
        if !guest.starts_with('/') {
            return Err(format!("`{s}`: the guest path `{guest}` must be absolute"));
        }
        Ok(DirGrant {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            writable,
        })
    }
}

/// A `host:port` the hook's HTTP client may reach. The host is compared literally
/// (case-insensitively): allowing `127.0.0.1:8080` does not allow `localhost:8080`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpAllow {
    pub host: String,
    pub port: u16,
}

impl FromStr for HttpAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}`: expected HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("`{s}`: empty host"));
        }
        Ok(HttpAllow {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// What a hook may touch and how long and large it may run.
#[derive(Clone, Debug, Serialize)]
pub struct Sandbox {
    pub dirs: Vec<DirGrant>,
    pub http_allow: Vec<HttpAllow>,
    /// Added to CodeDeploy's variables.
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Linear memory, summed over the hook's memories, in bytes.
    pub memory_limit: usize,
    /// Bytes of output kept whole; beyond it, its first and last halves.
    pub output_limit: usize,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            dirs: Vec::new(),
            http_allow: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(300),
            memory_limit: 256 << 20,
            output_limit: 1 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_grants_parse() {
        let g: DirGrant = "/srv/rev".parse().unwrap();
        assert_eq!((g.guest.as_str(), g.writable), ("/srv/rev", false));
        let g: DirGrant = "/srv/rev:/revision".parse().unwrap();
        assert_eq!(
            (g.host.to_str().unwrap(), g.guest.as_str(), g.writable),
            ("/srv/rev", "/revision", false)
        );
        let g: DirGrant = "/var/app:/work:rw".parse().unwrap();
        assert_eq!((g.guest.as_str(), g.writable), ("/work", true));
        let g: DirGrant = "/var/app:rw".parse().unwrap();
        assert_eq!((g.guest.as_str(), g.writable), ("/var/app", true));
        assert!(
            "/a:relative"
                .parse::<DirGrant>()
                .unwrap_err()
                .contains("must be absolute")
        );
        assert!("/a:/b:/c:rw".parse::<DirGrant>().is_err());
    }

    #[test]
    fn http_allows_parse() {
        assert_eq!(
            "LocalHost:8080".parse::<HttpAllow>().unwrap(),
            HttpAllow {
                host: "localhost".into(),
                port: 8080
            }
        );
        assert_eq!("[::1]:80".parse::<HttpAllow>().unwrap().host, "::1");
        assert!("127.0.0.1".parse::<HttpAllow>().is_err());
        assert!(
            "127.0.0.1:http"
                .parse::<HttpAllow>()
                .unwrap_err()
                .contains("not a port")
        );
    }
}
