//! The kernel's part of the switch (decision 0026, which replaced 0025's nftables rule): a
//! connect-time redirect per application that sends each new connection made on this host
//! to the public port straight to the serving revision's port, and the kernel's count of
//! the connections open on a port (what a drain waits on).
//!
//! - **The redirect.** A `cgroup/connect4` eBPF program ([`super::bpf`]) rewrites the
//!   destination of a local TCP `connect()` to the public address into 127.0.0.1 and the
//!   serving port, before the connection's first packet: the connection then runs as if
//!   made straight to the service (no address translation per packet, no connection
//!   tracking, no process between). One program per application, named `shoal_<9 hex>`
//!   from the application's directory (two agents on one machine never share one),
//!   attached at the root of the cgroup v2 tree; a change replaces it in one step, so a
//!   connection sees the old target or the new one. Open connections are never touched (a
//!   drain needs exactly that). The program stays attached while the agent is down, and
//!   redirects until it expires ([`bpf::TTL`]); the agent replaces its own every
//!   [`REFRESH`] (from the supervisor's pass, or its busy pass while a deployment holds
//!   the application, [`Kernel::refresh`]), and detaches any dead agent's.
//! - **Who it serves.** Connections made on the host, in the agent's network namespace (a
//!   local load balancer, sidecars, clients on 127.0.0.1). A remote client's connection
//!   has no `connect()` here: it goes through the proxy, which still holds the public port.
//!   The program redirects only a connection that the kernel would hand to the proxy's
//!   listener (it looks the listener up): with the proxy gone, nothing is redirected.
//! - **When it is not used** ([`Unusable`]): an IPv6 public address, a revision that wants
//!   the PROXY protocol header (only the proxy writes it), `forward: proxy`; and, found when
//!   loading, a host without cgroup v2 or BPF, or an agent without the privilege. The
//!   proxy then carries every connection.
//!
//! The proxy (`super::Proxy`) calls [`Kernel::follow`] after each answer that moves
//! traffic and [`Kernel::clear`] before each that holds or stops it; the supervisor's
//! pass follows the proxy on every pass and clears while the serving service is down;
//! `lifecycle::switched::stop_all` clears first. So the redirect is only ever where the
//! proxy sends a connection itself, or did a moment ago.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::bpf::{self, BpfError, Redirect};
use crate::appspec::{Forward, SwitchSpec};
use crate::lifecycle::state::AppDir;

/// Why the redirect could not be set or removed.
#[derive(Debug, thiserror::Error)]
#[error("the switch's connect redirect {name}: {source}")]
pub struct KernelError {
    /// The program's name (`shoal_<9 hex>`).
    pub name: String,
    #[source]
    pub source: BpfError,
}

/// Why the kernel path is not used for an application: the proxy carries its connections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the service asks for `forward: proxy`")]
    Asked,
    #[error("the service wants the PROXY protocol header, which only the proxy writes")]
    ProxyProtocol,
    #[error("the public address {0} is IPv6: the redirect is IPv4 only")]
    Ipv6(IpAddr),
}

/// The redirect of one application.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// No program: connections reach the proxy.
    Cleared,
    To(Redirect),
}

/// What this process knows of one application's program. Times are on `CLOCK_BOOTTIME`
/// ([`bpf::boot_now`]), the programs' own clock.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Known {
    /// `rule` was set at `at`: program `id` is attached (`None` for no program).
    Set {
        rule: Rule,
        id: Option<u32>,
        at: Duration,
    },
    /// Redirecting `listen` to `backend` failed at `at` (the programs were detached
    /// instead).
    Failed {
        listen: SocketAddrV4,
        backend: u16,
        at: Duration,
    },
}

impl Known {
    /// When redirecting `listen` to `backend` last failed, if that is what failed.
    fn failed_at(&self, listen: SocketAddrV4, backend: u16) -> Option<Duration> {
        match *self {
            Known::Failed {
                listen: l,
                backend: b,
                at,
            } if l == listen && b == backend => Some(at),
            _ => None,
        }
    }
}

/// How long after a failed load or attach the same redirect is not tried again (and not
/// warned of).
const RETRY: Duration = Duration::from_secs(60);
/// How long a program this process attached is kept before it is replaced by a fresh one:
/// half of its life ([`bpf::TTL`]).
const REFRESH: Duration = Duration::from_secs(bpf::TTL.as_secs() / 2);
/// How long past its expiry a switch program (any application's) is detached by whoever
/// sees it: it redirects nothing any more, and the kernel attaches at most 64 per cgroup.
const SWEEP_AFTER: Duration = Duration::from_secs(30);

/// Whether `follow` must change what is attached to have `want`, given the ids of the
/// programs of this application attached now: the pure decision, unit-tested. Anything
/// attached that this process did not attach itself (a previous agent's, a second copy)
/// is replaced, and its own program after [`REFRESH`].
fn must_set(known: Option<&Known>, want: &Rule, attached: &[u32], now: Duration) -> bool {
    match known {
        Some(Known::Set { rule, id, at }) => {
            rule != want
                || attached != id.as_slice()
                || (*want != Rule::Cleared && now.saturating_sub(*at) >= REFRESH)
        }
        Some(failed @ Known::Failed { .. }) => {
            let at = match want {
                Rule::To(r) => failed.failed_at(r.listen, r.backend),
                Rule::Cleared => None,
            };
            at.is_none_or(|at| now.saturating_sub(at) >= RETRY) || !attached.is_empty()
        }
        None => want != &Rule::Cleared || !attached.is_empty(),
    }
}

/// Whether a switch program loaded at `loaded` is [`SWEEP_AFTER`] past its expiry at
/// `now` (both on `CLOCK_BOOTTIME`).
fn swept(loaded: Duration, now: Duration) -> bool {
    loaded + bpf::TTL + SWEEP_AFTER < now
}

/// What this process last did per program. Empty after a start, so the first call for
/// each application replaces whatever a previous agent left.
static KNOWN: Mutex<Option<HashMap<String, Known>>> = Mutex::new(None);
/// Held through each change of what is attached, so that a refresh (from the supervisor,
/// while a deployment holds the application) and a deployment's own step never interleave.
static SETTING: Mutex<()> = Mutex::new(());

fn known(name: &str) -> Option<Known> {
    let guard = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    guard.as_ref().and_then(|m| m.get(name).cloned())
}

fn remember(name: &str, known: Known) {
    let mut guard = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    guard
        .get_or_insert_with(HashMap::new)
        .insert(name.to_string(), known);
}

/// The program name of the application in `dir`: `shoal_` and 9 hex digits of the
/// SHA-256 of its directory's canonical path (so a data directory spelled two ways, or
/// reached through a link, names one program). 15 bytes: the kernel's limit.
pub fn program_name(dir: &AppDir) -> String {
    let path = std::fs::canonicalize(&dir.root).unwrap_or_else(|_| dir.root.clone());
    let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
    format!("shoal_{}", &hex::encode(digest)[..9])
}

/// Whether the kernel path can carry `switch`'s connections (what the AppSpec says; the
/// host's support is found when the program is loaded).
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
    Ok(())
}

/// The redirect of one application.
#[derive(Debug, Clone)]
pub struct Kernel {
    name: String,
}

impl Kernel {
    pub fn of(dir: &AppDir) -> Self {
        Kernel {
            name: program_name(dir),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn error(&self, source: BpfError) -> KernelError {
        KernelError {
            name: self.name.clone(),
            source,
        }
    }

    /// Makes the redirect match where the proxy now sends new connections: `backend`
    /// (when traffic is neither held nor unrouted) for a switch the kernel path can carry,
    /// else none. The kernel is asked what is attached on every call (a few system calls);
    /// a program is loaded only when the target, the host's addresses or the attached
    /// program changed, or to replace this process's own after [`REFRESH`] (before it
    /// expires). A redirect that failed is tried again after [`RETRY`], and warned of
    /// once. A redirect that cannot be set is cleared, so that the proxy carries the
    /// connections; an error only when even that fails, since a program left behind would
    /// send them where the proxy no longer does.
    pub fn follow(
        &self,
        switch: &SwitchSpec,
        listen: SocketAddr,
        backend: Option<u16>,
    ) -> Result<(), KernelError> {
        let (backend, listen) = match (backend, usable(switch), listen) {
            (Some(backend), Ok(()), SocketAddr::V4(listen)) => (backend, listen),
            (Some(_), why, _) => {
                if known(&self.name).is_none() {
                    let why = why.err().map(|w| w.to_string()).unwrap_or_default();
                    tracing::info!(program = %self.name, "new connections go through the switch's proxy: {why}");
                }
                return self.clear();
            }
            (None, _, _) => return self.clear(),
        };
        let result = self
            .redirect(listen, backend)
            .and_then(|want| self.set(want));
        let Err(e) = result else { return Ok(()) };
        let again = known(&self.name).and_then(|k| k.failed_at(listen, backend));
        if again.is_none() {
            tracing::warn!(
                "the switch's connect redirect could not be set ({e}): the proxy carries the connections; tried again every {}s",
                RETRY.as_secs()
            );
        }
        // Whatever the failure, nothing of this application's may send elsewhere.
        self.clear()?;
        let at = bpf::boot_now().map_err(|e| self.error(e))?;
        remember(
            &self.name,
            Known::Failed {
                listen,
                backend,
                at,
            },
        );
        Ok(())
    }

    /// Replaces this application's program with a fresh one when it is due
    /// ([`REFRESH`]), the target unchanged: for the supervisor to call while a deployment
    /// holds the application (and keeps it from `follow`), so that a long drain or hook
    /// does not let the program expire.
    pub fn refresh(&self) -> Result<(), KernelError> {
        // Read under the lock: a deployment's step that moves the target meanwhile must
        // not be undone by a refresh of the target before it.
        let _setting = SETTING.lock().unwrap_or_else(|e| e.into_inner());
        match known(&self.name) {
            Some(Known::Set {
                rule: rule @ Rule::To(_),
                ..
            }) => self.set_locked(rule),
            _ => Ok(()),
        }
    }

    /// What a redirect to `backend` needs now: the namespace and the host's addresses.
    fn redirect(&self, listen: SocketAddrV4, backend: u16) -> Result<Rule, KernelError> {
        let netns = bpf::netns_cookie().map_err(|e| self.error(e))?;
        let locals = if listen.ip().is_unspecified() {
            bpf::local_addresses().map_err(|source| {
                self.error(BpfError::Call {
                    step: "listing the host's addresses",
                    source,
                })
            })?
        } else {
            Vec::new()
        };
        Ok(Rule::To(Redirect {
            listen,
            backend,
            locals,
            netns,
        }))
    }

    /// Attaches `want`'s program in place of this application's (or detaches them all,
    /// for [`Rule::Cleared`]), unless that is what is attached already. Detaches, on the
    /// way, any switch program (any application's) [`SWEEP_AFTER`] past its expiry.
    fn set(&self, want: Rule) -> Result<(), KernelError> {
        let _setting = SETTING.lock().unwrap_or_else(|e| e.into_inner());
        self.set_locked(want)
    }

    /// [`Self::set`], with [`SETTING`] held by the caller.
    fn set_locked(&self, want: Rule) -> Result<(), KernelError> {
        let before = known(&self.name);
        let now = bpf::boot_now().map_err(|e| self.error(e))?;
        let nothing = || {
            let rule = Rule::Cleared;
            remember(
                &self.name,
                Known::Set {
                    rule,
                    id: None,
                    at: now,
                },
            );
            Ok(())
        };
        let cgroup = match bpf::cgroup_root() {
            Ok(fd) => fd,
            // Nothing can have been attached without a cgroup v2 tree.
            Err(e) if want == Rule::Cleared && e.nothing_attached() => return nothing(),
            Err(e) => return Err(self.error(e)),
        };
        // A program replaced by another process between the listing and the attach:
        // listed again, once.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let all = match bpf::attached(cgroup.as_fd(), bpf::is_switch_program) {
                Ok(found) => found,
                // Refused to list: nothing can have been attached from here either.
                Err(e) if want == Rule::Cleared && e.nothing_attached() => return nothing(),
                Err(e) => return Err(self.error(e)),
            };
            let (attached, others): (Vec<_>, Vec<_>) =
                all.into_iter().partition(|a| a.name == self.name);
            self.sweep(&cgroup, &others, now);
            let ids: Vec<u32> = attached.iter().map(|a| a.id).collect();
            if !must_set(before.as_ref(), &want, &ids, now) {
                return Ok(());
            }
            let result = match &want {
                Rule::Cleared => self.detach_all(&cgroup, &attached, None).map(|()| None),
                Rule::To(r) => self.attach(&cgroup, &attached, r, now),
            };
            match result {
                Ok(id) => {
                    if let (Rule::To(r), Some(id)) = (&want, id) {
                        let moved = !matches!(&before, Some(Known::Set { rule: Rule::To(was), .. }) if was.backend == r.backend && was.listen == r.listen);
                        if moved {
                            tracing::info!(program = %self.name, listen = %r.listen, backend = r.backend, id, "new connections made on this host go to 127.0.0.1:{} at connect()", r.backend);
                        }
                    }
                    remember(
                        &self.name,
                        Known::Set {
                            rule: want,
                            id,
                            at: now,
                        },
                    );
                    return Ok(());
                }
                Err(BpfError::Call { source, .. })
                    if attempts < 2 && source.raw_os_error() == Some(nix::libc::ENOENT) => {}
                Err(e) => return Err(self.error(e)),
            }
        }
    }

    /// Detaches the switch programs among `others` (other applications') that are
    /// [`SWEEP_AFTER`] past their expiry: their agents are gone. A failure is only logged.
    fn sweep(&self, cgroup: &OwnedFd, others: &[bpf::Attached], now: Duration) {
        for old in others.iter().filter(|a| swept(a.loaded, now)) {
            match bpf::detach(cgroup.as_fd(), old.fd.as_fd()) {
                Ok(()) => tracing::info!(
                    program = %old.name,
                    id = old.id,
                    "detached an expired switch program (its agent is gone)"
                ),
                Err(e) => {
                    tracing::warn!(program = %old.name, "detaching an expired switch program: {e}")
                }
            }
        }
    }

    /// Loads and attaches `r`'s program (expiring [`bpf::TTL`] after `now`) in place of
    /// the first of `attached`, and detaches the others: the new program's id.
    fn attach(
        &self,
        cgroup: &OwnedFd,
        attached: &[bpf::Attached],
        r: &Redirect,
        now: Duration,
    ) -> Result<Option<u32>, BpfError> {
        let expires = (now + bpf::TTL).as_nanos() as u64;
        let prog = bpf::load(&self.name, &bpf::program(r, expires))?;
        let id = bpf::prog_info(prog.as_fd())?.id;
        let replaced = attached.first();
        bpf::attach(cgroup.as_fd(), prog.as_fd(), replaced.map(|a| a.fd.as_fd()))?;
        self.detach_all(cgroup, attached, replaced.map(|a| a.id))?;
        Ok(Some(id))
    }

    fn detach_all(
        &self,
        cgroup: &OwnedFd,
        attached: &[bpf::Attached],
        except: Option<u32>,
    ) -> Result<(), BpfError> {
        for a in attached.iter().filter(|a| Some(a.id) != except) {
            bpf::detach(cgroup.as_fd(), a.fd.as_fd())?;
        }
        Ok(())
    }

    /// Detaches this application's programs: new connections reach the proxy; those
    /// already made are not touched. Always asks the kernel what is attached: this is the
    /// step that keeps traffic off a port, whatever this process believes.
    pub fn clear(&self) -> Result<(), KernelError> {
        self.set(Rule::Cleared)
    }

    /// The ids of this application's attached programs (`Err` where they cannot be
    /// listed: no cgroup v2, not root).
    pub fn attached(&self) -> Result<Vec<u32>, KernelError> {
        let cgroup = bpf::cgroup_root().map_err(|e| self.error(e))?;
        let found =
            bpf::attached(cgroup.as_fd(), |name| name == self.name).map_err(|e| self.error(e))?;
        Ok(found.iter().map(|a| a.id).collect())
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
    use std::path::Path;
    use std::time::Instant;

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
    fn programs_are_per_application_directory_however_it_is_spelled() {
        let a = AppDir::new(Path::new("/var/lib/shoal"), "inference");
        let b = AppDir::new(Path::new("/var/lib/shoal-2"), "inference");
        assert_ne!(program_name(&a), program_name(&b));
        // The kernel keeps 15 bytes of a program's name.
        assert_eq!(program_name(&a).len(), 15);
        assert!(program_name(&a)[6..].chars().all(|c| c.is_ascii_hexdigit()));
        // One directory reached by two spellings (a link, a `..`) names one program.
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("data");
        std::fs::create_dir_all(real.join("apps/app")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("link")).unwrap();
        let named = |p: &Path| program_name(&AppDir::new(p, "app"));
        assert_eq!(named(&real), named(&tmp.path().join("link")));
        assert_eq!(named(&real), named(&tmp.path().join("link/../data")));
    }

    #[test]
    fn a_program_is_loaded_only_when_the_target_or_what_is_attached_changed_or_failed_long_ago() {
        let t0 = Duration::from_secs(1000);
        let to = |backend| {
            Rule::To(Redirect {
                listen: "0.0.0.0:80".parse().unwrap(),
                backend,
                locals: vec![],
                netns: 7,
            })
        };
        let set = |rule, id| Some(Known::Set { rule, id, at: t0 });
        let failed = |backend, at| {
            Some(Known::Failed {
                listen: "0.0.0.0:80".parse().unwrap(),
                backend,
                at,
            })
        };
        // Nothing known (a new agent): whatever a previous one left is replaced; nothing
        // to clear when nothing is attached.
        assert!(must_set(None, &to(1), &[], t0));
        assert!(must_set(None, &to(1), &[5], t0));
        assert!(!must_set(None, &Rule::Cleared, &[], t0));
        assert!(must_set(None, &Rule::Cleared, &[5], t0));
        // Set already and still attached alone: not again, until REFRESH (a cleared one
        // has nothing to refresh).
        assert!(!must_set(set(to(1), Some(5)).as_ref(), &to(1), &[5], t0));
        let later = t0 + REFRESH - Duration::from_secs(1);
        assert!(!must_set(set(to(1), Some(5)).as_ref(), &to(1), &[5], later));
        assert!(must_set(
            set(to(1), Some(5)).as_ref(),
            &to(1),
            &[5],
            t0 + REFRESH
        ));
        assert!(!must_set(
            set(Rule::Cleared, None).as_ref(),
            &Rule::Cleared,
            &[],
            t0 + REFRESH
        ));
        assert!(!must_set(
            set(Rule::Cleared, None).as_ref(),
            &Rule::Cleared,
            &[],
            t0
        ));
        // Detached by someone else, replaced, or joined by a second copy: set again.
        assert!(must_set(set(to(1), Some(5)).as_ref(), &to(1), &[], t0));
        assert!(must_set(set(to(1), Some(5)).as_ref(), &to(1), &[6], t0));
        assert!(must_set(set(to(1), Some(5)).as_ref(), &to(1), &[5, 6], t0));
        assert!(must_set(
            set(Rule::Cleared, None).as_ref(),
            &Rule::Cleared,
            &[6],
            t0
        ));
        // Another target, or the host's addresses changed: at once.
        assert!(must_set(set(to(1), Some(5)).as_ref(), &to(2), &[5], t0));
        let mut moved = to(1);
        if let Rule::To(r) = &mut moved {
            r.locals.push("10.0.0.9".parse().unwrap());
        }
        assert!(must_set(set(to(1), Some(5)).as_ref(), &moved, &[5], t0));
        assert!(must_set(
            set(to(1), Some(5)).as_ref(),
            &Rule::Cleared,
            &[5],
            t0
        ));
        // Failed: not again (nor warned of) until RETRY, unless the target changed or
        // something is attached.
        let later = t0 + Duration::from_secs(59);
        assert!(!must_set(failed(1, t0).as_ref(), &to(1), &[], later));
        assert!(must_set(failed(1, t0).as_ref(), &to(1), &[], t0 + RETRY));
        assert!(must_set(failed(1, t0).as_ref(), &to(2), &[], later));
        assert!(must_set(failed(1, t0).as_ref(), &to(1), &[9], later));
        assert!(must_set(failed(1, t0).as_ref(), &Rule::Cleared, &[], later));
    }

    #[test]
    fn only_a_switch_program_long_past_its_expiry_is_swept() {
        let loaded = Duration::from_secs(5000);
        assert!(!swept(loaded, loaded));
        // Expired, not yet swept: its own agent may be between two passes.
        assert!(!swept(loaded, loaded + bpf::TTL + SWEEP_AFTER));
        assert!(swept(
            loaded,
            loaded + bpf::TTL + SWEEP_AFTER + Duration::from_secs(1)
        ));
        assert!(bpf::is_switch_program("shoal_0123abcde"));
        assert!(!bpf::is_switch_program("shoal_0123abcd"));
        assert!(!bpf::is_switch_program("shoal_0123abcdx"));
        assert!(!bpf::is_switch_program("cilium_sock4"));
        assert_eq!(
            program_name(&AppDir::new(Path::new("/x"), "a")).len(),
            "shoal_0123abcde".len()
        );
        assert!(bpf::is_switch_program(&program_name(&AppDir::new(
            Path::new("/x"),
            "a"
        ))));
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
        assert_eq!(usable(&switch()), Ok(()));
    }

    /// Where a new connection to `to` from this thread lands: the peer the socket has.
    fn lands(to: SocketAddr) -> std::io::Result<SocketAddr> {
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?.peer_addr()
    }

    #[test]
    fn the_real_program_redirects_this_namespaces_connections_to_the_proxy_and_nothing_else() {
        use std::net::TcpListener;
        if !nix::unistd::geteuid().is_root() || bpf::cgroup2_mount().is_err() {
            assert!(
                std::env::var_os("SHOAL_CI").is_none(),
                "not root or no cgroup v2, and CI is both"
            );
            println!("not root, or no cgroup v2: the real program is not checked");
            return;
        }
        // The public port, free in this namespace (to see that the redirect stays out of it).
        let outside = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = outside.local_addr().unwrap().port();
        // Everything else in a network namespace of the test's own, with only `lo`.
        let tmp = tempfile::tempdir().unwrap();
        let dir = AppDir::new(tmp.path(), "app");
        std::fs::create_dir_all(&dir.root).unwrap();
        let kernel = Kernel::of(&dir);
        // Detached even when an assertion fails: the program is the host's.
        struct Cleared(Kernel);
        impl Drop for Cleared {
            fn drop(&mut self) {
                let _ = self.0.clear();
            }
        }
        let _cleared = Cleared(kernel.clone());
        let inside = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // `lo`, with an address outside 127/8 whose last byte has its top bit set (a
            // 64-bit compare of its wire value would never match).
            for args in [
                &["link", "set", "lo", "up"][..],
                &["addr", "add", "10.9.9.200/32", "dev", "lo"],
            ] {
                let ip = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(ip.success(), "ip {args:?}");
            }
            let listen: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
            let proxy = TcpListener::bind(listen).unwrap();
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let b1 = backend.local_addr().unwrap();
            let b2 = TcpListener::bind("127.0.0.1:0").unwrap();
            let b2_addr = b2.local_addr().unwrap();
            let public: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            // A clear makes nothing.
            kernel.clear().unwrap();
            assert_eq!(kernel.attached().unwrap(), Vec::<u32>::new());
            assert_eq!(lands(public).unwrap(), public, "no program yet");
            kernel.follow(&switch(), listen, Some(b1.port())).unwrap();
            let first = kernel.attached().unwrap();
            assert_eq!(first.len(), 1, "one program");
            assert_eq!(lands(public).unwrap(), b1);
            // Any loopback address of the host's is this host's.
            let other_lo: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
            assert_eq!(lands(other_lo).unwrap(), b1);
            // So is the host's other address.
            let host: SocketAddr = format!("10.9.9.200:{port}").parse().unwrap();
            assert_eq!(lands(host).unwrap(), b1);
            // Another port is not touched.
            assert_eq!(lands(b2_addr).unwrap(), b2_addr);
            // An address that is not this host's is not redirected: here it has no route.
            let remote: SocketAddr = format!("192.0.2.7:{port}").parse().unwrap();
            assert!(lands(remote).is_err(), "a remote address was redirected");
            // Followed again unchanged: the same program, not a new one.
            kernel.follow(&switch(), listen, Some(b1.port())).unwrap();
            assert_eq!(kernel.attached().unwrap(), first);
            // Detached behind the agent's back (an operator, another tool): the next
            // follow attaches a new one.
            let cgroup = bpf::cgroup_root().unwrap();
            for a in bpf::attached(cgroup.as_fd(), |n| n == kernel.name()).unwrap() {
                bpf::detach(cgroup.as_fd(), a.fd.as_fd()).unwrap();
            }
            assert_eq!(
                lands(public).unwrap(),
                public,
                "still redirected once detached"
            );
            kernel.follow(&switch(), listen, Some(b1.port())).unwrap();
            let first = kernel.attached().unwrap();
            assert_eq!(first.len(), 1, "not attached again");
            assert_eq!(lands(public).unwrap(), b1);
            // Moved: new connections go to the new port, an open one stays where it was.
            let open = std::net::TcpStream::connect(public).unwrap();
            // The connections made before this one wait in the backlog too.
            backend.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(10);
            let mut served = loop {
                match backend.accept() {
                    Ok((served, from)) if from == open.local_addr().unwrap() => break served,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < until, "the open connection never arrived");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            served.set_nonblocking(false).unwrap();
            kernel
                .follow(&switch(), listen, Some(b2_addr.port()))
                .unwrap();
            let second = kernel.attached().unwrap();
            assert_eq!(second.len(), 1);
            assert_ne!(second, first);
            assert_eq!(lands(public).unwrap(), b2_addr);
            // A refresh before it is due changes nothing, and keeps the latest target.
            kernel.refresh().unwrap();
            assert_eq!(
                kernel.attached().unwrap(),
                second,
                "refreshed before it was due"
            );
            assert_eq!(lands(public).unwrap(), b2_addr);
            use std::io::{Read, Write};
            (&open).write_all(b"x").unwrap();
            let mut byte = [0u8; 1];
            served.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x", "the open connection lost its way");
            // The proxy gone: nothing is redirected (the connection would not have
            // reached it either).
            drop(proxy);
            assert!(lands(public).is_err(), "redirected with no proxy listening");
            let proxy = TcpListener::bind(listen).unwrap();
            assert_eq!(lands(public).unwrap(), b2_addr);
            // `forward: proxy` follows as a clear.
            let mut proxied = switch();
            proxied.forward = Forward::Proxy;
            kernel
                .follow(&proxied, listen, Some(b2_addr.port()))
                .unwrap();
            assert_eq!(kernel.attached().unwrap(), Vec::<u32>::new());
            assert_eq!(lands(public).unwrap(), public);
            // A proxy bound to one address: connections to it are redirected, those to
            // the host's other addresses are not (nothing listens there).
            drop(proxy);
            let one = host;
            let proxy = TcpListener::bind(one).unwrap();
            let mut bound = switch();
            bound.address = one.ip();
            kernel.follow(&bound, one, Some(b1.port())).unwrap();
            assert_eq!(lands(one).unwrap(), b1);
            assert!(
                lands(public).is_err(),
                "127.0.0.1 redirected to a proxy bound elsewhere"
            );
            // An expired program redirects nothing.
            kernel.clear().unwrap();
            let expired = bpf::Redirect {
                listen: match one {
                    SocketAddr::V4(v4) => v4,
                    SocketAddr::V6(_) => unreachable!(),
                },
                backend: b1.port(),
                locals: vec![],
                netns: bpf::netns_cookie().unwrap(),
            };
            let live = bpf::boot_now().unwrap() + Duration::from_secs(60);
            for (expires, lands_on) in [(Duration::ZERO, one), (live, b1)] {
                let prog = bpf::program(&expired, expires.as_nanos() as u64);
                let prog = bpf::load(kernel.name(), &prog).unwrap();
                bpf::attach(cgroup.as_fd(), prog.as_fd(), None).unwrap();
                let landed = lands(one);
                bpf::detach(cgroup.as_fd(), prog.as_fd()).unwrap();
                assert_eq!(landed.unwrap(), lands_on, "expiring at {expires:?}");
            }
            // Left attached for the wildcard: outside, only the namespace test stops it
            // (a listener on 0.0.0.0 at that port is there too).
            drop(proxy);
            kernel.follow(&switch(), listen, Some(b1.port())).unwrap();
            kernel
        });
        let kernel = inside.join().unwrap();
        // Still attached, and the namespace the test started in is untouched: a
        // connection to the same port here reaches this namespace's listener.
        assert_eq!(kernel.attached().unwrap().len(), 1);
        let here: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(lands(here).unwrap(), here);
        kernel.clear().unwrap();
        assert_eq!(kernel.attached().unwrap(), Vec::<u32>::new());
        drop(outside);
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
