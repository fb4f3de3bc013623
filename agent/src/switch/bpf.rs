//! The switch's connect-time redirect (decision 0026): a `cgroup/connect4` eBPF program,
//! assembled here, that rewrites a TCP `connect()` to the public port into one to the
//! serving revision's port before the first packet exists, and the few `bpf(2)` calls
//! that load, attach, find and detach it.
//!
//! The program is about forty instructions, built by [`program`] from the switch's public
//! address, the serving port, the host's own IPv4 addresses, the network namespace's
//! cookie and an expiry time; the kernel's verifier checks it at [`load`]. It lets every
//! other connection through untouched. It redirects one only when all of these hold:
//! - the destination port is the public port, and the socket is TCP;
//! - the program has not expired (`bpf_ktime_get_boot_ns`): its agent replaces it every
//!   [`TTL`]` / 2`, so a program left by an agent that is gone redirects nothing after
//!   [`TTL`], and any agent detaches it;
//! - the connecting socket is in the agent's network namespace (a container on the same
//!   cgroup tree with its own listener on that port is not this host's service);
//! - the destination is an address of this host (for a proxy bound to `0.0.0.0`:
//!   127.0.0.0/8 or one of [`Redirect::locals`]; for a proxy bound to one address, that
//!   address);
//! - the kernel's own socket lookup for that destination finds a listener bound where the
//!   proxy binds (`bpf_sk_lookup_tcp`): the connection would have reached a listener at
//!   the proxy's address and port (the proxy's, while the switch runs).
//!
//! The byte order of the fields is that of little-endian hosts (x86-64, aarch64), the only
//! ones this is built for.
//!
//! Programs are attached to the root of the cgroup v2 tree with `BPF_F_ALLOW_MULTI`, so they
//! apply to every process of the host and outlive the agent (traffic keeps its fast path
//! while the agent restarts). They are found again by name (`shoal_` and 9 hex digits of
//! the application's directory), and replaced in one step (`BPF_F_REPLACE`), so a
//! connection sees the old target or the new one.
//!
//! Why raw `bpf(2)` rather than a loader crate: aya and libbpf load programs compiled to
//! eBPF ELF objects, which needs a BPF toolchain (nightly Rust and bpf-linker, or clang) at
//! build time; this program is small enough to assemble, and its parts are unit-tested and
//! then verified by the kernel in `tests`.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use nix::libc;

#[cfg(target_endian = "big")]
compile_error!("switch/bpf.rs writes the program's constants in little-endian order");

/// The most host addresses a program tests by itself; past them, connections to the other
/// addresses go through the proxy (still served, one hop more).
pub const MAX_LOCALS: usize = 64;
/// How long a program redirects after it was made: the agent replaces its own every
/// [`TTL`]` / 2` (from the supervisor's pass, or while a deployment holds the
/// application), so a program whose agent is gone (killed, its data directory moved or
/// wiped) is the one that outlives it; such a program is inert, and detached by any agent
/// that sees it.
pub const TTL: Duration = Duration::from_secs(120);
/// The name every switch program's starts with.
pub const PREFIX: &str = "shoal_";
/// How much of the verifier's log is kept when it refuses a program.
const LOG_SIZE: usize = 64 << 10;

// From linux/bpf.h.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_REPLACE: u32 = 1 << 2;
const SO_NETNS_COOKIE: libc::c_int = 71;

// Helpers the program calls.
const HELPER_KTIME_GET_BOOT_NS: i32 = 125;
const HELPER_SK_LOOKUP_TCP: i32 = 84;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_GET_NETNS_COOKIE: i32 = 122;

// Offsets in `struct bpf_sock_addr` (the program's context) and `struct bpf_sock`.
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;
const SOCK_SRC_IP4: i16 = 24;

/// One eBPF instruction, as the kernel reads it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl fmt::Debug for Insn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x} r{} r{} {:+} {:#x}",
            self.code,
            self.regs & 0xf,
            self.regs >> 4,
            self.off,
            self.imm
        )
    }
}

/// What one application's program redirects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Where the proxy listens (the public address and port).
    pub listen: SocketAddrV4,
    /// The serving revision's port on 127.0.0.1.
    pub backend: u16,
    /// This host's IPv4 addresses outside 127.0.0.0/8, read when the program was made
    /// (used only when `listen` is `0.0.0.0`; at most [`MAX_LOCALS`]).
    pub locals: Vec<Ipv4Addr>,
    /// The cookie of the network namespace whose connections are redirected.
    pub netns: u64,
}

/// A network-order address as the context holds it: its wire bytes read as a
/// (little-endian) `u32`.
fn wire_ip(ip: Ipv4Addr) -> i32 {
    u32::from_ne_bytes(ip.octets()) as i32
}

fn wire_port(port: u16) -> i32 {
    // The port's two wire bytes sit at the start of the 32-bit field.
    let b = port.to_be_bytes();
    u32::from_ne_bytes([b[0], b[1], 0, 0]) as i32
}

/// A forward jump to `allow` (the end), resolved when the program is finished.
const TO_ALLOW: i16 = i16::MIN;
const TO_LOOKUP: i16 = i16::MIN + 1;

struct Asm(Vec<Insn>);

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.0.push(Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        });
    }
    /// dst = *(u32 *)(src + off)
    fn load32(&mut self, dst: u8, src: u8, off: i16) {
        self.op(0x61, dst, src, off, 0);
    }
    /// *(u32 *)(dst + off) = src
    fn store32(&mut self, dst: u8, off: i16, src: u8) {
        self.op(0x63, dst, src, off, 0);
    }
    /// *(u32 *)(dst + off) = imm (the stack only: the verifier refuses it on the context)
    fn store32_imm(&mut self, dst: u8, off: i16, imm: i32) {
        self.op(0x62, dst, 0, off, imm);
    }
    fn mov(&mut self, dst: u8, src: u8) {
        self.op(0xbf, dst, src, 0, 0);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.op(0xb7, dst, 0, 0, imm);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.op(0x07, dst, 0, 0, imm);
    }
    fn and_imm(&mut self, dst: u8, imm: i32) {
        self.op(0x57, dst, 0, 0, imm);
    }
    /// dst = imm64 (two slots)
    fn load_imm64(&mut self, dst: u8, imm: u64) {
        self.op(0x18, dst, 0, 0, imm as u32 as i32);
        self.op(0, 0, 0, 0, (imm >> 32) as u32 as i32);
    }
    /// A 32-bit compare (`BPF_JMP32`): a 64-bit one would sign-extend `imm`, and an
    /// address or port with its top bit set would never match the zero-extended field.
    fn jne32_imm(&mut self, dst: u8, imm: i32, to: i16) {
        self.op(0x56, dst, 0, to, imm);
    }
    fn jeq32_imm(&mut self, dst: u8, imm: i32, to: i16) {
        self.op(0x16, dst, 0, to, imm);
    }
    /// A 64-bit compare with 0: how the verifier learns that a pointer is not null.
    fn jeq_null(&mut self, dst: u8, to: i16) {
        self.op(0x15, dst, 0, to, 0);
    }
    /// Unsigned `dst > src`, 64 bits.
    fn jgt(&mut self, dst: u8, src: u8, to: i16) {
        self.op(0x2d, dst, src, to, 0);
    }
    fn jne(&mut self, dst: u8, src: u8, to: i16) {
        self.op(0x5d, dst, src, to, 0);
    }
    fn ja(&mut self, to: i16) {
        self.op(0x05, 0, 0, to, 0);
    }
    fn call(&mut self, helper: i32) {
        self.op(0x85, 0, 0, 0, helper);
    }
    fn exit(&mut self) {
        self.op(0x95, 0, 0, 0, 0);
    }
    fn here(&self) -> usize {
        self.0.len()
    }
    /// Points every jump marked `mark` at instruction `target`.
    fn resolve(&mut self, mark: i16, target: usize) {
        for (i, insn) in self.0.iter_mut().enumerate() {
            if is_jump(insn) && insn.off == mark {
                insn.off = (target as isize - i as isize - 1) as i16;
            }
        }
    }
}

/// Whether `insn` jumps (`BPF_JMP` or `BPF_JMP32`, not a call or an exit).
fn is_jump(insn: &Insn) -> bool {
    matches!(insn.code & 0x07, 0x05 | 0x06) && insn.code != 0x85 && insn.code != 0x95
}

/// The program for `r`, inert once `CLOCK_BOOTTIME` passes `expires_ns` (see the
/// module's documentation for what it tests).
pub fn program(r: &Redirect, expires_ns: u64) -> Vec<Insn> {
    let mut a = Asm(Vec::with_capacity(48 + r.locals.len()));
    // r6: the context, kept across calls.
    a.mov(6, 1);
    a.load32(2, 6, CTX_USER_PORT);
    a.jne32_imm(2, wire_port(r.listen.port()), TO_ALLOW);
    a.load32(2, 6, CTX_PROTOCOL);
    a.jne32_imm(2, libc::IPPROTO_TCP, TO_ALLOW);
    a.call(HELPER_KTIME_GET_BOOT_NS);
    a.load_imm64(2, expires_ns);
    a.jgt(0, 2, TO_ALLOW);
    a.mov(1, 6);
    a.call(HELPER_GET_NETNS_COOKIE);
    a.load_imm64(2, r.netns);
    a.jne(0, 2, TO_ALLOW);
    // r8: the destination address.
    a.load32(8, 6, CTX_USER_IP4);
    if r.listen.ip().is_unspecified() {
        // Any address of this host: 127.0.0.0/8 (its first wire byte), or one of `locals`.
        a.mov(2, 8);
        a.and_imm(2, 0xff);
        a.jeq32_imm(2, 127, TO_LOOKUP);
        for ip in r.locals.iter().take(MAX_LOCALS) {
            a.jeq32_imm(8, wire_ip(*ip), TO_LOOKUP);
        }
        a.ja(TO_ALLOW);
    }
    // The listener the connection would reach: `struct bpf_sock_tuple` (saddr, daddr,
    // sport, dport) on the stack, looked up in the socket's own namespace.
    let lookup = a.here();
    a.store32_imm(10, -16, 0);
    a.store32(10, -12, 8);
    a.store32_imm(10, -8, wire_port(r.listen.port()) << 16);
    a.mov(1, 6);
    a.mov(2, 10);
    a.add_imm(2, -16);
    a.mov_imm(3, 12);
    a.mov_imm(4, -1); // BPF_F_CURRENT_NETNS
    a.mov_imm(5, 0);
    a.call(HELPER_SK_LOOKUP_TCP);
    a.jeq_null(0, TO_ALLOW);
    // r7: the address that listener is bound to; the reference is given back at once.
    a.load32(7, 0, SOCK_SRC_IP4);
    a.mov(1, 0);
    a.call(HELPER_SK_RELEASE);
    a.jne32_imm(7, wire_ip(*r.listen.ip()), TO_ALLOW);
    // Redirected: 127.0.0.1 and the serving port.
    a.mov_imm(2, wire_ip(Ipv4Addr::LOCALHOST));
    a.store32(6, CTX_USER_IP4, 2);
    a.mov_imm(2, wire_port(r.backend));
    a.store32(6, CTX_USER_PORT, 2);
    let allow = a.here();
    a.mov_imm(0, 1);
    a.exit();
    a.resolve(TO_LOOKUP, lookup);
    a.resolve(TO_ALLOW, allow);
    a.0
}

/// What failed, and on which step.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel's verifier refused the program: its log says why.
    #[error("the kernel refused the switch's eBPF program {name}: {log}")]
    Verifier { name: String, log: String },
    /// No cgroup v2 hierarchy is mounted (`/proc/self/mountinfo` names none).
    #[error("no cgroup v2 hierarchy is mounted: the connect-time redirect needs one")]
    NoCgroup2,
    /// The kernel would not list the cgroup's connect programs.
    #[error("listing the cgroup's connect programs: {0}")]
    Query(#[source] io::Error),
    /// A `bpf(2)` call (or what it needed) failed.
    #[error("{step}: {source}")]
    Call {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

impl BpfError {
    /// Whether this says that nothing can have been attached from here: no cgroup v2
    /// tree, or a listing refused for lack of privilege or by a kernel without (cgroup)
    /// BPF. A refusal after the listing (to open a program it named) says nothing of the
    /// kind.
    pub fn nothing_attached(&self) -> bool {
        match self {
            BpfError::NoCgroup2 => true,
            BpfError::Query(source) => matches!(
                source.raw_os_error(),
                Some(libc::EPERM | libc::EACCES | libc::ENOSYS | libc::EINVAL)
            ),
            BpfError::Call { .. } | BpfError::Verifier { .. } => false,
        }
    }
}

fn call(step: &'static str) -> impl FnOnce(io::Error) -> BpfError {
    move |source| BpfError::Call { step, source }
}

/// `union bpf_attr`, zeroed past the fields set (the kernel refuses non-zero bytes it
/// does not know).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, off: usize, v: &[u8]) -> Self {
        self.0[off..off + v.len()].copy_from_slice(v);
        self
    }
    fn read_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn sys_bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable `union bpf_attr` of the size given; every
    // pointer stored in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_of(r: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

/// Loads `insns` as a `cgroup/connect4` program named `name` (at most 15 bytes).
pub fn load(name: &str, insns: &[Insn]) -> Result<OwnedFd, BpfError> {
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let license = c"GPL";
    let mut log = vec![0u8; LOG_SIZE];
    let load = |log_level: u32, log: &mut [u8]| {
        let mut attr = Attr::new()
            .u32(0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .bytes(48, &prog_name)
            .u32(68, BPF_CGROUP_INET4_CONNECT);
        if log_level > 0 {
            attr = attr
                .u32(24, log_level)
                .u32(28, log.len() as u32)
                .u64(32, log.as_mut_ptr() as u64);
        }
        sys_bpf(BPF_PROG_LOAD, &mut attr)
    };
    match load(0, &mut log) {
        Ok(fd) => Ok(fd_of(fd)),
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            // Ask again with the verifier's log, which says which instruction and why.
            match load(1, &mut log) {
                Ok(fd) => Ok(fd_of(fd)),
                Err(e2) => {
                    let text = CStr::from_bytes_until_nul(&log)
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if text.trim().is_empty() {
                        Err(call("loading the switch's eBPF program")(e2))
                    } else {
                        let tail: Vec<&str> = text.lines().rev().take(8).collect();
                        Err(BpfError::Verifier {
                            name: name.to_string(),
                            log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
                        })
                    }
                }
            }
        }
        Err(e) => Err(call("loading the switch's eBPF program")(e)),
    }
}

/// The mount point of the cgroup v2 hierarchy's root, from `/proc/self/mountinfo`, read
/// once per process.
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            cgroup2_root_in(&info)
        })
        .clone()
        .ok_or(BpfError::NoCgroup2)
}

/// The mount point of a cgroup2 mount of the tree's root (`/`) in `mountinfo`; a mount of
/// a subtree only when there is no other.
fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<(&str, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split(' ').next()? == "cgroup2").then_some(())?;
            let mut fields = fields.split(' ');
            let root = fields.nth(3)?;
            let mount = fields.next()?;
            Some((root, PathBuf::from(unescape(mount))))
        })
        .collect();
    let root = mounts.iter().find(|(root, _)| *root == "/");
    root.or(mounts.first()).map(|(_, m)| m.clone())
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(((b[i + 1] - b'0') << 6) | ((b[i + 2] - b'0') << 3) | (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The root of the cgroup v2 tree, opened as a directory.
pub fn cgroup_root() -> Result<OwnedFd, BpfError> {
    let path = cgroup2_mount()?;
    let dir = std::fs::File::open(&path).map_err(call("opening the cgroup v2 root"))?;
    Ok(dir.into())
}

/// The cookie of this thread's network namespace.
pub fn netns_cookie() -> Result<u64, BpfError> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(call("opening a socket for the network namespace's cookie")(
            io::Error::last_os_error(),
        ));
    }
    let sock = fd_of(fd as libc::c_long);
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for the kernel to write.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(call("reading the network namespace's cookie")(
            io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}

/// A program attached to the cgroup, as [`attached`] finds it.
#[derive(Debug)]
pub struct Attached {
    pub id: u32,
    pub fd: OwnedFd,
    pub name: String,
    /// When it was loaded, on `CLOCK_BOOTTIME`.
    pub loaded: Duration,
}

/// The `cgroup/connect4` programs attached to `cgroup` whose name `matches`.
pub fn attached(
    cgroup: BorrowedFd<'_>,
    matches: impl Fn(&str) -> bool,
) -> Result<Vec<Attached>, BpfError> {
    // The kernel attaches at most 64 programs of a type to a cgroup.
    let mut ids = vec![0u32; 256];
    let mut attr = Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, BPF_CGROUP_INET4_CONNECT)
        .u64(16, ids.as_mut_ptr() as u64)
        .u32(24, ids.len() as u32);
    sys_bpf(BPF_PROG_QUERY, &mut attr).map_err(BpfError::Query)?;
    let count = (attr.read_u32(24) as usize).min(ids.len());
    let mut found = Vec::new();
    for &id in &ids[..count] {
        let mut attr = Attr::new().u32(0, id);
        let fd = match sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => fd_of(fd),
            // Detached and freed since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(call("opening an attached connect program")(e)),
        };
        let info = prog_info(fd.as_fd())?;
        if matches(&info.name) {
            found.push(Attached {
                id,
                fd,
                name: info.name,
                loaded: info.loaded,
            });
        }
    }
    Ok(found)
}

/// Attaches `prog` to `cgroup`, in place of `replace` when given (one step: a connection
/// sees one of the two).
pub fn attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> Result<(), BpfError> {
    let mut attr = Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, BPF_CGROUP_INET4_CONNECT);
    attr = match replace {
        Some(old) => attr
            .u32(12, BPF_F_ALLOW_MULTI | BPF_F_REPLACE)
            .u32(16, old.as_raw_fd() as u32),
        None => attr.u32(12, BPF_F_ALLOW_MULTI),
    };
    sys_bpf(BPF_PROG_ATTACH, &mut attr)
        .map(drop)
        .map_err(call("attaching the switch's connect program"))
}

/// Detaches `prog` from `cgroup`; a program already gone is no error.
pub fn detach(cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), BpfError> {
    let mut attr = Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, BPF_CGROUP_INET4_CONNECT);
    match sys_bpf(BPF_PROG_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(call("detaching the switch's connect program")(e)),
    }
}

/// What the kernel says of a program (`struct bpf_prog_info`).
pub struct ProgInfo {
    pub id: u32,
    pub name: String,
    /// When it was loaded, on `CLOCK_BOOTTIME`.
    pub loaded: Duration,
}

/// The kernel's id, name and load time of the program `prog`.
pub fn prog_info(prog: BorrowedFd<'_>) -> Result<ProgInfo, BpfError> {
    let mut info = [0u8; 96];
    let mut attr = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(call("reading a program's name"))?;
    let name = CStr::from_bytes_until_nul(&info[64..80])
        .map(|c| c.to_bytes())
        .unwrap_or(&info[64..80]);
    Ok(ProgInfo {
        id: u32::from_ne_bytes(info[4..8].try_into().unwrap()),
        name: String::from_utf8_lossy(name).into_owned(),
        loaded: Duration::from_nanos(u64::from_ne_bytes(info[40..48].try_into().unwrap())),
    })
}

/// Now on `CLOCK_BOOTTIME`: the clock of the programs' expiry (`bpf_ktime_get_boot_ns`)
/// and of their load time, which runs on through a suspend.
pub fn boot_now() -> Result<Duration, BpfError> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .map_err(|e| call("reading CLOCK_BOOTTIME")(e.into()))
}

/// Whether `name` is a switch program's: [`PREFIX`] and 9 hex digits, as
/// `kernel::program_name` makes them.
pub fn is_switch_program(name: &str) -> bool {
    name.len() == PREFIX.len() + 9
        && name.starts_with(PREFIX)
        && name[PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// This host's IPv4 addresses outside 127.0.0.0/8, sorted, at most [`MAX_LOCALS`].
pub fn local_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let mut found: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map_err(io::Error::from)?
        .filter_map(|i| i.address?.as_sockaddr_in().map(|s| s.ip()))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    found.sort();
    found.dedup();
    found.truncate(MAX_LOCALS);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(listen: &str) -> Redirect {
        Redirect {
            listen: listen.parse().unwrap(),
            backend: 41000,
            locals: vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(192, 168, 1, 9)],
            netns: 0x1122_3344_5566_7788,
        }
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_it_ends_by_letting_the_connection_through() {
        for listen in ["0.0.0.0:8080", "10.0.0.5:80"] {
            let p = program(&redirect(listen), 1);
            let n = p.len() as isize;
            for (i, insn) in p.iter().enumerate() {
                if is_jump(insn) {
                    let to = i as isize + 1 + insn.off as isize;
                    assert!(
                        (0..n).contains(&to),
                        "{listen}: insn {i} jumps to {to}: {p:?}"
                    );
                    assert!(insn.off >= 0, "only forward jumps: {p:?}");
                }
            }
            // r0 = 1; exit
            assert_eq!(p[p.len() - 2].code, 0xb7);
            assert_eq!(p[p.len() - 2].imm, 1);
            assert_eq!(p[p.len() - 1].code, 0x95);
        }
    }

    #[test]
    fn the_program_tests_the_port_namespace_and_addresses_it_was_made_for() {
        let any = program(&redirect("0.0.0.0:8080"), 0xaaaa_bbbb_cccc_dddd);
        let imms: Vec<i32> = any.iter().map(|i| i.imm).collect();
        // The port in wire order, as the context holds it: 8080 = 0x1f90.
        assert!(imms.contains(&(u32::from_ne_bytes([0x1f, 0x90, 0, 0]) as i32)));
        assert!(
            imms.contains(&(u32::from_ne_bytes([0xa0, 0x28, 0, 0]) as i32)),
            "41000"
        );
        assert!(imms.contains(&(u32::from_ne_bytes([10, 0, 0, 5]) as i32)));
        assert!(imms.contains(&(u32::from_ne_bytes([192, 168, 1, 9]) as i32)));
        assert!(imms.contains(&0x5566_7788) && imms.contains(&0x1122_3344));
        assert!(imms.contains(&(0xcccc_ddddu32 as i32)) && imms.contains(&(0xaaaa_bbbbu32 as i32)));
        // Addresses are compared on 32 bits: 192.168.1.9's wire value has its top bit set,
        // and a 64-bit compare would sign-extend it.
        let local = any
            .iter()
            .find(|i| i.imm == u32::from_ne_bytes([192, 168, 1, 9]) as i32)
            .unwrap();
        assert_eq!(local.code, 0x16, "a JMP32 compare");
        // Bound to one address: that address is the test, the host's others are not.
        let one = program(&redirect("10.0.0.5:80"), 1);
        let imms: Vec<i32> = one.iter().map(|i| i.imm).collect();
        assert!(!imms.contains(&(u32::from_ne_bytes([192, 168, 1, 9]) as i32)));
        assert!(imms.contains(&(u32::from_ne_bytes([10, 0, 0, 5]) as i32)));
        assert!(one.len() < any.len());
        // The locals are bounded.
        let mut many = redirect("0.0.0.0:1");
        many.locals = (0..200).map(|i| Ipv4Addr::new(10, 1, 0, i)).collect();
        assert_eq!(program(&many, 1).len(), any.len() - 2 + MAX_LOCALS);
    }

    #[test]
    fn mountinfo_escapes_are_read() {
        assert_eq!(unescape(r"/sys/fs/cgroup\040v2"), "/sys/fs/cgroup v2");
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/a\\b"), r"/a\\b");
    }

    #[test]
    fn the_cgroup2_mount_of_the_trees_root_is_preferred() {
        let info = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 25 0:27 /sub /mnt/sub rw - cgroup2 cgroup2 rw
41 25 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_root_in(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let only_sub = "40 25 0:27 /sub /mnt/my\\040tree rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_in(only_sub),
            Some(PathBuf::from("/mnt/my tree"))
        );
        assert_eq!(
            cgroup2_root_in("30 25 0:26 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }
}
