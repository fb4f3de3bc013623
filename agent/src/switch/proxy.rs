//! The switch's process, `shoal switch-proxy --dir APP_DIR --listen ADDR` (started by the
//! agent, never by hand): it binds the public address and its control socket, drops to
//! nobody (uid and gid 65534, no new privileges) when it runs as root, and then only
//! forwards: each accepted connection goes to 127.0.0.1:PORT of the route in force when it
//! was accepted, both ways (`copy_bidirectional`), until either side closes.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (at the cap it stops accepting
//! and the kernel's backlog absorbs; its descriptor limit is raised to fit them), at most
//! [`MAX_PER_SOURCE`] from one client address (more are closed at once and counted
//! `refused`), a connection with no byte either way for [`IDLE_TIMEOUT`] is closed, a
//! backend connect within [`CONNECT_TIMEOUT`] (else the client's connection is closed and
//! counted `failed`), control requests one line of at most `MAX_LINE` bytes read within
//! [`CONTROL_READ`], [`MAX_CONTROL`] at once. Accept errors (out of descriptors, say) back
//! off and are logged at most once a second. A hold ends at the next route or when its time
//! is up; `unroute` leaves new connections waiting in the backlog until the next route (the
//! agent's answer to a serving process that died: its port is nobody's until it is back).
//! On `stop` or SIGTERM it stops accepting, gives open connections [`STOP_GRACE`], and
//! exits.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::{Answer, MAX_LINE, Request, Status};

pub const MAX_CONNECTIONS: usize = 4096;
/// Connections from one client address at once: a quarter of the whole, so that one
/// client cannot take every slot.
pub const MAX_PER_SOURCE: u32 = 1024;
/// A proxied connection with no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The bounds a test may make smaller; the process serves with [`Limits::default`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub per_source: u32,
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_source: MAX_PER_SOURCE,
            idle: IDLE_TIMEOUT,
        }
    }
}
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONTROL_READ: Duration = Duration::from_secs(2);
pub const MAX_CONTROL: usize = 4;
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where new connections go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Route {
    backend: Option<Backend>,
    /// Held until then: nothing is accepted.
    held_until: Option<Instant>,
}

/// Where a connection goes: 127.0.0.1:`port`, after a PROXY protocol v2 header that gives
/// the client's address when `proxy_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backend {
    port: u16,
    proxy_protocol: bool,
}

impl Route {
    fn held(&self, now: Instant) -> bool {
        self.held_until.is_some_and(|t| now < t)
    }
}

/// What the accept loop, the forwarders and the control share.
struct Shared {
    route: watch::Sender<Route>,
    open: Mutex<BTreeMap<u16, u32>>,
    /// Open connections per client address, for [`MAX_PER_SOURCE`].
    sources: Mutex<HashMap<IpAddr, u32>>,
    accepted: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    stop: watch::Sender<bool>,
    limits: Limits,
}

impl Shared {
    fn status(&self) -> Status {
        let route = *self.route.borrow();
        Status {
            backend: route.backend.map(|b| b.port),
            proxy_protocol: route.backend.is_some_and(|b| b.proxy_protocol),
            held: route.held(Instant::now()),
            open: self.open.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            accepted: self.accepted.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection from `source`, unless it has [`MAX_PER_SOURCE`] open already.
    fn admit(&self, source: IpAddr) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let n = sources.entry(source).or_default();
        if *n >= self.limits.per_source {
            return false;
        }
        *n += 1;
        true
    }

    fn left(&self, source: IpAddr) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = sources.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&source);
            }
        }
    }

    fn opened(&self, port: u16) {
        *self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(port)
            .or_default() += 1;
    }

    fn closed(&self, port: u16) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&port);
            }
        }
    }
}

/// The proxy's exit code when it cannot bind its public address (any other failure exits
/// 1, and clap's usage errors 2): the agent tells the cases apart by it.
pub const EXIT_BIND: i32 = 3;

/// The subcommand: binds, drops privileges, serves until stopped. Exits [`EXIT_BIND`]
/// with `binding ADDR: ...` on stderr when the address cannot be bound.
pub fn main(dir: &Path, listen: SocketAddr) -> Result<()> {
    let listener = match bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("switch-proxy: binding {listen}: {e}");
            std::process::exit(EXIT_BIND);
        }
    };
    let socket = super::socket_path(&crate::lifecycle::state::AppDir {
        root: dir.to_path_buf(),
    });
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(&socket)?
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket", socket.display()),
        Err(_) => {}
    }
    let control = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    control.set_nonblocking(true)?;
    raise_descriptor_limit();
    drop_privileges()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::from_std(listener)?;
        let control = UnixListener::from_std(control)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("handling SIGTERM")?;
        eprintln!(
            "switch-proxy: serving {listen} (pid {})",
            std::process::id()
        );
        serve(listener, control, Limits::default(), async move {
            term.recv().await;
            eprintln!("switch-proxy: SIGTERM");
        })
        .await
    })
}

/// The public listener: SO_REUSEADDR, a backlog of 1024, non-blocking.
fn bind(listen: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Two descriptors per connection and some to spare: the soft limit is raised to that (or
/// to the hard limit), and as root the hard limit too. The usual soft limit of 1024 would
/// otherwise cap the proxy near 500 connections, far below [`MAX_CONNECTIONS`].
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 2 * MAX_CONNECTIONS as u64 + 64;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let hard = if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        want
    } else {
        hard
    };
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard) {
        eprintln!("switch-proxy: raising the descriptor limit from {soft}: {e}");
    }
}

/// As root: no supplementary groups, gid and uid 65534, and no way back (`no_new_privs`).
/// The sockets bound before stay usable.
fn drop_privileges() -> Result<()> {
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    if !Uid::effective().is_root() {
        return Ok(());
    }
    setgroups(&[]).context("dropping supplementary groups")?;
    setgid(Gid::from_raw(65534)).context("setgid(65534)")?;
    setuid(Uid::from_raw(65534)).context("setuid(65534)")?;
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let r = unsafe { nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        anyhow::bail!(
            "prctl(PR_SET_NO_NEW_PRIVS): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Forwards `listener`'s connections and answers `control` until a `stop` request or
/// `shutdown` completes (the subcommand's is SIGTERM), then closes the listener and gives
/// open connections [`STOP_GRACE`].
pub async fn serve(
    listener: TcpListener,
    control: UnixListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (route, _) = watch::channel(Route::default());
    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        route,
        open: Mutex::new(BTreeMap::new()),
        sources: Mutex::new(HashMap::new()),
        accepted: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stop,
        limits,
    });
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let control_task = tokio::spawn(answer_control(control, shared.clone()));
    let signal_shared = shared.clone();
    let signal_task = tokio::spawn(async move {
        shutdown.await;
        signal_shared.stop.send_replace(true);
    });
    accept_loop(&listener, &shared, &connections).await;
    drop(listener);
    control_task.abort();
    signal_task.abort();
    // Open connections finish, within the grace.
    let _ =
        tokio::time::timeout(STOP_GRACE, connections.acquire_many(MAX_CONNECTIONS as u32)).await;
    eprintln!("switch-proxy: stopped");
    Ok(())
}

async fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, connections: &Arc<Semaphore>) {
    let mut route_rx = shared.route.subscribe();
    let mut stop_rx = shared.stop.subscribe();
    let mut errors = AcceptErrors::default();
    loop {
        if *stop_rx.borrow() {
            return;
        }
        // Accept only while routed and not held.
        let route = *route_rx.borrow_and_update();
        let now = Instant::now();
        if route.backend.is_none() || route.held(now) {
            let until = route
                .held_until
                .filter(|_| route.backend.is_some())
                .map(|t| t.max(now));
            tokio::select! {
                _ = route_rx.changed() => {}
                _ = stop_rx.changed() => {}
                _ = async {
                    match until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            continue;
        }
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.expect("never closed"),
            _ = stop_rx.changed() => continue,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, from)) => {
                    errors.ok();
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    let source = source_key(from.ip());
                    if !shared.admit(source) {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        drop(client);
                        continue;
                    }
                    // A hold or a route may have come as this connection was accepted:
                    // it goes where the route in force says, once no hold is.
                    // Unrouted meanwhile: it waits for the next route, never goes to the
                    // port just left (a dead service's, maybe taken by another process).
                    let mut route_now = shared.route.subscribe();
                    let backend = tokio::select! {
                        b = routable(&mut route_now) => b,
                        _ = stop_rx.changed() => None,
                    };
                    let Some(backend) = backend else {
                        shared.left(source);
                        continue;
                    };
                    shared.opened(backend.port);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        forward(client, backend, &shared).await;
                        shared.closed(backend.port);
                        shared.left(source);
                        drop(permit);
                    });
                }
                // Out of descriptors, say: not the listener's end. It passes when
                // connections close.
                Err(e) => errors.failed(&e).await,
            },
            // A route or a hold changes what the next connection gets: look again.
            _ = route_rx.changed() => {}
            _ = stop_rx.changed() => {}
        }
    }
}

/// What [`MAX_PER_SOURCE`] counts by: an IPv4 address (mapped ones as such), or an IPv6
/// /64, which one client usually holds whole.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Accept errors in a row: each waits twice as long as the one before (10 ms to 1 s), and
/// the log gets at most one line a second, with how many it did not get.
#[derive(Default)]
struct AcceptErrors {
    in_a_row: u32,
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptErrors {
    fn ok(&mut self) {
        self.in_a_row = 0;
    }

    async fn failed(&mut self, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            eprintln!(
                "switch-proxy: accept: {e} ({} more since the last line)",
                self.unlogged
            );
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let wait = Duration::from_millis(10 << self.in_a_row.min(7)).min(Duration::from_secs(1));
        self.in_a_row = self.in_a_row.saturating_add(1);
        tokio::time::sleep(wait).await;
    }
}

/// The backend of the route in force once it is not held (at once when it is not), or
/// once there is one again (unrouted: until the next route). `None` only when the route
/// can no longer change.
async fn routable(rx: &mut watch::Receiver<Route>) -> Option<Backend> {
    loop {
        let route = *rx.borrow_and_update();
        let until = match (route.backend, route.held_until) {
            (Some(_), Some(t)) if Instant::now() < t => Some(t),
            (Some(backend), _) => return Some(backend),
            (None, _) => None,
        };
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return None },
            _ = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

async fn forward(client: TcpStream, to: Backend, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let header = match (to.proxy_protocol, client.peer_addr(), client.local_addr()) {
        (false, ..) => None,
        (true, Ok(from), Ok(at)) => Some(proxy_header(from, at)),
        (true, ..) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut backend = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], to.port))).await?;
        if let Some(header) = &header {
            backend.write_all(header).await?;
        }
        std::io::Result::Ok(backend)
    })
    .await;
    let backend = match connected {
        Ok(Ok(b)) => b,
        _ => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    let activity = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut client = Tracked {
        inner: client,
        activity: activity.clone(),
        began,
    };
    let mut backend = Tracked {
        inner: backend,
        activity: activity.clone(),
        began,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
    tokio::pin!(copy);
    loop {
        let last = began + Duration::from_millis(activity.load(Ordering::Relaxed));
        tokio::select! {
            _ = &mut copy => return,
            _ = tokio::time::sleep_until(last + shared.limits.idle) => {
                let now = began + Duration::from_millis(activity.load(Ordering::Relaxed));
                if now == last {
                    // Idle both ways: closed (both streams dropped on return).
                    return;
                }
            }
        }
    }
}

/// The PROXY protocol v2 header of a TCP connection from `from` to `at` (the public
/// address it reached): the 12-byte signature, version 2 and the PROXY command, the
/// family, the length of the addresses, then source and destination addresses and ports.
/// IPv4 when both are IPv4 (or mapped to IPv6), else IPv6.
fn proxy_header(from: SocketAddr, at: SocketAddr) -> Vec<u8> {
    const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut header = SIGNATURE.to_vec();
    header.push(0x21);
    match (from.ip().to_canonical(), at.ip().to_canonical()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(0x11);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            header.push(0x21);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&v6(src).octets());
            header.extend_from_slice(&v6(dst).octets());
        }
    }
    header.extend_from_slice(&from.port().to_be_bytes());
    header.extend_from_slice(&at.port().to_be_bytes());
    header
}

/// A stream that notes when it last read a byte (milliseconds after `began`), for the
/// idle timeout.
struct Tracked {
    inner: TcpStream,
    activity: Arc<AtomicU64>,
    began: Instant,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let ms = self.began.elapsed().as_millis() as u64;
            self.activity.store(ms, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn answer_control(control: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONTROL));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match control.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: waited out, not spun on.
                eprintln!("switch-proxy: control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = answer_one(stream, &shared).await;
            drop(permit);
        });
    }
}

async fn answer_one(stream: tokio::net::UnixStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        CONTROL_READ,
        tokio::io::BufReader::new(read.take(MAX_LINE as u64 + 1)).read_line(&mut line),
    )
    .await;
    let answer = match read {
        Err(_) => refuse(format!(
            "no request line within {}s",
            CONTROL_READ.as_secs()
        )),
        Ok(Err(e)) => refuse(format!("reading the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_LINE || !line.ends_with('\n') => {
            refuse(format!("a request is one line of at most {MAX_LINE} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => refuse(format!("not a request: {e}")),
            Ok(request) => apply(request, shared),
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

fn refuse(error: String) -> Answer {
    Answer {
        ok: false,
        status: None,
        error: Some(error),
    }
}

fn apply(request: Request, shared: &Shared) -> Answer {
    match request {
        Request::Route { port: 0, .. } => return refuse("port 0 is no backend".into()),
        Request::Route {
            port,
            proxy_protocol,
        } => {
            shared.route.send_replace(Route {
                backend: Some(Backend {
                    port,
                    proxy_protocol,
                }),
                held_until: None,
            });
            let with = if proxy_protocol {
                " with a PROXY protocol header"
            } else {
                ""
            };
            eprintln!("switch-proxy: new connections go to 127.0.0.1:{port}{with}");
        }
        Request::Unroute => {
            shared.route.send_replace(Route::default());
            eprintln!("switch-proxy: new connections wait: no backend");
        }
        Request::Hold { for_ms } => {
            let for_ms = for_ms.min(super::HOLD_LIMIT.as_millis() as u64);
            shared.route.send_modify(|r| {
                r.held_until = Some(Instant::now() + Duration::from_millis(for_ms))
            });
        }
        Request::Status => {}
        Request::Stop => {
            shared.stop.send_replace(true);
        }
    }
    Answer {
        ok: true,
        status: Some(shared.status()),
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::state::{AppDir, write_json};
    use std::io::{Read, Write};

    /// A switch whose every connection goes through the proxy: these tests are the
    /// proxy's (the kernel rule's own are in `kernel.rs` and the switch tests).
    fn via_proxy(proxy_protocol: bool) -> crate::appspec::SwitchSpec {
        crate::appspec::SwitchSpec {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            drain_timeout: Duration::from_secs(30),
            keep_previous: Duration::ZERO,
            proxy_protocol,
            forward: crate::appspec::Forward::Proxy,
        }
    }

    /// A backend that answers every connection with its `name` once it has read a line,
    /// then closes.
    fn backend(name: &'static str) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(name.as_bytes());
                });
            }
        });
        port
    }

    /// A proxy serving in a thread of its own, and the agent's handle on it. Dropped, it
    /// is shut down and its thread joined.
    struct Running {
        public: SocketAddr,
        proxy: super::super::Proxy,
        shutdown: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<()>>>,
        _tmp: tempfile::TempDir,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            drop(self.shutdown.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn running() -> Running {
        running_with(Limits::default())
    }

    fn running_with(limits: Limits) -> Running {
        let tmp = tempfile::tempdir().unwrap();
        let dir = AppDir {
            root: tmp.path().to_path_buf(),
        };
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let public = listener.local_addr().unwrap();
        let socket = super::super::socket_path(&dir);
        let control = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        control.set_nonblocking(true).unwrap();
        let (shutdown, shut) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    serve(
                        TcpListener::from_std(listener).unwrap(),
                        UnixListener::from_std(control).unwrap(),
                        limits,
                        async move {
                            let _ = shut.await;
                        },
                    )
                    .await
                })
        });
        let proxy = super::super::Proxy {
            record: super::super::SwitchRecord {
                pid: std::process::id() as i32,
                start_ticks: 0,
                listen: public,
            },
            kernel: super::super::kernel::Kernel::of(&dir),
            socket,
            dir,
            seen: Status::default(),
        };
        Running {
            public,
            proxy,
            shutdown: Some(shutdown),
            thread: Some(thread),
            _tmp: tmp,
        }
    }

    /// Connects, sends a line, reads the answer to the end.
    fn ask(public: SocketAddr) -> String {
        let mut s = std::net::TcpStream::connect(public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"hi\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "waited too long for {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn routes_hold_and_switch_with_open_connections_kept_where_they_were() {
        let r = running();
        let (a, b) = (backend("A"), backend("B"));
        r.proxy.route(a, &via_proxy(false)).unwrap();
        assert_eq!(ask(r.public), "A");

        // A connection open on A stays on A after the switch to B, and is counted there.
        let mut open = std::net::TcpStream::connect(r.public).unwrap();
        wait_until("the open connection counted on A", || {
            r.proxy.status().unwrap().open.get(&a) == Some(&1)
        });
        // Held: a connection made now is answered only after the route, and by B.
        let held = r.proxy.hold().unwrap();
        assert!(held.held, "{held:?}");
        let public = r.public;
        let waiting = std::thread::spawn(move || ask(public));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished(), "a held connection was served");
        let status = r.proxy.route(b, &via_proxy(false)).unwrap();
        assert_eq!(status.backend, Some(b));
        assert!(!status.held);
        assert_eq!(waiting.join().unwrap(), "B");
        assert_eq!(ask(r.public), "B");

        open.write_all(b"x\n").unwrap();
        let mut out = String::new();
        open.read_to_string(&mut out).unwrap();
        assert_eq!(out, "A", "an open connection moved");
        drop(open);
        assert_eq!(
            super::super::drain(Some(&r.proxy), a, Duration::from_secs(20)).unwrap(),
            0
        );
        let status = r.proxy.status().unwrap();
        assert!(status.open.is_empty(), "{status:?}");
        assert_eq!(status.accepted, 4);
        assert_eq!(status.failed, 0);
    }

    #[test]
    fn a_hold_ends_by_itself_and_a_drain_gives_up_at_its_timeout() {
        let r = running();
        let a = backend("A");
        r.proxy.route(a, &via_proxy(false)).unwrap();
        r.proxy.ask(&Request::Hold { for_ms: 300 }).unwrap();
        let began = std::time::Instant::now();
        assert_eq!(ask(r.public), "A");
        assert!(
            began.elapsed() >= Duration::from_millis(250),
            "the hold did not hold"
        );
        // A connection that stays open is still counted when the drain gives up.
        let _open = std::net::TcpStream::connect(r.public).unwrap();
        wait_until("the connection counted", || {
            r.proxy.status().unwrap().open.get(&a) == Some(&1)
        });
        assert_eq!(
            super::super::drain(Some(&r.proxy), a, Duration::from_millis(100)).unwrap(),
            1
        );
    }

    #[test]
    fn a_dead_backend_is_counted_and_bad_control_requests_change_nothing() {
        let r = running();
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        r.proxy.route(dead, &via_proxy(false)).unwrap();
        assert_eq!(ask(r.public), "", "a connection to no backend is closed");
        wait_until("the failure counted", || {
            r.proxy.status().unwrap().failed == 1
        });

        for garbage in [
            "not json\n".to_string(),
            format!("{}\n", "x".repeat(MAX_LINE * 2)),
            "{\"op\":\"route\",\"port\":0}\n".to_string(),
        ] {
            let mut s = std::os::unix::net::UnixStream::connect(&r.proxy.socket).unwrap();
            let _ = s.write_all(garbage.as_bytes());
            let mut answer = Vec::new();
            // The answer to an oversized line may be lost to the reset of the bytes left
            // unread: what came, if anything, is a refusal.
            let _ = s.read_to_end(&mut answer);
            if !answer.is_empty() || garbage.len() <= MAX_LINE {
                let answer: Answer = serde_json::from_slice(&answer).unwrap();
                assert!(!answer.ok && answer.error.is_some(), "{answer:?}");
            }
        }
        // Silence is refused too, after its time.
        let mut s = std::os::unix::net::UnixStream::connect(&r.proxy.socket).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("no request line"), "{answer}");
        // Still serving, still routed where it was.
        let a = backend("A");
        assert_eq!(r.proxy.status().unwrap().backend, Some(dead));
        r.proxy.route(a, &via_proxy(false)).unwrap();
        assert_eq!(ask(r.public), "A");
    }

    #[test]
    fn one_source_gets_its_share_and_its_slots_come_back() {
        let r = running_with(Limits {
            per_source: 2,
            ..Limits::default()
        });
        let a = backend("A");
        r.proxy.route(a, &via_proxy(false)).unwrap();
        // Two idle connections from 127.0.0.1 take its share: a third is closed at once,
        // counted as refused, while another address is served.
        let first = std::net::TcpStream::connect(r.public).unwrap();
        let second = std::net::TcpStream::connect(r.public).unwrap();
        wait_until("two connections counted", || {
            r.proxy.status().unwrap().open.get(&a) == Some(&2)
        });
        assert_eq!(
            ask(r.public),
            "",
            "a third connection from one source was served"
        );
        assert_eq!(r.proxy.status().unwrap().refused, 1);
        // Another source: a connection from another local address.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
            .unwrap();
        s.connect(&r.public.into()).unwrap();
        let mut s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"hi\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert_eq!(out, "A", "another source was refused");
        // Closed, they give their slots back.
        drop((first, second, s));
        wait_until("the connections closed", || {
            r.proxy.status().unwrap().open.is_empty()
        });
        assert_eq!(ask(r.public), "A");
        // IPv6 clients are counted by /64; mapped IPv4 ones as IPv4.
        assert_eq!(
            source_key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            source_key("2001:db8:1:2:bbbb::9".parse().unwrap())
        );
        assert_ne!(
            source_key("2001:db8:1:2::1".parse().unwrap()),
            source_key("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            source_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_connection_idle_both_ways_is_closed_and_a_busy_one_is_not() {
        let idle = Duration::from_secs(2);
        let r = running_with(Limits {
            idle,
            ..Limits::default()
        });
        // An echo backend: a busy connection keeps getting bytes back.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        r.proxy.route(port, &via_proxy(false)).unwrap();
        let mut quiet = std::net::TcpStream::connect(r.public).unwrap();
        let mut busy = std::net::TcpStream::connect(r.public).unwrap();
        busy.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // The busy one talks (a byte every 100 ms) for twice the idle timeout.
        let began = std::time::Instant::now();
        while began.elapsed() < idle * 2 {
            busy.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            busy.read_exact(&mut one).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        // The quiet one is closed by then (or soon: a read that times out fails).
        quiet
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(
            quiet.read_to_end(&mut rest).unwrap(),
            0,
            "bytes on an idle connection"
        );
        busy.write_all(b"y").unwrap();
        let mut one = [0u8; 1];
        busy.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y", "the busy connection was closed");
    }

    #[test]
    fn a_proxy_protocol_route_tells_the_backend_who_the_client_is() {
        let r = running();
        // A backend that answers with the first 28 bytes it reads: an IPv4 header.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut header = [0u8; 28];
                if s.read_exact(&mut header).is_ok() {
                    let _ = s.write_all(&header);
                }
            }
        });
        let status = r.proxy.route(port, &via_proxy(true)).unwrap();
        assert!(status.proxy_protocol, "{status:?}");
        let mut s = std::net::TcpStream::connect(r.public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let client = s.local_addr().unwrap();
        let mut header = [0u8; 28];
        s.read_exact(&mut header).unwrap();
        assert_eq!(&header[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(header[12], 0x21, "version 2, PROXY");
        assert_eq!(header[13], 0x11, "TCP over IPv4");
        assert_eq!(u16::from_be_bytes([header[14], header[15]]), 12);
        assert_eq!(header[16..20], [127, 0, 0, 1]);
        assert_eq!(header[20..24], [127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([header[24], header[25]]), client.port());
        assert_eq!(
            u16::from_be_bytes([header[26], header[27]]),
            r.public.port()
        );
        // IPv6 (and a mapped client) as the v2 header spells them.
        let v6 = proxy_header(
            "[::1]:4000".parse().unwrap(),
            "[::ffff:10.0.0.1]:80".parse().unwrap(),
        );
        assert_eq!((v6[13], v6.len()), (0x21, 16 + 36));
        assert_eq!(v6[16..32], std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(
            v6[32..48],
            std::net::Ipv4Addr::new(10, 0, 0, 1)
                .to_ipv6_mapped()
                .octets()
        );
        let v4 = proxy_header(
            "[::ffff:10.0.0.2]:4000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        assert_eq!((v4[13], v4.len()), (0x11, 16 + 12));
        // A route without it: none.
        let plain = backend("A");
        assert!(
            !r.proxy
                .route(plain, &via_proxy(false))
                .unwrap()
                .proxy_protocol
        );
        assert_eq!(ask(r.public), "A");
    }

    #[test]
    fn unrouted_connections_wait_for_the_next_route() {
        let r = running();
        let (a, b) = (backend("A"), backend("B"));
        r.proxy.route(a, &via_proxy(false)).unwrap();
        let status = r.proxy.unroute().unwrap();
        assert_eq!(status.backend, None);
        let public = r.public;
        let waiting = std::thread::spawn(move || ask(public));
        // Longer than any hold: an unrouted proxy hands out nothing by itself.
        std::thread::sleep(super::super::HOLD_LIMIT + Duration::from_millis(300));
        assert!(!waiting.is_finished(), "an unrouted connection was served");
        r.proxy.route(b, &via_proxy(false)).unwrap();
        assert_eq!(waiting.join().unwrap(), "B");
    }

    #[test]
    fn a_bare_hold_is_the_longest_and_a_route_ends_it() {
        let r = running();
        let a = backend("A");
        r.proxy.route(a, &via_proxy(false)).unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&r.proxy.socket).unwrap();
        s.write_all(b"{\"op\":\"hold\"}\n").unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        let answer: Answer = serde_json::from_slice(&answer).unwrap();
        assert!(answer.ok && answer.status.is_some_and(|s| s.held));
        let status = r.proxy.route(a, &via_proxy(false)).unwrap();
        assert!(!status.held, "{status:?}");
        assert_eq!(ask(r.public), "A");
    }

    #[test]
    fn stop_closes_the_listener_lets_open_connections_finish_and_forgets_the_proxy() {
        let r = running();
        let a = backend("A");
        r.proxy.route(a, &via_proxy(false)).unwrap();
        write_json(&super::super::record_path(&r.proxy.dir), &r.proxy.record).unwrap();
        let mut open = std::net::TcpStream::connect(r.public).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        wait_until("the open connection counted", || {
            r.proxy.status().unwrap().open.get(&a) == Some(&1)
        });
        // The agent's call; its record's start time is no process's, so it signals nothing.
        let handle = super::super::Proxy {
            record: r.proxy.record.clone(),
            socket: r.proxy.socket.clone(),
            dir: r.proxy.dir.clone(),
            seen: Status::default(),
            kernel: super::super::kernel::Kernel::of(&r.proxy.dir),
        };
        handle.stop().unwrap();
        assert!(!r.proxy.dir.root.join("switch.json").exists());
        assert!(!r.proxy.socket.exists());
        wait_until("the listener closed", || {
            std::net::TcpStream::connect(r.public).is_err()
        });
        let thread = r.thread.as_ref().unwrap();
        assert!(
            !thread.is_finished(),
            "it did not wait for the open connection"
        );
        // The open connection still reaches its backend, and then the proxy is done.
        open.write_all(b"x\n").unwrap();
        let mut out = String::new();
        open.read_to_string(&mut out).unwrap();
        assert_eq!(out, "A");
        drop(open);
        wait_until("the proxy done", || thread.is_finished());
    }

    #[test]
    fn running_adopts_only_the_recorded_process_that_answers() {
        let r = running();
        let dir = r.proxy.dir.clone();
        assert!(super::super::running(&dir).unwrap().is_none(), "no record");
        let me = std::process::id() as i32;
        let mut record = super::super::SwitchRecord {
            pid: me,
            start_ticks: super::super::start_ticks(me).unwrap(),
            listen: r.public,
        };
        write_json(&super::super::record_path(&dir), &record).unwrap();
        let adopted = super::super::running(&dir).unwrap().expect("adopted");
        assert_eq!(adopted.record(), &record);
        // Another start time: another process under a recycled pid.
        record.start_ticks += 1;
        write_json(&super::super::record_path(&dir), &record).unwrap();
        assert!(super::super::running(&dir).unwrap().is_none());
        // The right process, and no answer on the socket.
        record.start_ticks -= 1;
        write_json(&super::super::record_path(&dir), &record).unwrap();
        r.proxy.ask(&Request::Stop).unwrap();
        wait_until("the control socket closed", || {
            std::os::unix::net::UnixStream::connect(&r.proxy.socket).is_err()
        });
        assert!(super::super::running(&dir).unwrap().is_none());
    }

    #[test]
    fn a_proxy_that_exits_at_its_start_is_told_apart_by_its_exit_code() {
        use std::os::unix::process::ExitStatusExt;
        // wait(2)'s status word: the exit code in the second byte.
        let code = |c: i32| Some(std::process::ExitStatus::from_raw(c << 8));
        let listen: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let log = "switch-proxy: binding 0.0.0.0:8080: Address already in use (os error 98)\n";
        let e = super::super::exited(listen, code(EXIT_BIND), log);
        assert!(
            matches!(&e, super::super::SwitchError::Bind { addr, reason }
                if *addr == listen && reason == "Address already in use (os error 98)"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the switch cannot listen: binding 0.0.0.0:8080: Address already in use (os error 98)"
        );
        // The words alone decide nothing: the same line with another exit code (clap's
        // usage error is 2) is not a bind failure, and a bind failure with other words
        // still is one.
        let e = super::super::exited(listen, code(2), log);
        assert!(
            matches!(&e, super::super::SwitchError::Exited { .. }),
            "{e:?}"
        );
        let e = super::super::exited(listen, code(1), log);
        assert!(
            matches!(&e, super::super::SwitchError::Exited { log: l, status } if l == log && status == "exit status: 1"),
            "{e:?}"
        );
        let e = super::super::exited(listen, code(EXIT_BIND), "killed by the OOM\n");
        assert!(
            matches!(&e, super::super::SwitchError::Bind { reason, .. } if reason == "killed by the OOM"),
            "{e:?}"
        );
        let log = "error: binding /d/switch.sock: Permission denied (os error 13)\n";
        let e = super::super::exited(listen, code(1), log);
        assert!(
            matches!(&e, super::super::SwitchError::Exited { log: l, .. } if l == log),
            "{e:?}"
        );
        let e = super::super::exited(listen, None, log);
        assert!(
            matches!(&e, super::super::SwitchError::Exited { status, .. } if status == "gone"),
            "{e:?}"
        );
    }
}
