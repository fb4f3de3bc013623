//! Gossiped host state, sans-IO. Every agent owns one versioned [`HostRecord`] (its tags,
//! and per application the active revision, its health and the revisions it holds) and
//! keeps the newest version it has seen of everyone else's. The newest version wins.
//!
//! What it guarantees (decision 0006):
//! - **Only the owner writes a record.** Records travel as [`SignedRecord`]s, signed by the
//!   owner's key over [`RECORD_CONTEXT`] and the record's postcard encoding. A record of host
//!   X is adopted only when an [`Authority`] accepts it: [`FleetAuthority`] requires a fleet
//!   certificate naming X with the agent role, unrevoked, valid now. Who relayed it does not
//!   matter.
//! - **Versions are bounded.** A version above `now_ms + MAX_AHEAD_MS` is refused, never
//!   adopted; all arithmetic on versions is checked. An agent publishes above its own record
//!   only when a validly signed record of its own name from a previous life arrives, never
//!   on a digest's say-so.
//! - **No work on behalf of others.** A digest causes at most a [`GossipMsg::Want`] back;
//!   answers to digests and wants are limited to one of each per sender per
//!   [`ANSWER_INTERVAL_MS`] and to [`MAX_ANSWER_BYTES`]. What was refused or dropped is
//!   counted in [`HostTableStats`].
//! - **Relaying is the receiver's choice**: a record new here, pushed as news, is passed on
//!   once, only in a fleet larger than [`DIRECT_LIMIT`], never back to its sender. What
//!   answers a digest or a want is never passed on. A sender cannot make a receiver pass on
//!   anything it already had.
//! - **Records are small, messages fit.** The caps ([`Cap`]) hold at the owner (a change
//!   over a cap is refused, the old record stays) and at receivers. Every outgoing message
//!   encodes to less than [`MAX_MESSAGE`], well under the frame limit.
//! - **Forgetting sticks**: [`HostTable::forget`] leaves a tombstone (bounded in number) so
//!   gossip does not bring the same record back.
//!
//! Spreading: the owner pushes a new version to every peer at once while the fleet is small
//! (one hop); in a larger fleet it pushes to a few random peers and whoever learns something
//! new relays it the same way (rumor mongering). Repairing: every tick an agent sends a
//! digest (name and version of each record in a range of names, the range moving on each
//! tick) to one random peer, which answers with what is newer on its side and asks for what
//! is newer on ours (anti-entropy).
//!
//! Messages, peer lists and the wall clock go in; messages to send and what was learned come
//! out. The agent's network loop (`node.rs`) and the simulation tests drive the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::identity::Identity;
use crate::identity::sign::{CertVerifier, SignError, Signer};

/// How an application's service is doing on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The service is running.
    Running,
    /// The AppSpec declares a service and it is not running.
    Stopped,
    /// A deployment holds the application right now.
    Deploying,
    /// The revision declares no service.
    None,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Running => "running",
            Health::Stopped => "stopped",
            Health::Deploying => "deploying",
            Health::None => "none",
        }
    }
}

/// One application on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The active revision's id, if a deployment has succeeded.
    pub revision: Option<String>,
    pub health: Health,
    /// The revisions whose releases this host keeps (and could serve to peers).
    pub held: BTreeSet<String>,
    /// What keeps the host's supervisor from looking after the application (a recovery
    /// that fails, a service that will not start), at most [`MAX_PROBLEM`] bytes.
    #[serde(default)]
    pub problem: Option<String>,
    /// How many times the supervisor restarted the active revision's service.
    #[serde(default)]
    pub restarts: u32,
    /// The revision this host is fetching as chunks (`blobs::chunked`), if any: peers ask
    /// it which chunks it has and fetch those from it meanwhile. (Wire version 6.)
    pub fetching: Option<String>,
}

/// What one host says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub addr: SocketAddr,
    /// Raised by the owner on every change; the newest version wins.
    pub version: u64,
    /// The host left the mesh on purpose (its agent was stopped).
    pub left: bool,
    pub tags: BTreeMap<String, String>,
    pub apps: BTreeMap<String, AppRecord>,
    /// This host's part in the deployment log, if it holds a copy.
    pub log: Option<LogRecord>,
}

/// What a host says of its part in the deployment log (`fleet::log`): a hint for finding
/// the coordinator, never trusted for anything that must be safe (the log's leader checks
/// for itself that it leads).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// A voter (rather than a learner catching up).
    pub voter: bool,
    /// The Raft term this host last saw.
    pub term: u64,
    /// The leader it knows of in that term, by agent name.
    pub leader: Option<String>,
}

/// A host record with its owner's signature: what travels between agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRecord {
    pub record: HostRecord,
    /// The owner's certificate (DER) for [`FleetAuthority`]; what the authority needs to
    /// check `sig` in general.
    pub cert: Vec<u8>,
    /// The owner's signature over [`SignedRecord::signed_bytes`] of `record`.
    pub sig: Vec<u8>,
}

/// Domain separation: a host-record signature cannot be replayed as any other signature.
pub const RECORD_CONTEXT: &[u8] = b"shoal host record v1\0";

impl SignedRecord {
    /// The bytes an owner signs: [`RECORD_CONTEXT`], then the postcard encoding of `record`.
    pub fn signed_bytes(record: &HostRecord) -> Vec<u8> {
        let mut bytes = RECORD_CONTEXT.to_vec();
        bytes.extend(postcard::to_stdvec(record).expect("a host record encodes"));
        bytes
    }
}

/// What agents send each other about host state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GossipMsg {
    /// News: records, each signed by its owner. The receiver decides whether to pass on
    /// what is new to it.
    Push(Vec<SignedRecord>),
    /// Records the receiver asked for (with a digest or a want). Never passed on: what
    /// repairs one agent does not start a rumor.
    Answer(Vec<SignedRecord>),
    /// Anti-entropy: the version of every record the sender holds whose name is above
    /// `after` (if any) and at most `through` (if any).
    Digest {
        after: Option<String>,
        through: Option<String>,
        versions: Vec<(String, u64)>,
    },
    /// Anti-entropy: the records the sender wants, newer on the receiver's side.
    Want(Vec<String>),
}

/// A message for the network loop to deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub to: SocketAddr,
    pub msg: GossipMsg,
}

/// Up to this many peers, the owner of a record pushes it to all of them and nobody relays.
pub const DIRECT_LIMIT: usize = 128;

/// How far ahead of the receiver's wall clock (ms since the epoch) a version may be. A life
/// starts at its wall-clock ms ([`first_version`]) and adds one per change, so an honest
/// owner is ahead only by its changes (far fewer than 86.4 million a day) plus its clock's
/// skew. A day covers both generously; anything beyond is a forgery or a broken clock, and
/// adopting it would let one record stop its owner from ever publishing above it.
pub const MAX_AHEAD_MS: u64 = 24 * 60 * 60 * 1000;

/// Every outgoing message encodes to less than this: a quarter of the frame limit
/// (`frame::MAX_FRAME`, 1 MiB), leaving room for the envelope and for growth.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// At most this many records per push, so one message costs a receiver a bounded number of
/// signature checks.
pub const MAX_PUSH_RECORDS: usize = 1024;
/// One answer (to a digest or to a want) carries at most this many bytes of records (4 MiB,
/// some 6,000 records with their certificates); the rest comes with the next rounds.
pub const MAX_ANSWER_BYTES: usize = 16 * MAX_MESSAGE;
/// A sender gets at most one answer to its digests and one to its wants per interval.
pub const ANSWER_INTERVAL_MS: u64 = 1000;
/// Senders remembered by the answer limiter; beyond, senders not answered within the
/// interval are forgotten, and if all were, new senders wait.
pub const MAX_LIMITED_SENDERS: usize = 16_384;
/// Failed signature checks a sender (by IP address) may cost this agent per second; beyond
/// that its records are refused unchecked until the next second. A message with one forged
/// record is refused whole. Honest agents never send a forgery, so this only bounds the CPU
/// an insider can burn on ECDSA verification in the node's one loop.
pub const MAX_FORGED_PER_SECOND: u32 = 4;
/// Tombstones of forgotten records kept; the oldest goes first.
pub const MAX_TOMBSTONES: usize = 4096;

/// Tags per host.
pub const MAX_TAGS: usize = 64;
/// Bytes of a tag's key.
pub const MAX_TAG_KEY: usize = 64;
/// Bytes of a tag's value.
pub const MAX_TAG_VALUE: usize = 256;
/// Applications per host.
pub const MAX_APPS: usize = 64;
/// Bytes of an application's name.
pub const MAX_APP_NAME: usize = 64;
/// Bytes of a revision id.
pub const MAX_REVISION_ID: usize = 128;
/// Revisions held per application.
pub const MAX_HELD: usize = 32;
/// Bytes in an application's problem.
pub const MAX_PROBLEM: usize = 256;
/// Bytes of a host name (a DNS name's limit).
pub const MAX_HOST_NAME: usize = 253;
/// Bytes of a record's postcard encoding: the caps above allow more (64 apps of 32 held
/// revisions is 270 KB), this keeps a record to a fraction of a message.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Bytes of the owner's certificate in a signed record.
pub const MAX_CERT_BYTES: usize = 4096;
/// Bytes of a signature (ECDSA P-256 in DER is at most 72).
pub const MAX_SIG_BYTES: usize = 128;

/// Room for a message's own framing (enum tag, lengths, range bounds) around its items.
const MESSAGE_SLACK: usize = 2 * MAX_HOST_NAME + 64;

/// A limit on a host record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    HostName,
    Tags,
    TagKey,
    TagValue,
    Apps,
    AppName,
    RevisionId,
    Held,
    Problem,
    Record,
    Cert,
    Signature,
}

impl Cap {
    /// The largest value allowed.
    pub fn limit(self) -> usize {
        match self {
            Cap::HostName => MAX_HOST_NAME,
            Cap::Tags => MAX_TAGS,
            Cap::TagKey => MAX_TAG_KEY,
            Cap::TagValue => MAX_TAG_VALUE,
            Cap::Apps => MAX_APPS,
            Cap::AppName => MAX_APP_NAME,
            Cap::RevisionId => MAX_REVISION_ID,
            Cap::Held => MAX_HELD,
            Cap::Problem => MAX_PROBLEM,
            Cap::Record => MAX_RECORD_BYTES,
            Cap::Cert => MAX_CERT_BYTES,
            Cap::Signature => MAX_SIG_BYTES,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Cap::HostName => "bytes in the host name",
            Cap::Tags => "tags",
            Cap::TagKey => "bytes in a tag key",
            Cap::TagValue => "bytes in a tag value",
            Cap::Apps => "applications",
            Cap::AppName => "bytes in an application name",
            Cap::RevisionId => "bytes in a revision id",
            Cap::Held => "revisions held by one application",
            Cap::Problem => "bytes in an application's problem",
            Cap::Record => "bytes in the encoded record",
            Cap::Cert => "bytes in the owner's certificate",
            Cap::Signature => "bytes in the signature",
        }
    }
}

/// Why a record was refused (at its owner or at a receiver).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordError {
    kind: RecordErrorKind,
}

/// What was wrong with a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordErrorKind {
    /// Over one of the caps: `len` is what the record has.
    TooLarge { host: String, cap: Cap, len: usize },
    /// A version its owner cannot have reached by `limit` (`now_ms + MAX_AHEAD_MS`).
    AbsurdVersion {
        host: String,
        version: u64,
        limit: u64,
    },
    /// The signature or the certificate does not prove the record is its owner's.
    Unauthenticated { host: String, reason: SignError },
    /// This agent was asked to sign another host's record.
    NotOwn { host: String, me: String },
    /// Signing this agent's own record failed.
    Signing(SignError),
}

impl RecordError {
    pub fn new(kind: RecordErrorKind) -> Self {
        RecordError { kind }
    }

    pub fn kind(&self) -> &RecordErrorKind {
        &self.kind
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RecordErrorKind::TooLarge { host, cap, len } => write!(
                f,
                "the record of `{host}` has {len} {}, over the cap of {}; trim the host's \
                 tags or applications (the record as it was stays published)",
                cap.what(),
                cap.limit()
            ),
            RecordErrorKind::AbsurdVersion {
                host,
                version,
                limit,
            } => write!(
                f,
                "the record of `{host}` claims version {version}, beyond {limit}, what its \
                 owner can have reached by now; refused (if `{host}` is this host, check its \
                 clock)"
            ),
            RecordErrorKind::Unauthenticated { host, reason } => write!(
                f,
                "the record of `{host}` is not signed by `{host}`: {reason}; refused (check \
                 that `{host}` runs with an agent certificate from this fleet's CA)"
            ),
            RecordErrorKind::NotOwn { host, me } => write!(
                f,
                "this agent (`{me}`) signs only its own record, not the record of `{host}`"
            ),
            RecordErrorKind::Signing(e) => write!(
                f,
                "signing this host's record failed: {e}; check the identity's key.pem"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

fn too_large(host: &str, cap: Cap, len: usize) -> Result<(), RecordError> {
    if len > cap.limit() {
        Err(RecordError::new(RecordErrorKind::TooLarge {
            host: host.to_string(),
            cap,
            len,
        }))
    } else {
        Ok(())
    }
}

/// Checks a record against the caps.
pub fn check_caps(record: &HostRecord) -> Result<(), RecordError> {
    let host = record.name.as_str();
    too_large(host, Cap::HostName, record.name.len())?;
    too_large(host, Cap::Tags, record.tags.len())?;
    for (k, v) in &record.tags {
        too_large(host, Cap::TagKey, k.len())?;
        too_large(host, Cap::TagValue, v.len())?;
    }
    too_large(host, Cap::Apps, record.apps.len())?;
    for (name, app) in &record.apps {
        too_large(host, Cap::AppName, name.len())?;
        if let Some(r) = &app.revision {
            too_large(host, Cap::RevisionId, r.len())?;
        }
        too_large(host, Cap::Held, app.held.len())?;
        if let Some(p) = &app.problem {
            too_large(host, Cap::Problem, p.len())?;
        }
        for r in app.held.iter().chain(&app.fetching) {
            too_large(host, Cap::RevisionId, r.len())?;
        }
    }
    if let Some(leader) = record.log.as_ref().and_then(|l| l.leader.as_ref()) {
        too_large(host, Cap::HostName, leader.len())?;
    }
    too_large(host, Cap::Record, encoded_len(record))
}

fn check_signed_caps(signed: &SignedRecord) -> Result<(), RecordError> {
    let host = signed.record.name.as_str();
    too_large(host, Cap::Cert, signed.cert.len())?;
    too_large(host, Cap::Signature, signed.sig.len())?;
    check_caps(&signed.record)
}

/// The postcard encoding's length, without encoding.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor::<T, postcard::ser_flavors::Size, usize>(
        value,
        postcard::ser_flavors::Size::default(),
    )
    .unwrap_or(usize::MAX)
}

/// The newest version a record may have at `now_ms`.
pub fn version_limit(now_ms: u64) -> u64 {
    now_ms.saturating_add(MAX_AHEAD_MS)
}

fn check_version(record: &HostRecord, now_ms: u64) -> Result<(), RecordError> {
    let limit = version_limit(now_ms);
    if record.version > limit {
        return Err(RecordError::new(RecordErrorKind::AbsurdVersion {
            host: record.name.clone(),
            version: record.version,
            limit,
        }));
    }
    Ok(())
}

/// Who may write which record: signs this agent's own, checks everyone's.
pub trait Authority {
    /// Signs this agent's own record; refuses another host's.
    fn sign(&mut self, record: &HostRecord) -> Result<SignedRecord, RecordError>;
    /// Accepts a record only if its owner signed it, with credentials valid at `now_ms`.
    fn verify(&mut self, signed: &SignedRecord, now_ms: u64) -> Result<(), RecordError>;
    /// Credentials whose serial numbers are here are refused from now on.
    fn set_revoked(&mut self, serials: HashSet<Vec<u8>>);
}

fn unauthenticated(host: &str, reason: SignError) -> RecordError {
    RecordError::new(RecordErrorKind::Unauthenticated {
        host: host.to_string(),
        reason,
    })
}

fn not_own(host: &str, me: &str) -> RecordError {
    RecordError::new(RecordErrorKind::NotOwn {
        host: host.to_string(),
        me: me.to_string(),
    })
}

/// The real authority: signs with this agent's fleet identity, checks records against the
/// fleet CA (see [`CertVerifier`]: chain, validity, revocation, name, agent role, signature).
pub struct FleetAuthority {
    name: String,
    cert: Vec<u8>,
    signer: Signer,
    verifier: CertVerifier,
}

impl FleetAuthority {
    pub fn new(identity: &Identity) -> Result<FleetAuthority, SignError> {
        Ok(FleetAuthority {
            name: identity.name.clone(),
            cert: identity.cert.to_vec(),
            signer: Signer::new(identity)?,
            verifier: CertVerifier::new(identity.ca.clone()),
        })
    }
}

impl Authority for FleetAuthority {
    fn sign(&mut self, record: &HostRecord) -> Result<SignedRecord, RecordError> {
        if record.name != self.name {
            return Err(not_own(&record.name, &self.name));
        }
        let sig = self
            .signer
            .sign(&SignedRecord::signed_bytes(record))
            .map_err(|e| RecordError::new(RecordErrorKind::Signing(e)))?;
        Ok(SignedRecord {
            record: record.clone(),
            cert: self.cert.clone(),
            sig,
        })
    }

    fn verify(&mut self, signed: &SignedRecord, now_ms: u64) -> Result<(), RecordError> {
        let host = &signed.record.name;
        self.verifier
            .verify(
                &signed.cert,
                host,
                &SignedRecord::signed_bytes(&signed.record),
                &signed.sig,
                now_ms,
            )
            .map_err(|e| unauthenticated(host, e))
    }

    fn set_revoked(&mut self, serials: HashSet<Vec<u8>>) {
        self.verifier.set_revoked(serials);
    }
}

/// A cheap, deterministic stand-in for [`FleetAuthority`] in tests and simulations with
/// thousands of agents: each host's key is SHA-256 of a fleet secret and its name, a
/// signature is SHA-256 of that key and the signed bytes, the "certificate" is the host's
/// name (and its serial). Anyone holding the fleet secret can forge, so it is no security
/// at all outside a test; within one, a record signed by another host (or under another
/// secret) is refused exactly as a forgery would be.
pub struct SimAuthority {
    me: String,
    secret: [u8; 32],
    revoked: HashSet<Vec<u8>>,
}

impl SimAuthority {
    pub fn new(me: &str, fleet_secret: &[u8]) -> SimAuthority {
        SimAuthority {
            me: me.to_string(),
            secret: Sha256::digest(fleet_secret).into(),
            revoked: HashSet::new(),
        }
    }

    fn sig(&self, host: &str, record: &HostRecord) -> Vec<u8> {
        let key = Sha256::new()
            .chain_update(self.secret)
            .chain_update(host.as_bytes())
            .finalize();
        Sha256::new()
            .chain_update(key)
            .chain_update(SignedRecord::signed_bytes(record))
            .finalize()
            .to_vec()
    }
}

impl Authority for SimAuthority {
    fn sign(&mut self, record: &HostRecord) -> Result<SignedRecord, RecordError> {
        if record.name != self.me {
            return Err(not_own(&record.name, &self.me));
        }
        Ok(SignedRecord {
            record: record.clone(),
            cert: self.me.as_bytes().to_vec(),
            sig: self.sig(&self.me, record),
        })
    }

    fn verify(&mut self, signed: &SignedRecord, _now_ms: u64) -> Result<(), RecordError> {
        let host = &signed.record.name;
        if signed.cert != host.as_bytes() {
            return Err(unauthenticated(
                host,
                SignError::WrongName {
                    named: String::from_utf8_lossy(&signed.cert).into_owned(),
                    expected: host.clone(),
                },
            ));
        }
        if self.revoked.contains(&signed.cert) {
            return Err(unauthenticated(host, SignError::Revoked));
        }
        if signed.sig != self.sig(host, &signed.record) {
            return Err(unauthenticated(host, SignError::BadSignature));
        }
        Ok(())
    }

    fn set_revoked(&mut self, serials: HashSet<Vec<u8>>) {
        self.revoked = serials;
    }
}

/// How many peers a push goes to among `peers`: all of them in a small fleet, otherwise
/// enough that a relayed rumor misses a host with a probability of about e^-(ln n + 3).
pub fn fanout(peers: usize) -> usize {
    if peers <= DIRECT_LIMIT {
        peers
    } else {
        ((peers as f64).ln().ceil() as usize + 3).min(peers)
    }
}

/// The version an agent's record starts a life at: above the last one it remembers
/// publishing and, should it have lost that memory, above what a previous life could
/// have reached (milliseconds since the epoch, one per change at most). A remembered
/// version that receivers would refuse as absurd is not continued.
pub fn first_version(remembered: u64, now_ms: u64) -> u64 {
    match remembered.checked_add(1) {
        Some(v) if v <= version_limit(now_ms) => v.max(now_ms),
        _ => now_ms,
    }
}

/// What a table refused, dropped or did, since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostTableStats {
    /// Records whose signature or certificate did not prove their owner.
    pub refused_forged: u64,
    /// Records (and digest entries) with a version beyond `now_ms + MAX_AHEAD_MS`.
    pub refused_absurd: u64,
    /// Records over a cap, received or published; digest and want entries with an
    /// over-long name; push records beyond [`MAX_PUSH_RECORDS`].
    pub refused_oversized: u64,
    /// Records of a forgotten host not newer than its tombstone.
    pub refused_forgotten: u64,
    /// Digests and wants left unanswered by the per-sender limit.
    pub answers_rate_limited: u64,
    /// Records relayed (counted once per record per relay, not per peer).
    pub relayed: u64,
    /// Times this agent published above a previous life's record of its own.
    pub outlived: u64,
}

struct Entry {
    signed: SignedRecord,
    /// Its postcard encoding's length.
    size: usize,
}

impl Entry {
    fn new(signed: SignedRecord) -> Entry {
        let size = encoded_len(&signed);
        Entry { signed, size }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum AnswerKind {
    Digest,
    Want,
}

/// One agent's table of host records, its own included.
pub struct HostTable {
    me: String,
    records: BTreeMap<String, Entry>,
    authority: Box<dyn Authority + Send>,
    rng: StdRng,
    /// Where the next anti-entropy digest starts (after this name).
    cursor: Option<String>,
    answered: HashMap<(IpAddr, AnswerKind), u64>,
    /// Per sender's IP address: (the second, forgeries in it).
    forged: HashMap<IpAddr, (u64, u32)>,
    tombstones: HashMap<String, u64>,
    tomb_order: VecDeque<String>,
    stats: HostTableStats,
}

impl HostTable {
    /// `own` is this agent's record (its version above any it published before: see
    /// [`first_version`]), signed with `authority`; `seed` makes the random choices
    /// reproducible. Fails if `own` is over a cap or cannot be signed.
    pub fn new(
        own: HostRecord,
        authority: Box<dyn Authority + Send>,
        seed: u64,
    ) -> Result<Self, RecordError> {
        check_caps(&own)?;
        let mut authority = authority;
        let signed = authority.sign(&own)?;
        let me = own.name.clone();
        let mut records = BTreeMap::new();
        records.insert(me.clone(), Entry::new(signed));
        Ok(HostTable {
            me,
            records,
            authority,
            rng: StdRng::seed_from_u64(seed),
            cursor: None,
            answered: HashMap::new(),
            forged: HashMap::new(),
            tombstones: HashMap::new(),
            tomb_order: VecDeque::new(),
            stats: HostTableStats::default(),
        })
    }

    pub fn own(&self) -> &HostRecord {
        &self.records[&self.me].signed.record
    }

    pub fn get(&self, name: &str) -> Option<&HostRecord> {
        self.records.get(name).map(|e| &e.signed.record)
    }

    /// The signed record of `name`, as it would be passed on.
    pub fn signed(&self, name: &str) -> Option<&SignedRecord> {
        self.records.get(name).map(|e| &e.signed)
    }

    pub fn records(&self) -> impl Iterator<Item = &HostRecord> {
        self.records.values().map(|e| &e.signed.record)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn stats(&self) -> HostTableStats {
        self.stats
    }

    /// The authority, e.g. to give it the revoked serials.
    pub fn authority_mut(&mut self) -> &mut (dyn Authority + Send) {
        self.authority.as_mut()
    }

    /// Applies a change to this agent's own record. If it changed anything, the record is
    /// given a new version, signed and pushed to `peers`. A change over a cap (or one that
    /// cannot be signed) is refused and the record stays as it was.
    pub fn publish(
        &mut self,
        change: impl FnOnce(&mut HostRecord),
        peers: &[SocketAddr],
        now_ms: u64,
    ) -> Result<Vec<Outgoing>, RecordError> {
        let before = self.own().clone();
        let mut record = before.clone();
        change(&mut record);
        record.name = before.name.clone();
        record.version = before.version;
        if record == before {
            return Ok(Vec::new());
        }
        if let Err(e) = check_caps(&record) {
            self.stats.refused_oversized += 1;
            return Err(e);
        }
        record.version = match before.version.checked_add(1) {
            Some(v) if v <= version_limit(now_ms) => v,
            _ => {
                return Err(RecordError::new(RecordErrorKind::AbsurdVersion {
                    host: self.me.clone(),
                    version: before.version.saturating_add(1),
                    limit: version_limit(now_ms),
                }));
            }
        };
        let signed = self.authority.sign(&record)?;
        self.records.insert(self.me.clone(), Entry::new(signed));
        let me = self.me.clone();
        Ok(self.push(&[me], peers, None))
    }

    /// Drops the record of `name` (not this agent's own), keeping a tombstone so that gossip
    /// does not bring back that version or an older one. Returns whether there was one.
    pub fn forget(&mut self, name: &str) -> bool {
        if name == self.me {
            return false;
        }
        let Some(entry) = self.records.remove(name) else {
            return false;
        };
        if self
            .tombstones
            .insert(name.to_string(), entry.signed.record.version)
            .is_none()
        {
            self.tomb_order.push_back(name.to_string());
        }
        while self.tomb_order.len() > MAX_TOMBSTONES {
            if let Some(oldest) = self.tomb_order.pop_front() {
                self.tombstones.remove(&oldest);
            }
        }
        true
    }

    /// Handles a message from the agent at `from`, at `now_ms` (wall-clock ms since the
    /// epoch). Returns what to send, and the records that were new here (for the caller to
    /// report).
    pub fn handle(
        &mut self,
        from: SocketAddr,
        msg: GossipMsg,
        peers: &[SocketAddr],
        now_ms: u64,
    ) -> (Vec<Outgoing>, Vec<HostRecord>) {
        let news = matches!(msg, GossipMsg::Push(_));
        match msg {
            GossipMsg::Push(records) | GossipMsg::Answer(records) => {
                let (learned, mut out) = self.merge(from, records, peers, now_ms);
                if news && !learned.is_empty() && peers.len() > DIRECT_LIMIT {
                    self.stats.relayed += learned.len() as u64;
                    out.extend(self.push(&learned, peers, Some(from)));
                }
                let learned = learned
                    .iter()
                    .filter_map(|n| self.get(n).cloned())
                    .collect();
                (out, learned)
            }
            GossipMsg::Digest {
                after,
                through,
                versions,
            } => {
                if !self.may_answer(from, AnswerKind::Digest, now_ms) {
                    return (Vec::new(), Vec::new());
                }
                (
                    self.answer_digest(from, after, through, versions, now_ms),
                    Vec::new(),
                )
            }
            GossipMsg::Want(names) => {
                if !self.may_answer(from, AnswerKind::Want, now_ms) {
                    return (Vec::new(), Vec::new());
                }
                let names: BTreeSet<String> = names
                    .into_iter()
                    .filter(|n| {
                        let ok = n.len() <= MAX_HOST_NAME;
                        if !ok {
                            self.stats.refused_oversized += 1;
                        }
                        ok
                    })
                    .collect();
                let mut budget = MAX_ANSWER_BYTES;
                let answer: Vec<&Entry> = names
                    .iter()
                    .filter_map(|n| self.records.get(n))
                    .take_while(|e| take_budget(&mut budget, e.size))
                    .collect();
                (pushes(from, &answer, GossipMsg::Answer), Vec::new())
            }
        }
    }

    /// One anti-entropy round: a digest of the next range of names to one random peer.
    pub fn anti_entropy(&mut self, peers: &[SocketAddr]) -> Vec<Outgoing> {
        let own_addr = self.own().addr;
        let candidates: Vec<SocketAddr> =
            peers.iter().copied().filter(|p| *p != own_addr).collect();
        let Some(&to) = candidates.choose(&mut self.rng) else {
            return Vec::new();
        };
        let cursor = self.cursor.take();
        let msg = self.digest_from(cursor);
        if let GossipMsg::Digest { through, .. } = &msg {
            self.cursor = through.clone();
        }
        vec![Outgoing { to, msg }]
    }

    /// A digest for a member that just came up, so both sides trade what they miss: the
    /// first range of names.
    pub fn digest_to(&self, to: SocketAddr) -> Outgoing {
        Outgoing {
            to,
            msg: self.digest_from(None),
        }
    }

    /// A digest of the records named after `after`, as many as fit in a message.
    fn digest_from(&self, after: Option<String>) -> GossipMsg {
        let range = match &after {
            Some(a) => self.records.range::<str, _>((
                std::ops::Bound::Excluded(a.as_str()),
                std::ops::Bound::Unbounded,
            )),
            None => self.records.range::<str, _>(..),
        };
        let mut budget = MAX_MESSAGE - MESSAGE_SLACK;
        let mut versions = Vec::new();
        let mut complete = true;
        for (name, e) in range {
            if !take_budget(&mut budget, digest_entry_len(name)) {
                complete = false;
                break;
            }
            versions.push((name.clone(), e.signed.record.version));
        }
        let through = if complete {
            None
        } else {
            versions.last().map(|(n, _): &(String, u64)| n.clone())
        };
        GossipMsg::Digest {
            after,
            through,
            versions,
        }
    }

    fn answer_digest(
        &mut self,
        from: SocketAddr,
        after: Option<String>,
        through: Option<String>,
        versions: Vec<(String, u64)>,
        now_ms: u64,
    ) -> Vec<Outgoing> {
        let limit = version_limit(now_ms);
        let mut theirs: BTreeMap<String, u64> = BTreeMap::new();
        let mut wanted: Vec<String> = Vec::new();
        for (name, v) in versions {
            if name.len() > MAX_HOST_NAME {
                self.stats.refused_oversized += 1;
                continue;
            }
            if v > limit {
                self.stats.refused_absurd += 1;
                continue;
            }
            let ours = self.records.get(&name).map(|e| e.signed.record.version);
            let buried = self.tombstones.get(&name).is_some_and(|&t| t >= v);
            if ours.is_none_or(|o| o < v) && !buried {
                wanted.push(name.clone());
            }
            theirs.insert(name, v);
        }
        let in_range = |name: &str| {
            after.as_deref().is_none_or(|a| name > a)
                && through.as_deref().is_none_or(|t| name <= t)
        };
        let mut budget = MAX_ANSWER_BYTES;
        let newer_here: Vec<&Entry> = self
            .records
            .iter()
            .filter(|(name, e)| {
                in_range(name)
                    && theirs
                        .get(*name)
                        .is_none_or(|&v| v < e.signed.record.version)
            })
            .map(|(_, e)| e)
            .take_while(|e| take_budget(&mut budget, e.size))
            .collect();
        let mut out = pushes(from, &newer_here, GossipMsg::Answer);
        out.extend(wants(from, wanted));
        out
    }

    /// Whether `from` may have an answer of `kind` now; if so, the answer is counted.
    fn may_answer(&mut self, from: SocketAddr, kind: AnswerKind, now_ms: u64) -> bool {
        let recent = |last: u64| now_ms < last.saturating_add(ANSWER_INTERVAL_MS);
        let from = from.ip();
        if self
            .answered
            .get(&(from, kind))
            .is_some_and(|&last| recent(last))
        {
            self.stats.answers_rate_limited += 1;
            return false;
        }
        if self.answered.len() >= MAX_LIMITED_SENDERS && !self.answered.contains_key(&(from, kind))
        {
            self.answered.retain(|_, last| recent(*last));
            if self.answered.len() >= MAX_LIMITED_SENDERS {
                self.stats.answers_rate_limited += 1;
                return false;
            }
        }
        self.answered.insert((from, kind), now_ms);
        true
    }

    /// Keeps the validly signed records newer than ours. Returns their names, and what to
    /// send if one of them is our own from a previous life.
    fn merge(
        &mut self,
        from: SocketAddr,
        records: Vec<SignedRecord>,
        peers: &[SocketAddr],
        now_ms: u64,
    ) -> (Vec<String>, Vec<Outgoing>) {
        let mut learned = Vec::new();
        let mut out = Vec::new();
        let second = now_ms / 1000;
        let ip = from.ip();
        let over_budget = |forged: &HashMap<IpAddr, (u64, u32)>| {
            forged
                .get(&ip)
                .is_some_and(|&(s, n)| s == second && n >= MAX_FORGED_PER_SECOND)
        };
        if over_budget(&self.forged) {
            self.stats.refused_forged += records.len() as u64;
            return (learned, out);
        }
        if records.len() > MAX_PUSH_RECORDS {
            self.stats.refused_oversized += (records.len() - MAX_PUSH_RECORDS) as u64;
        }
        let total = records.len().min(MAX_PUSH_RECORDS);
        for (i, signed) in records.into_iter().take(MAX_PUSH_RECORDS).enumerate() {
            // This record and the rest of the message, when a forgery ends it.
            let rest = (total - i) as u64;
            if check_signed_caps(&signed).is_err() {
                self.stats.refused_oversized += 1;
                continue;
            }
            if check_version(&signed.record, now_ms).is_err() {
                self.stats.refused_absurd += 1;
                continue;
            }
            let name = &signed.record.name;
            let version = signed.record.version;
            if *name == self.me {
                // Our own record from a previous life, newer than ours: publish above it,
                // if it is really ours and there is room above it.
                if version <= self.own().version {
                    continue;
                }
                if self.authority.verify(&signed, now_ms).is_err() {
                    self.stats.refused_forged += rest;
                    self.note_forgery(ip, second);
                    break;
                }
                out.extend(self.outlive(version, peers, now_ms));
                continue;
            }
            if self.tombstones.get(name).is_some_and(|&t| t >= version) {
                self.stats.refused_forgotten += 1;
                continue;
            }
            if self
                .records
                .get(name)
                .is_some_and(|e| e.signed.record.version >= version)
            {
                continue;
            }
            if self.authority.verify(&signed, now_ms).is_err() {
                // One forgery and the rest of the message is not worth checking.
                self.stats.refused_forged += rest;
                self.note_forgery(ip, second);
                break;
            }
            let name = name.clone();
            if self.tombstones.remove(&name).is_some() {
                self.tomb_order.retain(|n| *n != name);
            }
            self.records.insert(name.clone(), Entry::new(signed));
            learned.push(name);
        }
        (learned, out)
    }

    /// Counts a forgery against `ip` in `second` (the map bounded like the answer limiter).
    fn note_forgery(&mut self, ip: IpAddr, second: u64) {
        if self.forged.len() >= MAX_LIMITED_SENDERS && !self.forged.contains_key(&ip) {
            self.forged.retain(|_, (s, _)| *s == second);
            if self.forged.len() >= MAX_LIMITED_SENDERS {
                return;
            }
        }
        let entry = self.forged.entry(ip).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// A validly signed record of ours at version `theirs`, from before a restart that lost
    /// it: publish ours above it.
    fn outlive(&mut self, theirs: u64, peers: &[SocketAddr], now_ms: u64) -> Vec<Outgoing> {
        let Some(version) = theirs
            .checked_add(1)
            .filter(|v| *v <= version_limit(now_ms))
        else {
            self.stats.refused_absurd += 1;
            return Vec::new();
        };
        let mut record = self.own().clone();
        record.version = version;
        match self.authority.sign(&record) {
            Ok(signed) => {
                self.records.insert(self.me.clone(), Entry::new(signed));
                self.stats.outlived += 1;
                let me = self.me.clone();
                self.push(&[me], peers, None)
            }
            Err(_) => Vec::new(),
        }
    }

    /// The records named `names`, to `fanout` random peers other than ourselves and
    /// `except`.
    fn push(
        &mut self,
        names: &[String],
        peers: &[SocketAddr],
        except: Option<SocketAddr>,
    ) -> Vec<Outgoing> {
        let own_addr = self.own().addr;
        let candidates: Vec<SocketAddr> = peers
            .iter()
            .copied()
            .filter(|p| Some(*p) != except && *p != own_addr)
            .collect();
        let n = fanout(peers.len()).min(candidates.len());
        let entries: Vec<&Entry> = names.iter().filter_map(|n| self.records.get(n)).collect();
        let targets: Vec<SocketAddr> = candidates.sample(&mut self.rng, n).copied().collect();
        targets
            .into_iter()
            .flat_map(|to| pushes(to, &entries, GossipMsg::Push))
            .collect()
    }
}

/// Takes `len` from `budget` if it is there.
fn take_budget(budget: &mut usize, len: usize) -> bool {
    match budget.checked_sub(len) {
        Some(rest) => {
            *budget = rest;
            true
        }
        None => false,
    }
}

/// An upper bound of a digest entry's encoded length: the name, its length, the version.
fn digest_entry_len(name: &str) -> usize {
    name.len() + 5 + 10
}

/// `entries` to `to`, in as many pushes (or answers: `kind`) as keep each under
/// [`MAX_MESSAGE`] and [`MAX_PUSH_RECORDS`].
fn pushes(
    to: SocketAddr,
    entries: &[&Entry],
    kind: fn(Vec<SignedRecord>) -> GossipMsg,
) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut batch: Vec<SignedRecord> = Vec::new();
    let mut budget = MAX_MESSAGE - MESSAGE_SLACK;
    for e in entries {
        if !batch.is_empty() && (batch.len() == MAX_PUSH_RECORDS || budget < e.size) {
            out.push(Outgoing {
                to,
                msg: kind(std::mem::take(&mut batch)),
            });
            budget = MAX_MESSAGE - MESSAGE_SLACK;
        }
        budget = budget.saturating_sub(e.size);
        batch.push(e.signed.clone());
    }
    if !batch.is_empty() {
        out.push(Outgoing {
            to,
            msg: kind(batch),
        });
    }
    out
}

/// `names` to `to`, in as many wants as keep each under [`MAX_MESSAGE`].
fn wants(to: SocketAddr, names: Vec<String>) -> Vec<Outgoing> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut budget = MAX_MESSAGE - MESSAGE_SLACK;
    for name in names {
        let len = name.len() + 5;
        if !batch.is_empty() && budget < len {
            out.push(Outgoing {
                to,
                msg: GossipMsg::Want(std::mem::take(&mut batch)),
            });
            budget = MAX_MESSAGE - MESSAGE_SLACK;
        }
        budget = budget.saturating_sub(len);
        batch.push(name);
    }
    if !batch.is_empty() {
        out.push(Outgoing {
            to,
            msg: GossipMsg::Want(batch),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7400))
    }

    fn record(name: &str, i: u8, version: u64) -> HostRecord {
        HostRecord {
            name: name.into(),
            addr: addr(i),
            version,
            left: false,
            tags: BTreeMap::new(),
            apps: BTreeMap::new(),
            log: None,
        }
    }

    fn sim(name: &str) -> Box<SimAuthority> {
        Box::new(SimAuthority::new(name, b"test fleet"))
    }

    /// An authority that counts its signature checks.
    struct Counting(SimAuthority, std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Authority for Counting {
        fn sign(&mut self, record: &HostRecord) -> Result<SignedRecord, RecordError> {
            self.0.sign(record)
        }
        fn verify(&mut self, signed: &SignedRecord, now_ms: u64) -> Result<(), RecordError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.verify(signed, now_ms)
        }
        fn set_revoked(&mut self, serials: HashSet<Vec<u8>>) {
            self.0.set_revoked(serials)
        }
    }

    #[test]
    fn forgeries_cost_a_bounded_number_of_signature_checks() {
        let checks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let authority = Counting(SimAuthority::new("b", b"test fleet"), checks.clone());
        let mut b = HostTable::new(record("b", 2, 1), Box::new(authority), 1).unwrap();
        // Mallory signs records of `a` with its own key: 50 messages of 1,000 forgeries.
        let mut mallory = SimAuthority::new("mallory", b"test fleet");
        let forged: Vec<SignedRecord> = (0..1000)
            .map(|v| {
                let mut s = mallory.sign(&record("mallory", 9, 2 + v)).unwrap();
                s.record.name = "a".into();
                s
            })
            .collect();
        for _ in 0..50 {
            b.handle(addr(9), GossipMsg::Push(forged.clone()), &[], NOW);
        }
        let n = checks.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(n, MAX_FORGED_PER_SECOND as usize, "checked {n} signatures");
        assert!(b.get("a").is_none());
        assert_eq!(
            b.stats().refused_forged,
            50 * 1000,
            "every record counted refused"
        );
        // Another port of the same address shares the budget; the next second brings more.
        b.handle(
            SocketAddr::from(([127, 0, 0, 9], 9999)),
            GossipMsg::Push(forged.clone()),
            &[],
            NOW,
        );
        assert_eq!(checks.load(std::sync::atomic::Ordering::Relaxed), n);
        b.handle(addr(9), GossipMsg::Push(forged), &[], NOW + 1000);
        assert_eq!(checks.load(std::sync::atomic::Ordering::Relaxed), n + 1);
        // An honest sender is not affected.
        let mut a = SimAuthority::new("a", b"test fleet");
        let good = a.sign(&record("a", 1, 5)).unwrap();
        b.handle(addr(1), GossipMsg::Push(vec![good]), &[], NOW);
        assert_eq!(b.get("a").map(|r| r.version), Some(5));
    }

    /// `record`, signed by its owner.
    fn signed(record: HostRecord) -> SignedRecord {
        sim(&record.name).sign(&record).unwrap()
    }

    fn table(name: &str, i: u8, version: u64) -> HostTable {
        HostTable::new(record(name, i, version), sim(name), u64::from(i)).unwrap()
    }

    fn push(records: Vec<HostRecord>) -> GossipMsg {
        GossipMsg::Push(records.into_iter().map(signed).collect())
    }

    fn pushed_versions(out: &[Outgoing], name: &str) -> Vec<u64> {
        out.iter()
            .flat_map(|o| match &o.msg {
                GossipMsg::Push(records) | GossipMsg::Answer(records) => records.clone(),
                _ => Vec::new(),
            })
            .filter(|s| s.record.name == name)
            .map(|s| s.record.version)
            .collect()
    }

    #[test]
    fn a_change_is_versioned_signed_and_pushed_to_every_peer_of_a_small_fleet() {
        let mut a = table("a", 1, 1);
        let peers = [addr(2), addr(3), addr(1)];
        assert!(
            a.publish(|_| {}, &peers, NOW).unwrap().is_empty(),
            "no change, no version"
        );
        let out = a
            .publish(
                |r| drop(r.tags.insert("role".into(), "inference".into())),
                &peers,
                NOW,
            )
            .unwrap();
        assert_eq!(a.own().version, 2);
        let mut to: Vec<_> = out.iter().map(|o| o.to).collect();
        to.sort();
        assert_eq!(to, [addr(2), addr(3)], "everyone but itself");
        let GossipMsg::Push(records) = &out[0].msg else {
            panic!("{out:?}")
        };
        assert_eq!(records[0].record.version, 2);
        assert!(sim("b").verify(&records[0], NOW).is_ok());
    }

    #[test]
    fn the_newest_version_wins_and_old_ones_are_ignored() {
        let mut b = table("b", 2, 1);
        let mut v3 = record("a", 1, 3);
        v3.left = true;
        let (_, learned) = b.handle(addr(1), push(vec![v3.clone()]), &[addr(1)], NOW);
        assert_eq!(learned, vec![v3.clone()]);
        let (out, learned) = b.handle(
            addr(1),
            push(vec![record("a", 1, 2)]),
            &[addr(1), addr(3)],
            NOW,
        );
        assert!(learned.is_empty() && out.is_empty());
        assert_eq!(b.get("a"), Some(&v3));
    }

    #[test]
    fn a_forged_record_of_another_host_is_refused_and_the_table_is_unchanged() {
        let mut b = table("b", 2, 1);
        b.handle(addr(1), push(vec![record("a", 1, 3)]), &[addr(1)], NOW);
        let before = b.get("a").cloned();
        // Mallory rewrites a's record and signs it with her own key.
        let mut forged = record("a", 9, 10);
        forged.left = true;
        let mut mallory = SimAuthority::new("a", b"mallory's own secret");
        let by_mallory = mallory.sign(&forged).unwrap();
        // Or takes a's genuine record and changes it.
        let mut tampered = signed(record("a", 1, 3));
        tampered.record.version = 11;
        // Or signs it as herself and renames it.
        let mut renamed = signed(record("mallory", 9, 12));
        renamed.record.name = "a".into();
        for (i, bad) in [by_mallory, tampered, renamed].into_iter().enumerate() {
            let (out, learned) = b.handle(addr(9), GossipMsg::Push(vec![bad]), &[addr(9)], NOW);
            assert!(out.is_empty() && learned.is_empty());
            assert_eq!(b.get("a"), before.as_ref());
            assert_eq!(b.stats().refused_forged, i as u64 + 1);
        }
        let err = sim("b").verify(&signed(record("a", 1, 3)), NOW);
        assert!(err.is_ok());
        let mut wrong = signed(record("a", 1, 3));
        wrong.sig[0] ^= 1;
        let err = sim("b").verify(&wrong, NOW).unwrap_err();
        assert!(matches!(
            err.kind(),
            RecordErrorKind::Unauthenticated { host, reason: SignError::BadSignature } if host == "a"
        ));
        assert!(err.to_string().contains("not signed by `a`"), "{err}");
    }

    #[test]
    fn an_absurd_version_is_refused_without_panic_or_change() {
        let mut b = table("b", 2, NOW);
        for version in [u64::MAX, NOW + MAX_AHEAD_MS + 1] {
            for name in ["a", "b"] {
                let (out, learned) = b.handle(
                    addr(1),
                    push(vec![record(name, 1, version)]),
                    &[addr(1)],
                    NOW,
                );
                assert!(out.is_empty() && learned.is_empty());
            }
        }
        assert_eq!(b.get("a"), None);
        assert_eq!(b.own().version, NOW);
        assert_eq!(b.stats().refused_absurd, 4);
        // Nor wanted from a digest.
        let (out, _) = b.handle(
            addr(1),
            GossipMsg::Digest {
                after: None,
                through: None,
                versions: vec![("a".into(), u64::MAX), ("b".into(), u64::MAX)],
            },
            &[addr(1)],
            NOW,
        );
        assert!(
            out.iter().all(|o| !matches!(o.msg, GossipMsg::Want(_))),
            "{out:?}"
        );
        assert_eq!(b.own().version, NOW);
        // The highest version that is still plausible is taken.
        let edge = NOW + MAX_AHEAD_MS;
        let (_, learned) = b.handle(addr(1), push(vec![record("a", 1, edge)]), &[addr(1)], NOW);
        assert_eq!(learned.len(), 1);
        assert_eq!(first_version(u64::MAX, NOW), NOW);
        assert_eq!(first_version(edge + 5, NOW), NOW);
        assert_eq!(first_version(4, 0), 5);
        assert_eq!(first_version(0, NOW), NOW);
    }

    #[test]
    fn a_digest_flood_gets_bounded_answers_and_bumps_nobody() {
        let mut victim = table("v", 1, 5);
        let mut out_total = 0;
        for i in 0..10_000u64 {
            let (out, _) = victim.handle(
                addr(9),
                GossipMsg::Digest {
                    after: None,
                    through: None,
                    versions: vec![("v".into(), 6 + i), ("w".into(), 7)],
                },
                &[addr(9), addr(2), addr(3)],
                NOW + i / 10, // 10,000 digests in one simulated second
            );
            out_total += out.len();
            assert!(
                out.iter().all(|o| o.to == addr(9)),
                "answers go to the asker only"
            );
        }
        assert_eq!(victim.own().version, 5, "a digest alone bumps nothing");
        // One answer: a want of `v` and `w` (nothing is newer at the victim).
        assert_eq!(out_total, 1);
        assert_eq!(victim.stats().answers_rate_limited, 9_999);
        // A second later, one more answer.
        let (out, _) = victim.handle(
            addr(9),
            GossipMsg::Digest {
                after: None,
                through: None,
                versions: vec![("v".into(), 6)],
            },
            &[addr(9)],
            NOW + 1000,
        );
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].msg, GossipMsg::Want(names) if names == &["v".to_string()]));
        // Wants are limited the same way.
        let mut answered = 0;
        for i in 0..100 {
            let (out, _) = victim.handle(addr(8), GossipMsg::Want(vec!["v".into()]), &[], NOW + i);
            answered += out.len();
        }
        assert_eq!(answered, 1);
    }

    #[test]
    fn relaying_is_the_receivers_decision() {
        let many: Vec<SocketAddr> = (0..1000u32)
            .map(|i| SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 7400)))
            .collect();
        assert_eq!(fanout(50), 50);
        assert_eq!(fanout(1000), 10);
        let mut a = table("a", 1, 1);
        let out = a.publish(|r| r.left = true, &many, NOW).unwrap();
        assert_eq!(out.len(), 10);
        let rumor = out[0].msg.clone();
        // In a large fleet, what is new is passed on, never back to the sender.
        let mut b = table("b", 2, 1);
        let (relayed, learned) = b.handle(many[0], rumor.clone(), &many, NOW);
        assert_eq!(learned.len(), 1);
        assert_eq!(relayed.len(), 10);
        assert!(relayed.iter().all(|o| o.to != many[0]));
        assert_eq!(b.stats().relayed, 1);
        // The same rumor again is not relayed.
        let (again, _) = b.handle(many[1], rumor.clone(), &many, NOW);
        assert!(again.is_empty());
        // What answered a digest or a want is not passed on.
        let mut d = table("d", 4, 1);
        let GossipMsg::Push(records) = rumor.clone() else {
            panic!()
        };
        let (relayed, learned) = d.handle(many[0], GossipMsg::Answer(records), &many, NOW);
        assert_eq!(learned.len(), 1);
        assert!(relayed.is_empty(), "{relayed:?}");
        // In a small fleet the owner reached everyone: nobody relays, whatever was sent.
        let small: Vec<SocketAddr> = many[..DIRECT_LIMIT].to_vec();
        let mut c = table("c", 3, 1);
        let (relayed, learned) = c.handle(many[0], rumor, &small, NOW);
        assert_eq!(learned.len(), 1);
        assert!(relayed.is_empty(), "{relayed:?}");
    }

    #[test]
    fn a_record_over_a_cap_is_refused_at_publish_and_at_receive() {
        let mut a = table("a", 1, 1);
        a.publish(
            |r| drop(r.tags.insert("role".into(), "web".into())),
            &[addr(2)],
            NOW,
        )
        .unwrap();
        let before = a.own().clone();
        let err = a
            .publish(
                |r| {
                    for i in 0..10_000 {
                        r.tags.insert(format!("t{i}"), "x".into());
                    }
                },
                &[addr(2)],
                NOW,
            )
            .unwrap_err();
        assert!(matches!(
            err.kind(),
            RecordErrorKind::TooLarge {
                cap: Cap::Tags,
                len: 10_001,
                ..
            }
        ));
        assert!(err.to_string().contains("over the cap of 64"), "{err}");
        assert_eq!(a.own(), &before, "the old record stays");
        let err = a
            .publish(
                |r| {
                    r.apps.insert(
                        "x".repeat(MAX_APP_NAME + 1),
                        AppRecord {
                            revision: None,
                            health: Health::None,
                            held: BTreeSet::new(),
                            problem: None,
                            restarts: 0,
                            fetching: None,
                        },
                    );
                },
                &[],
                NOW,
            )
            .unwrap_err();
        assert!(matches!(
            err.kind(),
            RecordErrorKind::TooLarge {
                cap: Cap::AppName,
                ..
            }
        ));
        assert_eq!(a.own(), &before);

        // At a receiver, an oversized record signed by its owner is refused all the same.
        let mut big = record("b", 2, 2);
        big.tags.insert("k".into(), "v".repeat(MAX_TAG_VALUE + 1));
        let mut held = BTreeSet::new();
        for i in 0..=MAX_HELD {
            held.insert(format!("rev-{i}"));
        }
        let mut many_held = record("c", 3, 2);
        many_held.apps.insert(
            "app".into(),
            AppRecord {
                revision: None,
                health: Health::Running,
                held,
                problem: None,
                restarts: 0,
                fetching: None,
            },
        );
        let long_name = record(&"h".repeat(MAX_HOST_NAME + 1), 4, 2);
        let (out, learned) = a.handle(
            addr(2),
            push(vec![big, many_held, long_name]),
            &[addr(2)],
            NOW,
        );
        assert!(out.is_empty() && learned.is_empty());
        assert_eq!(a.len(), 1);
        assert_eq!(a.stats().refused_oversized, 5);
    }

    /// A record as large as the caps allow, with a name of the longest kind.
    fn maximal(i: usize) -> HostRecord {
        let mut r = record(&format!("{:h<240}{i:0>13}", ""), 1, 1);
        for t in 0..MAX_TAGS {
            r.tags
                .insert(format!("{t:k>MAX_TAG_KEY$}"), "v".repeat(MAX_TAG_VALUE));
        }
        for a in 0..MAX_APPS {
            let app = AppRecord {
                revision: Some("r".repeat(MAX_REVISION_ID)),
                health: Health::Running,
                held: (0..MAX_HELD)
                    .map(|h| format!("{h:r>MAX_REVISION_ID$}"))
                    .collect(),
                problem: Some("p".repeat(MAX_PROBLEM)),
                restarts: 0,
                fetching: Some("f".repeat(MAX_REVISION_ID)),
            };
            r.apps.insert(format!("{a:a>MAX_APP_NAME$}"), app);
            if encoded_len(&r) > MAX_RECORD_BYTES {
                r.apps.remove(&format!("{a:a>MAX_APP_NAME$}"));
                break;
            }
        }
        assert!(check_caps(&r).is_ok());
        r
    }

    fn assert_fits(out: &[Outgoing]) -> usize {
        let mut largest = 0;
        for o in out {
            let len = postcard::to_stdvec(&o.msg).unwrap().len();
            assert!(len < MAX_MESSAGE, "a message of {len} bytes");
            largest = largest.max(len);
        }
        largest
    }

    #[test]
    fn every_message_fits_the_budget() {
        // 10,000 records with names as long as allowed, and 40 as large as allowed.
        let mut a = table("a", 1, 1);
        let all: Vec<HostRecord> = (0..10_000)
            .map(|i| record(&format!("{:n>240}{i:0>13}", ""), 2, 1))
            .chain((0..40).map(maximal))
            .collect();
        assert!(all.iter().all(|r| r.name.len() == MAX_HOST_NAME));
        for chunk in all.chunks(MAX_PUSH_RECORDS) {
            let (_, learned) = a.handle(addr(2), push(chunk.to_vec()), &[], NOW);
            assert_eq!(learned.len(), chunk.len());
        }
        assert_eq!(a.len(), 10_041);

        // Digests: the ranges of successive rounds cover every name once, each fitting.
        let mut seen = BTreeSet::new();
        let mut rounds = 0;
        loop {
            let out = a.anti_entropy(&[addr(2)]);
            assert_fits(&out);
            rounds += 1;
            let GossipMsg::Digest {
                through, versions, ..
            } = &out[0].msg
            else {
                panic!()
            };
            for (n, _) in versions {
                assert!(seen.insert(n.clone()), "{n} twice");
            }
            if through.is_none() {
                break;
            }
        }
        assert_eq!(seen.len(), 10_041);
        assert!(rounds > 1, "split into {rounds}");

        // An empty agent's digest gets an answer as large as allowed, in fitting pushes.
        let mut e = table("e", 5, 1);
        let (out, _) = a.handle(addr(5), e.digest_to(addr(1)).msg, &[], NOW);
        let largest = assert_fits(&out);
        assert!(largest > MAX_MESSAGE / 2, "{largest}");
        let bytes: usize = out.iter().map(|o| encoded_len(&o.msg)).sum();
        assert!(
            bytes <= MAX_ANSWER_BYTES + out.len() * MESSAGE_SLACK,
            "{bytes}"
        );
        let mut learned = 0;
        for o in out {
            learned += e.handle(addr(1), o.msg, &[], NOW).1.len();
        }
        assert!(learned > 1000, "{learned}");

        // Wanting all of them: fitting wants; the answer is capped too.
        let mut empty = table("z", 6, 1);
        let mut wants = Vec::new();
        let mut cursor = None;
        loop {
            let msg = a.digest_from(cursor.take());
            let GossipMsg::Digest { through, .. } = &msg else {
                panic!()
            };
            cursor = through.clone();
            let (out, _) = empty.handle(addr(1), msg, &[], NOW + wants.len() as u64 * 1000);
            wants.extend(out);
            if cursor.is_none() {
                break;
            }
        }
        assert_fits(&wants);
        let wanted: usize = wants
            .iter()
            .map(|o| match &o.msg {
                GossipMsg::Want(n) => n.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(wanted, 10_041);
        let (answer, _) = a.handle(addr(6), wants[0].msg.clone(), &[], NOW);
        assert_fits(&answer);
        // A push to many peers of a maximal record fits as well.
        let mut m = HostTable::new(maximal(1), sim(&maximal(1).name), 1).unwrap();
        let out = m
            .publish(|r| r.left = true, &[addr(2), addr(3)], NOW)
            .unwrap();
        assert!(assert_fits(&out) > 60_000);
    }

    #[test]
    fn a_restarted_agent_publishes_above_its_signed_previous_life_only() {
        // It lost its state and starts again at version 1; peers hold version 5.
        let mut a = table("a", 1, 1);
        let peers = [addr(2)];
        // A digest claiming a newer version of a only makes it ask.
        let (out, _) = a.handle(
            addr(2),
            GossipMsg::Digest {
                after: None,
                through: None,
                versions: vec![("a".into(), 5), ("b".into(), 1)],
            },
            &peers,
            NOW,
        );
        assert_eq!(a.own().version, 1);
        assert!(
            out.iter()
                .any(|o| matches!(&o.msg, GossipMsg::Want(n) if n.contains(&"a".to_string())))
        );
        // A forged previous life changes nothing.
        let mut forged = signed(record("a", 1, 5));
        forged.record.version = 50;
        let (out, _) = a.handle(addr(2), GossipMsg::Push(vec![forged]), &peers, NOW);
        assert!(out.is_empty());
        assert_eq!(a.own().version, 1);
        // The genuine one: publish above it.
        let (out, _) = a.handle(addr(2), push(vec![record("a", 1, 5)]), &peers, NOW);
        assert_eq!(a.own().version, 6);
        assert_eq!(pushed_versions(&out, "a"), [6]);
        assert_eq!(a.stats().outlived, 1);
        // Its own current record coming back changes nothing.
        let own = a.signed("a").unwrap().clone();
        let (out, learned) = a.handle(addr(2), GossipMsg::Push(vec![own]), &peers, NOW);
        assert!(out.is_empty() && learned.is_empty());
        assert_eq!(a.own().version, 6);
    }

    #[test]
    fn anti_entropy_trades_what_each_side_misses() {
        let mut a = table("a", 1, 1);
        let mut b = table("b", 2, 4);
        b.handle(addr(3), push(vec![record("c", 3, 9)]), &[], NOW);
        // a → b: digest; b answers with its newer records and asks for a's.
        let digest = a.anti_entropy(&[addr(2)]).remove(0);
        let (replies, _) = b.handle(addr(1), digest.msg, &[addr(1)], NOW);
        assert_eq!(replies.len(), 2, "{replies:?}");
        for reply in replies {
            assert_eq!(reply.to, addr(1));
            let (back, _) = a.handle(addr(2), reply.msg, &[addr(2)], NOW);
            for m in back {
                b.handle(addr(1), m.msg, &[addr(1)], NOW);
            }
        }
        assert_eq!(a.get("b").map(|r| r.version), Some(4));
        assert_eq!(a.get("c").map(|r| r.version), Some(9));
        assert_eq!(b.get("a").map(|r| r.version), Some(1));
    }

    #[test]
    fn a_forgotten_record_does_not_come_back_unless_newer() {
        let mut a = table("a", 1, 1);
        a.handle(addr(2), push(vec![record("b", 2, 4)]), &[], NOW);
        assert!(!a.forget("a"), "never its own");
        assert!(a.forget("b"));
        assert!(!a.forget("b"));
        for v in [3, 4] {
            let (_, learned) = a.handle(addr(2), push(vec![record("b", 2, v)]), &[], NOW);
            assert!(learned.is_empty());
        }
        assert_eq!(a.get("b"), None);
        assert_eq!(a.stats().refused_forgotten, 2);
        // Not wanted from a digest either.
        let (out, _) = a.handle(
            addr(2),
            GossipMsg::Digest {
                after: None,
                through: None,
                versions: vec![("b".into(), 4)],
            },
            &[],
            NOW,
        );
        assert!(out.iter().all(|o| !matches!(o.msg, GossipMsg::Want(_))));
        let (_, learned) = a.handle(addr(2), push(vec![record("b", 2, 5)]), &[], NOW);
        assert_eq!(learned.len(), 1, "a newer life is taken");
        // Tombstones are bounded: the oldest go first.
        let names: Vec<String> = (0..MAX_TOMBSTONES + 10).map(|i| format!("h{i}")).collect();
        for chunk in names.chunks(MAX_PUSH_RECORDS) {
            let records = chunk.iter().map(|n| record(n, 3, 1)).collect();
            a.handle(addr(2), push(records), &[], NOW);
        }
        for n in &names {
            assert!(a.forget(n));
        }
        assert_eq!(a.tombstones.len(), MAX_TOMBSTONES);
        let (_, learned) = a.handle(addr(2), push(vec![record("h0", 3, 1)]), &[], NOW);
        assert_eq!(learned.len(), 1, "its tombstone was evicted");
        let (_, learned) = a.handle(addr(2), push(vec![record("h20", 3, 1)]), &[], NOW);
        assert!(learned.is_empty());
    }

    #[test]
    fn fleet_authority_checks_owner_chain_role_and_revocation() {
        use crate::identity::{Role, init_ca, issue};
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca).unwrap();
        for (name, role) in [
            ("a", Role::Agent),
            ("b", Role::Agent),
            ("alice", Role::Operator),
        ] {
            issue(&ca, name, role, &dir.path().join(name)).unwrap();
        }
        let other_ca = dir.path().join("other-ca");
        init_ca(&other_ca).unwrap();
        issue(&other_ca, "a", Role::Agent, &dir.path().join("a-elsewhere")).unwrap();
        let load = |n: &str| Identity::load(&dir.path().join(n)).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut a = FleetAuthority::new(&load("a")).unwrap();
        let mut b = FleetAuthority::new(&load("b")).unwrap();
        let reason = |r: Result<(), RecordError>| match r.unwrap_err().kind() {
            RecordErrorKind::Unauthenticated { reason, .. } => reason.clone(),
            k => panic!("{k:?}"),
        };

        let rec = record("a", 1, 7);
        let good = a.sign(&rec).unwrap();
        assert!(b.verify(&good, now).is_ok());
        assert!(b.verify(&good, now).is_ok(), "again, from the cache");
        assert_eq!(b.verifier.cached(), 1, "one chain check for both");
        assert_eq!(
            a.sign(&record("b", 2, 1)).unwrap_err().kind(),
            &RecordErrorKind::NotOwn {
                host: "b".into(),
                me: "a".into()
            }
        );
        // Tampered after signing.
        let mut tampered = good.clone();
        tampered.record.left = true;
        assert_eq!(reason(b.verify(&tampered, now)), SignError::BadSignature);
        // B's key and certificate claiming to be A.
        let mut claim = b.sign(&record("b", 2, 7)).unwrap();
        claim.record.name = "a".into();
        let claim = SignedRecord {
            sig: Signer::new(&load("b"))
                .unwrap()
                .sign(&SignedRecord::signed_bytes(&claim.record))
                .unwrap(),
            ..claim
        };
        assert!(matches!(
            reason(a.verify(&claim, now)),
            SignError::WrongName { named, expected } if named == "b" && expected == "a"
        ));
        // A's certificate with B's signature.
        let mixed = SignedRecord {
            sig: claim.sig.clone(),
            ..good.clone()
        };
        assert_eq!(reason(b.verify(&mixed, now)), SignError::BadSignature);
        // An operator's certificate.
        let alice = load("alice");
        let op_record = record("alice", 3, 1);
        let op = SignedRecord {
            sig: Signer::new(&alice)
                .unwrap()
                .sign(&SignedRecord::signed_bytes(&op_record))
                .unwrap(),
            cert: alice.cert.to_vec(),
            record: op_record,
        };
        assert_eq!(
            reason(b.verify(&op, now)),
            SignError::NotAnAgent("alice".into())
        );
        // A certificate for `a` from another CA.
        let mut elsewhere = FleetAuthority::new(&load("a-elsewhere")).unwrap();
        let foreign = elsewhere.sign(&rec).unwrap();
        assert!(matches!(
            reason(b.verify(&foreign, now)),
            SignError::Untrusted(_)
        ));
        // Garbage for a certificate, and a time outside the certificate's validity.
        let junk = SignedRecord {
            cert: vec![0x30, 3, 1, 2, 3],
            ..good.clone()
        };
        assert_eq!(reason(b.verify(&junk, now)), SignError::NotACertificate);
        let in_ten_years = now + 10 * 365 * 86_400_000;
        assert_eq!(
            reason(b.verify(&good, in_ten_years)),
            SignError::NotValidNow
        );
        // Revoked: refused even though its chain check is cached.
        // As a revocation list names it (the same normalisation the verifier uses).
        let serial = crate::identity::revocation::serial_of(&good.cert).unwrap();
        b.set_revoked(HashSet::from([serial]));
        assert_eq!(reason(b.verify(&good, now)), SignError::Revoked);

        // In a table: B's table refuses A's record signed by B.
        let mut tb = HostTable::new(
            record("b", 2, now),
            Box::new(FleetAuthority::new(&load("b")).unwrap()),
            1,
        )
        .unwrap();
        let (_, learned) = tb.handle(addr(1), GossipMsg::Push(vec![claim]), &[], now);
        assert!(learned.is_empty());
        assert_eq!(tb.stats().refused_forged, 1);
        let (_, learned) = tb.handle(addr(1), GossipMsg::Push(vec![good]), &[], now);
        assert_eq!(learned.len(), 1);
    }
}
