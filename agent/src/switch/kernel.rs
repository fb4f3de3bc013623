//! The kernel's part of the switch (decision 0025): a DNAT rule per application that sends
//! each new connection made on this host to the public port straight to the serving
//! revision's port, with no process in the data path, and the kernel's count of the
//! connections open on a port (what a drain waits on).
//!
//! - **The rule.** One nftables table per application, `ip shoal_<12 hex>` (named from the
//!   application's directory, so two agents on one machine never share one), with a `nat`
//!   chain on the `output` hook: `<public address> tcp dport <public port> dnat to
//!   127.0.0.1:<serving port>`. Changing it is one `nft -f -` transaction (flush the chain,
//!   add the rule), so a connection sees the old rule or the new one. Conntrack keeps every
//!   open connection on the port it was given, which is what a drain needs; the rule lives
//!   in the kernel, so traffic flows while the agent (or the proxy) is down.
//! - **Who it serves.** Connections made on the host (a local load balancer, sidecars,
//!   clients on 127.0.0.1). A remote client's packets reach the `prerouting` hook, where
//!   DNAT to 127.0.0.1 needs `route_localnet`, a host-wide change the agent does not make:
//!   they keep going through the proxy, which still holds the public port.
//! - **When it is not used** ([`Unusable`]): no `nft` binary, an IPv6 public address (no
//!   DNAT from IPv6 to 127.0.0.1), a revision that wants the PROXY protocol header (only
//!   the proxy writes it), `forward: proxy`. The proxy then carries every connection, as
//!   before this module.
//!
//! The proxy (`super::Proxy`) calls [`Kernel::follow`] after each answer that moves
//! traffic and [`Kernel::clear`] before each that holds or stops it; the supervisor's
//! pass follows the proxy on every pass and clears while the serving service is down;
//! `lifecycle::switched::stop_all` clears first and calls [`Kernel::remove`] last. So the
//! rule is only ever where the proxy sends a connection itself, or did a moment ago.
//!
//! A rule is cleared by emptying its chain, never by deleting the chain: in a network
//! namespace with no NAT chain left, the kernel unregisters its NAT hooks, and the
//! connections a rule sent on lose their translation mid-flight (their next packets reach
//! the public port as they are, and hang or are reset). `tests/cli_switch.rs` caught that.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::appspec::{Forward, SwitchSpec};
use crate::lifecycle::state::AppDir;

/// Where the agent looks for `nft`: fixed paths, never `$PATH` (the agent runs as root).
const NFT: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];
/// How long one `nft` run may take before it is killed.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of `nft`'s error output is kept for the error.
const MAX_STDERR: usize = 2048;
/// How much of `nft`'s output is read (the list of tables): past what fits its pipe, it
/// would block and be killed at [`NFT_TIMEOUT`] anyway.
const MAX_STDOUT: usize = 64 << 10;

/// Why the kernel rule could not be set or removed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// `nft` ran and refused the change: `stderr` is its own word for it.
    #[error("nft refused the switch's rule in table {table}: {stderr}")]
    Refused { table: String, stderr: String },
    /// `nft` could not be run, or did not finish within its time.
    #[error("running nft for table {table}: {reason}")]
    Run { table: String, reason: String },
}

/// Why the kernel path is not used for an application: the proxy carries its connections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the service asks for `forward: proxy`")]
    Asked,
    #[error("the service wants the PROXY protocol header, which only the proxy writes")]
    ProxyProtocol,
    #[error("the public address {0} is IPv6: no DNAT to 127.0.0.1 from it")]
    Ipv6(IpAddr),
    #[error("no nft binary in {NFT:?}: install nftables for the kernel path")]
    NoNft,
}

/// The rule of one application's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// An empty chain (or no table): connections reach the proxy.
    Cleared,
    /// New connections to `listen` go to 127.0.0.1:`backend`.
    To { listen: SocketAddr, backend: u16 },
}

/// What this process knows of one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// `rule` was set at `at`.
    Set { rule: Rule, at: Instant },
    /// Setting `want` failed at `at` (the chain was cleared instead).
    Failed { want: Rule, at: Instant },
}

/// How long a rule this process set is trusted before it is set again (a firewall
/// reload, or an operator, may have changed the table meanwhile).
const REASSERT: Duration = Duration::from_secs(60);
/// How long after a failed `nft` the same rule is not tried again (and not warned of).
const RETRY: Duration = Duration::from_secs(60);

/// Whether `follow` must run `nft` to have `want`: the pure decision, unit-tested.
fn must_set(known: Option<Known>, want: Rule, now: Instant) -> bool {
    match known {
        Some(Known::Set { rule, at }) => rule != want || now.duration_since(at) >= REASSERT,
        Some(Known::Failed { want: failed, at }) => {
            failed != want || now.duration_since(at) >= RETRY
        }
        None => true,
    }
}

/// What this process last did per table. Empty after a start, so the first call for each
/// table runs `nft`: whatever a previous agent left is replaced.
static KNOWN: Mutex<Option<HashMap<String, Known>>> = Mutex::new(None);

fn known(table: &str) -> Option<Known> {
    let guard = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().and_then(|m| m.get(table).copied())
}

fn remember(table: &str, known: Option<Known>) {
    let mut guard = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    match known {
        Some(k) => map.insert(table.to_string(), k),
        None => map.remove(table),
    };
}

/// The `nft` binary the agent runs, if installed (tests use the same).
pub fn nft_path() -> Option<&'static Path> {
    NFT.iter().map(Path::new).find(|p| p.is_file())
}

/// The nftables table of the application in `dir`: `shoal_` and 12 hex digits of the
/// SHA-256 of its directory's canonical path (so a data directory spelled two ways, or
/// reached through a link, names one table).
pub fn table_name(dir: &AppDir) -> String {
    let path = std::fs::canonicalize(&dir.root).unwrap_or_else(|_| dir.root.clone());
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("shoal_{}", &hex::encode(digest)[..12])
}

/// Whether the kernel path can carry `switch`'s connections on this host.
pub fn usable(switch: &SwitchSpec) -> Result<(), Unusable> {
    if switch.forward == Forward::Proxy {
        return Err(Unusable::Asked);
    }
    if switch.proxy_protocol {
        return Err(Unusable::ProxyProtocol);
    }
    if switch.address.is_ipv6() {
        return Err(Unusable::Ipv6(switch.address));
    }
    nft_path().map(|_| ()).ok_or(Unusable::NoNft)
}

/// The transaction that makes `table` send new connections to `listen` on to
/// 127.0.0.1:`backend` (only syntax that nftables 0.9 reads: no table comments).
fn route_script(table: &str, listen: SocketAddr, backend: u16) -> String {
    // The port first: it is the cheap test, and it alone rules out the host's other
    // connections (the rule is read for the first packet of each).
    let matched = match listen.ip() {
        // Any address of this host's, as the proxy's wildcard bind receives.
        ip if ip.is_unspecified() => "fib daddr type local".to_string(),
        ip => format!("ip daddr {ip}"),
    };
    format!(
        "table ip {table} {{\n  chain output {{\n    \
         type nat hook output priority -100; policy accept;\n  }}\n}}\n\
         flush chain ip {table} output\n\
         add rule ip {table} output tcp dport {port} {matched} dnat to 127.0.0.1:{backend}\n",
        port = listen.port(),
    )
}

/// The transaction that empties `table` and keeps its chain: the chain is what keeps the
/// kernel's NAT hooks registered, and with them the translation of every connection a
/// rule already sent on (without any NAT chain left in the network namespace, those
/// connections' packets would reach the public port untranslated, and die there). The
/// table is declared first, so this holds whether or not it exists.
fn clear_script(table: &str) -> String {
    format!("table ip {table} {{}}\nflush table ip {table}\n")
}

/// The transaction that removes `table`, whether or not it exists (it is declared first).
fn remove_script(table: &str) -> String {
    format!("table ip {table} {{}}\ndelete table ip {table}\n")
}

/// The kernel rule of one application.
#[derive(Debug, Clone)]
pub struct Kernel {
    table: String,
}

impl Kernel {
    pub fn of(dir: &AppDir) -> Self {
        Kernel {
            table: table_name(dir),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Makes the rule match where the proxy now sends new connections: `backend` (when
    /// traffic is neither held nor unrouted) for a switch the kernel path can carry,
    /// else no rule. `nft` runs only when that differs from what this process set, or
    /// [`REASSERT`] after it set it; a rule that failed is tried again after [`RETRY`],
    /// and warned of once. A rule that cannot be set is cleared, so that the proxy
    /// carries the connections; an error only when even that fails, since a rule left
    /// behind would send them where the proxy no longer does.
    pub fn follow(
        &self,
        switch: &SwitchSpec,
        listen: SocketAddr,
        backend: Option<u16>,
    ) -> Result<(), KernelError> {
        let want = match (backend, usable(switch)) {
            (Some(backend), Ok(())) => Rule::To { listen, backend },
            (Some(_), Err(why)) => {
                if known(&self.table).is_none() {
                    tracing::info!(table = %self.table, "new connections go through the switch's proxy: {why}");
                }
                Rule::Cleared
            }
            (None, _) => Rule::Cleared,
        };
        let before = known(&self.table);
        if !must_set(before, want, Instant::now()) {
            return Ok(());
        }
        let Rule::To { backend, .. } = want else {
            return self.clear();
        };
        match self.run(&route_script(&self.table, listen, backend)) {
            Ok(()) => {
                remember(
                    &self.table,
                    Some(Known::Set {
                        rule: want,
                        at: Instant::now(),
                    }),
                );
                if before.is_none_or(|k| !matches!(k, Known::Set { rule, .. } if rule == want)) {
                    tracing::info!(table = %self.table, %listen, backend, "new connections go to 127.0.0.1:{backend} by a kernel rule");
                }
                Ok(())
            }
            Err(e) => {
                if before.is_none_or(|k| !matches!(k, Known::Failed { want: w, .. } if w == want)) {
                    tracing::warn!(
                        "the switch's kernel rule could not be set ({e}): the proxy carries the connections; tried again every {}s",
                        RETRY.as_secs()
                    );
                }
                self.clear()?;
                remember(
                    &self.table,
                    Some(Known::Failed {
                        want,
                        at: Instant::now(),
                    }),
                );
                Ok(())
            }
        }
    }

    /// Empties the table, keeping its chain: new connections reach the proxy, and those
    /// the rule sent on keep their translation. Always asks `nft` (is there a table, then
    /// empty it) when it is installed: this is the step that keeps traffic off a port,
    /// whatever this process believes the table holds; a table that is not there is not
    /// made.
    pub fn clear(&self) -> Result<(), KernelError> {
        let cleared = || {
            remember(
                &self.table,
                Some(Known::Set {
                    rule: Rule::Cleared,
                    at: Instant::now(),
                }),
            );
            Ok(())
        };
        // Nothing can have set a rule without `nft`, or without the table.
        let listed = if nft_path().is_none() {
            return cleared();
        } else {
            self.exists()?
        };
        if listed == Some(false) {
            return cleared();
        }
        let result = self.run(&clear_script(&self.table));
        if listed.is_none() && matches!(result, Err(KernelError::Refused { .. })) {
            // Refused to list and to change: nothing can have been set from here.
            return cleared();
        }
        remember(
            &self.table,
            result.is_ok().then(|| Known::Set {
                rule: Rule::Cleared,
                at: Instant::now(),
            }),
        );
        result
    }

    /// [`Self::clear`], unless this process cleared the table less than [`REASSERT`] ago:
    /// for a step asked again on every pass (a serving service that stays down).
    pub fn keep_cleared(&self) -> Result<(), KernelError> {
        if must_set(known(&self.table), Rule::Cleared, Instant::now()) {
            self.clear()
        } else {
            Ok(())
        }
    }

    /// Removes the table (the switch stops, its services stopped first): connections the
    /// rule sent on lose their translation if no other NAT chain is left on the host.
    /// An application that never had a table runs no delete (an in-place one, say, on a
    /// host where `nft` may not be run).
    pub fn remove(&self) -> Result<(), KernelError> {
        remember(&self.table, None);
        let listed = match nft_path() {
            None => return Ok(()),
            Some(_) => self.exists()?,
        };
        if listed == Some(false) {
            return Ok(());
        }
        match self.run(&remove_script(&self.table)) {
            // Refused to list and to change: nothing can have been set from here.
            Err(KernelError::Refused { .. }) if listed.is_none() => Ok(()),
            result => result,
        }
    }

    /// Whether the table exists (`nft list tables` names it), so that a clear does not
    /// make a table for an application that never had one; `None` when `nft` refused the
    /// listing (no CAP_NET_ADMIN, a ruleset it cannot read): the callers then try their
    /// change all the same.
    fn exists(&self) -> Result<Option<bool>, KernelError> {
        let listed = match self.nft(&["list", "tables"], None) {
            Ok(listed) => listed,
            Err(KernelError::Refused { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let line = format!("table ip {}", self.table);
        Ok(Some(
            String::from_utf8_lossy(&listed)
                .lines()
                .any(|l| l.trim() == line),
        ))
    }

    fn run(&self, script: &str) -> Result<(), KernelError> {
        self.nft(&["-f", "-"], Some(script)).map(drop)
    }

    /// Runs `nft ARGS` (with `script` on its input): its output, at most
    /// [`MAX_STDOUT`] bytes of it.
    fn nft(&self, args: &[&str], script: Option<&str>) -> Result<Vec<u8>, KernelError> {
        let run_error = |reason: String| KernelError::Run {
            table: self.table.clone(),
            reason,
        };
        let nft = nft_path().ok_or_else(|| run_error(Unusable::NoNft.to_string()))?;
        let mut child = Command::new(nft)
            .args(args)
            .env_clear()
            .stdin(if script.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| run_error(e.to_string()))?;
        let script = script.unwrap_or_default();
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(script.as_bytes()));
        let deadline = Instant::now() + NFT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(run_error(format!(
                        "no answer within {}s",
                        NFT_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(run_error(e.to_string())),
            }
        };
        use std::io::Read;
        if status.success() {
            // An input it did not read whole is no success.
            if let Some(Err(e)) = written {
                return Err(run_error(format!("writing its input: {e}")));
            }
            let mut stdout = Vec::new();
            if let Some(pipe) = child.stdout.take() {
                let _ = pipe.take(MAX_STDOUT as u64).read_to_end(&mut stdout);
            }
            return Ok(stdout);
        }
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe
                .by_ref()
                .take(MAX_STDERR as u64)
                .read_to_end(&mut stderr);
        }
        let stderr = String::from_utf8_lossy(&stderr);
        Err(KernelError::Refused {
            table: self.table.clone(),
            stderr: stderr.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }
}

/// How many TCP connections are open on local `port` (established, being set up, or
/// closed by the client with the answer still owed), over IPv4 and IPv6, as the kernel's
/// socket diagnostics count them: the connections a service on that port still serves,
/// whoever made them (the proxy, a kernel rule, a hook).
pub fn open_on(port: u16) -> std::io::Result<u32> {
    let v4 = diag::count(nix::libc::AF_INET as u8, port)?;
    let v6 = match diag::count(nix::libc::AF_INET6 as u8, port) {
        Ok(n) => n,
        // No IPv6 in this kernel: nothing open over it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::ENOENT | nix::libc::EAFNOSUPPORT)
            ) =>
        {
            0
        }
        Err(e) => return Err(e),
    };
    Ok(v4 + v6)
}

/// One `SOCK_DIAG_BY_FAMILY` dump over netlink: the kernel filters by state, so the
/// thousands of TIME_WAIT sockets a busy port leaves are never read.
mod diag {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::libc;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    /// TCP_ESTABLISHED (1), TCP_SYN_RECV (3), TCP_CLOSE_WAIT (8).
    const STATES: u32 = (1 << 1) | (1 << 3) | (1 << 8);
    /// At most this many bytes of answers are read: far past any real dump of the states
    /// above, and a bound all the same.
    const MAX_BYTES: usize = 64 << 20;

    pub fn count(family: u8, port: u16) -> io::Result<u32> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new, valid descriptor no one else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            // Without it a dump that never ends would block the drain for good.
            return Err(io::Error::last_os_error());
        }
        let mut request = Vec::with_capacity(72);
        request.extend_from_slice(&72u32.to_ne_bytes());
        request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        request.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        request.extend_from_slice(&1u32.to_ne_bytes());
        request.extend_from_slice(&0u32.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext, pad, states, then the sockid, whose
        // first field, the local port (big-endian), the kernel filters the dump on.
        request.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
        request.extend_from_slice(&STATES.to_ne_bytes());
        request.extend_from_slice(&port.to_be_bytes());
        request.resize(72, 0);
        // SAFETY: the buffer is valid for its length; the kernel is the destination
        // (a zeroed sockaddr_nl).
        let sent = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut count = 0u32;
        let mut read = 0usize;
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            read += n;
            if n == 0 {
                return Err(io::Error::other(
                    "the socket dump ended with no end message",
                ));
            }
            if read > MAX_BYTES {
                return Err(io::Error::other(format!(
                    "the socket dump passed {} MiB",
                    MAX_BYTES >> 20
                )));
            }
            let mut at = 0usize;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
                if len < 16 || at + len > n {
                    return Err(io::Error::other("a socket dump message out of bounds"));
                }
                match kind {
                    NLMSG_DONE => return Ok(count),
                    NLMSG_ERROR => {
                        let errno = buf
                            .get(at + 16..at + 20)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(0);
                        // An error message with errno 0 is an acknowledgement: done.
                        if errno == 0 {
                            return Ok(count);
                        }
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        // inet_diag_msg: family, state, timer, retrans, then the sockid,
                        // whose first field is the local port, big-endian.
                        if let Some(sport) = buf.get(at + 20..at + 22)
                            && u16::from_be_bytes([sport[0], sport[1]]) == port
                        {
                            count += 1;
                        }
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch() -> SwitchSpec {
        SwitchSpec {
            address: IpAddr::from([0, 0, 0, 0]),
            drain_timeout: Duration::from_secs(30),
            keep_previous: Duration::ZERO,
            proxy_protocol: false,
            forward: Forward::Kernel,
        }
    }

    #[test]
    fn the_rule_matches_the_public_address_and_port_and_names_the_serving_port() {
        let any = route_script("shoal_x", "0.0.0.0:8080".parse().unwrap(), 41000);
        assert!(
            any.contains(
                "add rule ip shoal_x output tcp dport 8080 fib daddr type local dnat to 127.0.0.1:41000\n"
            ),
            "{any}"
        );
        assert!(
            any.starts_with("table ip shoal_x {\n  chain output {"),
            "{any}"
        );
        assert!(any.contains("flush chain ip shoal_x output\n"), "{any}");
        let one = route_script("shoal_x", "10.1.2.3:80".parse().unwrap(), 41001);
        assert!(
            one.contains("output tcp dport 80 ip daddr 10.1.2.3 dnat to 127.0.0.1:41001\n"),
            "{one}"
        );
        assert_eq!(
            clear_script("shoal_x"),
            "table ip shoal_x {}\nflush table ip shoal_x\n"
        );
        assert_eq!(
            remove_script("shoal_x"),
            "table ip shoal_x {}\ndelete table ip shoal_x\n"
        );
    }

    #[test]
    fn tables_are_per_application_directory_however_it_is_spelled() {
        let a = AppDir::new(Path::new("/var/lib/shoal"), "inference");
        let b = AppDir::new(Path::new("/var/lib/shoal-2"), "inference");
        assert_ne!(table_name(&a), table_name(&b));
        assert_eq!(table_name(&a).len(), "shoal_".len() + 12);
        assert!(table_name(&a)[6..].chars().all(|c| c.is_ascii_hexdigit()));
        // One directory reached by two spellings (a link, a `..`) names one table.
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("data");
        std::fs::create_dir_all(real.join("apps/app")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let named = |p: &Path| table_name(&AppDir::new(p, "app"));
        assert_eq!(named(&real), named(&tmp.path().join("link")));
        assert_eq!(named(&real), named(&tmp.path().join("link/../data")));
    }

    #[test]
    fn nft_runs_only_when_the_rule_changes_is_old_or_failed_long_enough_ago() {
        let t0 = Instant::now();
        let to = |backend| Rule::To {
            listen: "0.0.0.0:80".parse().unwrap(),
            backend,
        };
        let set = |rule, at| Some(Known::Set { rule, at });
        let failed = |want, at| Some(Known::Failed { want, at });
        // Nothing known (a new agent): always set, whatever a previous one left.
        assert!(must_set(None, to(1), t0));
        assert!(must_set(None, Rule::Cleared, t0));
        // Set already: not again, until REASSERT.
        assert!(!must_set(
            set(to(1), t0),
            to(1),
            t0 + Duration::from_secs(1)
        ));
        assert!(must_set(set(to(1), t0), to(1), t0 + REASSERT));
        assert!(!must_set(set(Rule::Cleared, t0), Rule::Cleared, t0));
        // Another target: at once.
        assert!(must_set(set(to(1), t0), to(2), t0));
        assert!(must_set(set(to(1), t0), Rule::Cleared, t0));
        // Failed: not again (nor warned of) until RETRY, unless the target changed.
        assert!(!must_set(
            failed(to(1), t0),
            to(1),
            t0 + Duration::from_secs(59)
        ));
        assert!(must_set(failed(to(1), t0), to(1), t0 + RETRY));
        assert!(must_set(failed(to(1), t0), to(2), t0));
        assert!(must_set(failed(to(1), t0), Rule::Cleared, t0));
    }

    #[test]
    fn the_kernel_path_is_refused_where_it_cannot_carry_the_connections() {
        let mut s = switch();
        s.forward = Forward::Proxy;
        assert_eq!(usable(&s), Err(Unusable::Asked));
        let mut s = switch();
        s.proxy_protocol = true;
        assert_eq!(usable(&s), Err(Unusable::ProxyProtocol));
        let mut s = switch();
        s.address = "::".parse().unwrap();
        assert!(matches!(usable(&s), Err(Unusable::Ipv6(_))));
        match usable(&switch()) {
            Ok(()) => assert!(nft_path().is_some()),
            Err(e) => assert_eq!(e, Unusable::NoNft),
        }
    }

    #[test]
    fn a_rule_is_set_moved_cleared_keeping_its_chain_and_removed_with_the_real_nft() {
        if nft_path().is_none() || !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("SHOAL_CI").is_none(),
                "nft is missing or may not be run (not root), and CI has both"
            );
            println!("nft is not installed or this is not root: the real rule is not checked");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = AppDir::new(tmp.path(), "app");
        std::fs::create_dir_all(&dir.root).unwrap();
        let kernel = Kernel::of(&dir);
        // Removed even when an assertion fails: the table is the host's.
        struct Removed(Kernel);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = self.0.remove();
            }
        }
        let _removed = Removed(kernel.clone());
        let listed = || {
            let out = kernel.nft(&["list", "table", "ip", kernel.table()], None);
            out.ok().map(|o| String::from_utf8_lossy(&o).into_owned())
        };
        // A clear makes no table for an application that never had one.
        kernel.clear().unwrap();
        assert_eq!(
            kernel.exists().unwrap(),
            Some(false),
            "a clear made a table"
        );
        let listen: SocketAddr = "127.0.0.1:1".parse().unwrap();
        kernel.follow(&switch(), listen, Some(40001)).unwrap();
        let table = listed().expect("the table");
        assert!(table.contains("dnat to 127.0.0.1:40001"), "{table}");
        kernel.follow(&switch(), listen, Some(40002)).unwrap();
        let table = listed().unwrap();
        assert!(table.contains("dnat to 127.0.0.1:40002"), "{table}");
        assert!(!table.contains("40001"), "{table}");
        // Cleared: no rule, the chain kept.
        kernel.clear().unwrap();
        let table = listed().unwrap();
        assert!(!table.contains("dnat"), "{table}");
        assert!(table.contains("chain output"), "{table}");
        // `forward: proxy` follows as a clear.
        kernel.follow(&switch(), listen, Some(40003)).unwrap();
        let mut proxied = switch();
        proxied.forward = Forward::Proxy;
        kernel.follow(&proxied, listen, Some(40003)).unwrap();
        assert!(!listed().unwrap().contains("dnat"));
        kernel.remove().unwrap();
        assert!(listed().is_none(), "the table is left");
        assert_eq!(kernel.exists().unwrap(), Some(false));
    }

    #[test]
    fn the_socket_count_sees_an_open_connection_and_not_a_closed_one() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(
            open_on(port).unwrap(),
            0,
            "a listener alone is no connection"
        );
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (served, _) = listener.accept().unwrap();
        // The server's side has the port as its local one; the client's does not.
        assert_eq!(open_on(port).unwrap(), 1);
        let second = TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(
            open_on(port).unwrap(),
            2,
            "one accepted, one in the backlog"
        );
        drop(second);
        drop(client);
        // The client closed: the server's side owes its close (CLOSE_WAIT), still open.
        assert!(open_on(port).unwrap() >= 1);
        drop(served);
        drop(listener);
        // The last ACK crosses loopback at once; waited for all the same.
        let until = Instant::now() + Duration::from_secs(5);
        while open_on(port).unwrap() != 0 {
            assert!(
                Instant::now() < until,
                "connections still counted after they closed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
