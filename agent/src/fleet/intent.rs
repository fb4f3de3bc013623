//! Deployment intents: what an operator approved, signed by the operator, checked by every
//! host before it installs anything.
//!
//! The CLI builds an [`Intent`] (application, deployment group, [`Targets`], the revision
//! id of the bundle, the [`DeploymentConfig`], a fresh random id, the time and the
//! operator's name) and [`sign`]s it with the operator's identity. The [`SignedIntent`]
//! travels through any agent and the coordinator to the hosts. A host then, in this order:
//!
//! 1. [`verify`]: the sizes are bounded, the certificate chains to the fleet CA, is valid now
//!    and not revoked, carries the **operator** role, its key made the signature, the body
//!    decodes, names the certificate's holder as its operator, and is neither from the
//!    future (beyond [`MAX_CLOCK_SKEW_SECS`]) nor older than [`MAX_AGE_SECS`];
//! 2. [`check_revision`]: the bundle it fetched is the revision the operator signed;
//! 3. [`Executed::admit`]: the intent's id was never executed here; the id is on disk
//!    (fsynced) before `admit` returns;
//! 4. only then installs.
//!
//! So an agent, the coordinator included, can relay, delay or drop an intent, but cannot
//! make one up, alter one, replay one, or point one at other code: a host runs only
//! revisions an operator signed, once per intent. An agent's certificate cannot sign an
//! intent at all ([`IntentErrorKind::NotAnOperator`]), so an agent's identity cannot create,
//! stop or roll back a deployment.
//!
//! Signatures reuse the identity module: [`Signer`] signs, [`CertVerifier`] checks chain,
//! validity and revocation (one verifier per host, with the revocation list in force, and its
//! cache of checked certificates). The signed message is [`INTENT_CONTEXT`] followed by the
//! body, so an intent signature can never be taken for any other signature in the fleet.
//!
//! Every error is an [`IntentError`] whose [`IntentErrorKind`] says what was wrong and what
//! to do about it; callers match on the kind, never on the text.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::log::{Fence, Verdict};
use super::plan::{DeploymentConfig, MAX_BAKE_SECS, MAX_ROLLOUT_SECS, Rollout};
use super::targets::{Targets, quote};
use crate::bundle::RevisionId;
use crate::durable::write_whole;
use crate::identity::sign::{CertVerifier, SignError, Signer};
use crate::identity::{Identity, Role, name_and_role};

/// What every intent signature covers before the body: a signature made for anything else
/// in the fleet (a host record, a future message) never verifies as an intent, and the
/// reverse.
pub const INTENT_CONTEXT: &[u8] = b"shoal deployment intent v1\0";

/// The largest signed body a host parses, in bytes. The largest valid intent is under
/// 40 KiB: its targets' canonical text is at most 37,056 bytes (see
/// [`super::targets::MAX_INPUT`]), every other field is a short name or number.
pub const MAX_BODY: usize = 64 * 1024;
/// The largest certificate a host looks at, in bytes. A fleet certificate (ECDSA P-256,
/// two names and a role) is about 600 bytes.
pub const MAX_CERT: usize = 16 * 1024;
/// The largest signature, in bytes: an ASN.1 DER ECDSA P-256 signature is at most 72.
pub const MAX_SIGNATURE: usize = 72;

/// How far in the future of the host's clock an intent's creation time may be: the clocks of
/// the operator's machine and the hosts may disagree by this much (5 minutes).
pub const MAX_CLOCK_SKEW_SECS: u64 = 5 * 60;
/// How long an intent stays valid after it was created: a day. Long enough for a slow
/// rollout across a large fleet to reach its last batch (a host verifies the intent when its
/// batch starts), short enough that the replay store ([`Executed`]) stays small. A
/// deployment that must start later is signed again.
pub const MAX_AGE_SECS: u64 = 24 * 3600;
/// The most intent ids [`Executed`] remembers at once. When it is full of unexpired ids it
/// refuses new intents ([`IntentErrorKind::ReplayStoreFull`]) rather than forget one.
pub const MAX_EXECUTED: usize = 10_000;

/// The longest application or deployment group name, in bytes (as long as a host record's
/// application names, `mesh::hoststate::MAX_APP_NAME`).
pub const MAX_NAME: usize = 64;
/// The longest operator name, in bytes (the fleet CA's limit on names).
pub const MAX_OPERATOR: usize = 63;
/// The longest zone tag key: as long as a host tag key may be (64 bytes).
pub const MAX_ZONE_TAG: usize = 64;

/// Hex digits in an intent id (128 random bits).
const ID_HEX: usize = 32;
/// Hex digits in a revision id (a SHA-256, as `bundle::tree_id` makes it).
const REVISION_HEX: usize = 64;

/// What an operator asks the fleet to do: deploy `revision` of `app` to the hosts `targets`
/// choose, under `config`. Made by [`Intent::new`], which gives it a fresh id; signed by
/// [`sign`]; accepted by a host only through [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// 128 random bits in lowercase hex, fresh for every intent: what the replay guard
    /// remembers.
    pub id: String,
    /// The application (letters, digits, `-`, `_`, `.`; at most [`MAX_NAME`] bytes).
    pub app: String,
    /// The deployment group's name (same rules), or empty when the deployment is defined by
    /// its targets alone.
    pub group: String,
    /// Which hosts the deployment is for.
    pub targets: Targets,
    /// The revision id (64 lowercase hex digits) of the bundle to install.
    pub revision: String,
    /// How many hosts may be updated at once.
    pub config: DeploymentConfig,
    /// The waves the hosts are released in (absent in an intent of an older agent: none).
    #[serde(default)]
    pub rollout: Rollout,
    /// Zone by zone: the tag whose values are the zones (`--zones TAG`). Set exactly when
    /// the rollout is [`Rollout::Zones`].
    #[serde(default)]
    pub zone_tag: Option<String>,
    /// The revision to put back on the hosts that took this one if the deployment fails
    /// (the group's last successful revision when the operator signed): the operator's
    /// consent to that rollback, which a coordinator cannot forge. `None`: no automatic
    /// rollback (`--no-rollback`, or a group with no success yet).
    #[serde(default)]
    pub rollback_to: Option<String>,
    /// Only the targeted hosts that do not run the revision yet (CodeDeploy's "outdated
    /// instances only").
    #[serde(default)]
    pub outdated_only: bool,
    /// A failing ApplicationStop hook of the previous revision does not fail a host
    /// (CodeDeploy's `--ignore-application-stop-failures`).
    #[serde(default)]
    pub ignore_stop_failures: bool,
    /// When the operator created the intent, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// The operator's name: the common name of the certificate that signs the intent.
    pub operator: String,
}

impl Intent {
    /// A new intent by `operator` at `now_unix` (seconds since the epoch), with a fresh
    /// random id. Refuses fields a host would refuse ([`IntentErrorKind::InvalidField`]).
    pub fn new(
        app: &str,
        group: &str,
        targets: Targets,
        revision: &RevisionId,
        config: DeploymentConfig,
        operator: &str,
        now_unix: u64,
    ) -> Result<Intent, IntentError> {
        let mut id = [0u8; ID_HEX / 2];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| IntentErrorKind::NoRandomness)?;
        let intent = Intent {
            id: hex::encode(id),
            app: app.to_string(),
            group: group.to_string(),
            targets,
            revision: revision.0.clone(),
            config,
            rollout: Rollout::Waveless,
            zone_tag: None,
            rollback_to: None,
            outdated_only: false,
            ignore_stop_failures: false,
            created_unix: now_unix,
            operator: operator.to_string(),
        };
        intent.check_fields()?;
        Ok(intent)
    }

    /// The same intent, releasing its hosts in the waves of `rollout`; zone by zone, the
    /// zones are the values of the hosts' tag `zone_tag`.
    pub fn with_rollout(
        mut self,
        rollout: Rollout,
        zone_tag: Option<&str>,
    ) -> Result<Intent, IntentError> {
        self.rollout = rollout;
        self.zone_tag = zone_tag.map(String::from);
        self.check_fields()?;
        Ok(self)
    }

    /// The same intent, for only the targeted hosts that do not run the revision yet.
    pub fn outdated_only(mut self, outdated_only: bool) -> Intent {
        self.outdated_only = outdated_only;
        self
    }

    /// The same intent, letting hosts go on past a failing ApplicationStop hook.
    pub fn ignoring_stop_failures(mut self, ignore: bool) -> Intent {
        self.ignore_stop_failures = ignore;
        self
    }

    /// The same intent, consenting to a rollback to `revision` if it fails.
    pub fn with_rollback_to(mut self, revision: Option<String>) -> Result<Intent, IntentError> {
        self.rollback_to = revision;
        self.check_fields()?;
        Ok(self)
    }

    /// The intent of this one's rollback: the same operator, app, group and targets, the
    /// revision [`Intent::rollback_to`], one wave, and an id derived from this one's
    /// ([`rollback_id`]), so hosts keep its replay record apart. Refused when the operator
    /// did not consent to a rollback.
    pub fn rollback(&self) -> Result<Intent, IntentError> {
        let Some(revision) = self.rollback_to.clone() else {
            return Err(invalid(
                "rollback_to",
                "the operator signed no revision to roll back to".into(),
            ));
        };
        let rollback = Intent {
            id: rollback_id(&self.id),
            revision,
            rollout: Rollout::Waveless,
            zone_tag: None,
            rollback_to: None,
            ..self.clone()
        };
        rollback.check_fields()?;
        Ok(rollback)
    }

    /// The intent of the `number`-th catch-up of this one (a host that joined the group
    /// after this deployment succeeded, or missed it while down, gets its revision): the
    /// same operator, app, group, targets and revision, one wave, no rollback, and an id
    /// derived from this one's ([`catch_up_id`]), so hosts keep its replay record apart.
    ///
    /// Its creation time is `admitted_unix`, the time the host admits it: the original may
    /// be long expired (a catch-up comes whenever a host joins), and a host accepts a
    /// catch-up only when the log's voters confirm that the log made it
    /// ([`verify_any_age`]); from then on its replay record lives as a fresh intent's does.
    pub fn catch_up(&self, number: u32, admitted_unix: u64) -> Result<Intent, IntentError> {
        let catch_up = Intent {
            id: catch_up_id(&self.id, number),
            rollout: Rollout::Waveless,
            zone_tag: None,
            rollback_to: None,
            outdated_only: false,
            created_unix: admitted_unix,
            ..self.clone()
        };
        catch_up.check_fields()?;
        Ok(catch_up)
    }

    /// The rules on each field that its type does not already hold (targets and config are
    /// checked as they deserialize).
    fn check_fields(&self) -> Result<(), IntentError> {
        check_id(&self.id)?;
        check_name("app", &self.app, MAX_NAME, false)?;
        check_name("group", &self.group, MAX_NAME, true)?;
        check_name("operator", &self.operator, MAX_OPERATOR, false)?;
        if let Rollout::Canary { percent, bake_secs } | Rollout::Linear { percent, bake_secs } =
            self.rollout
            && (percent.get() == 0
                || bake_secs > MAX_BAKE_SECS
                || self.rollout.longest_bakes() > MAX_ROLLOUT_SECS)
        {
            return Err(invalid(
                "rollout",
                format!(
                    "waves of {percent} with a bake of {bake_secs} s: a wave is 1% to 100%, a bake at most {MAX_BAKE_SECS} s"
                ),
            ));
        }
        if let Rollout::Zones {
            first_bake_secs,
            bake_secs,
        } = self.rollout
            && first_bake_secs.max(bake_secs) > MAX_BAKE_SECS
        {
            return Err(invalid(
                "rollout",
                format!(
                    "zone bakes of {first_bake_secs} s and {bake_secs} s: a bake is at most {MAX_BAKE_SECS} s"
                ),
            ));
        }
        match (
            &self.zone_tag,
            matches!(self.rollout, Rollout::Zones { .. }),
        ) {
            (None, false) => {}
            (Some(tag), true) => {
                if tag.is_empty() || tag.len() > MAX_ZONE_TAG || tag.chars().any(char::is_control) {
                    return Err(invalid(
                        "zone_tag",
                        format!(
                            "{} is not a tag key (1 to {MAX_ZONE_TAG} bytes, no control characters)",
                            quote(tag)
                        ),
                    ));
                }
            }
            (None, true) => {
                return Err(invalid(
                    "zone_tag",
                    "zone by zone, the intent must name the zone tag".into(),
                ));
            }
            (Some(_), false) => {
                return Err(invalid(
                    "zone_tag",
                    "a zone tag without a rollout zone by zone".into(),
                ));
            }
        }
        if let Some(r) = &self.rollback_to
            && (r.len() != REVISION_HEX || !is_lower_hex(r))
        {
            return Err(invalid(
                "rollback_to",
                format!("{} is not a revision id", quote(r)),
            ));
        }
        if self.revision.len() != REVISION_HEX || !is_lower_hex(&self.revision) {
            return Err(invalid(
                "revision",
                format!(
                    "{:?} is not a revision id (64 lowercase hex digits)",
                    quote(&self.revision)
                ),
            ));
        }
        Ok(())
    }
}

/// The id of the rollback of the deployment `id`: derived, so every coordinator gives the
/// same one, and shaped as an intent id.
pub fn rollback_id(id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("shoal rollback of {id}").as_bytes());
    hex::encode(&digest[..ID_HEX / 2])
}

/// The id of the `number`-th catch-up of the deployment `id` ([`Intent::catch_up`]):
/// derived, so every coordinator gives the same one, and shaped as an intent id.
pub fn catch_up_id(id: &str, number: u32) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("shoal catch-up {number} of {id}").as_bytes());
    hex::encode(&digest[..ID_HEX / 2])
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_id(id: &str) -> Result<(), IntentError> {
    if id.len() != ID_HEX || !is_lower_hex(id) {
        return Err(invalid(
            "id",
            format!(
                "{:?} is not an intent id (32 lowercase hex digits)",
                quote(id)
            ),
        ));
    }
    Ok(())
}

/// Names (application, group, operator): letters, digits, `-`, `_`, `.`, not starting with
/// `-` or `.`, at most `max` bytes; empty only where `may_be_empty`.
fn check_name(
    field: &'static str,
    name: &str,
    max: usize,
    may_be_empty: bool,
) -> Result<(), IntentError> {
    if name.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            Err(invalid(field, "is empty".into()))
        };
    }
    let ok = name.len() <= max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if !ok {
        return Err(invalid(
            field,
            format!(
                "{:?} is not a valid name (letters, digits, `-`, `_`, `.`, not starting with \
                 `-` or `.`; at most {max} bytes)",
                quote(name)
            ),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, reason: String) -> IntentError {
    IntentErrorKind::InvalidField { field, reason }.into()
}

/// An intent as it travels: the exact bytes the operator signed, the operator's certificate
/// and the signature.
///
/// `body` is the intent encoded as compact JSON (`serde_json::to_vec` of [`Intent`]). JSON
/// rather than postcard because a signed intent outlives the process that made it (it sits in
/// the deployment log and is checked by agents of possibly newer or older versions during an
/// upgrade): JSON names every field, so a body from another version fails loudly
/// ([`IntentErrorKind::Malformed`]: unknown, missing or duplicate field, trailing bytes)
/// instead of being read as different values, and an operator or auditor can read what was
/// signed. The encoding need not be canonical: hosts verify the signature over `body` as
/// received and decode those very bytes, never a re-encoding, so what a host acts on is
/// exactly what the operator signed. (The fields themselves are deterministic: targets
/// serialize as their canonical text, and there are no maps or floats.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedIntent {
    /// The signed bytes: the intent as compact JSON.
    pub body: Vec<u8>,
    /// The operator's certificate (DER), issued by the fleet CA.
    pub cert: Vec<u8>,
    /// ECDSA P-256 SHA-256 (ASN.1 DER) over [`INTENT_CONTEXT`] followed by `body`.
    pub signature: Vec<u8>,
}

/// The message a signature covers.
fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(context.len() + body.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(body);
    msg
}

/// Refuses an identity that is not an operator's: only operators order deployments.
fn operator_only(identity: &Identity) -> Result<(), IntentError> {
    if identity.role != Role::Operator {
        return Err(IntentErrorKind::NotAnOperator {
            name: identity.name.clone(),
        }
        .into());
    }
    Ok(())
}

/// `value` as compact JSON of at most `max` bytes, and the identity's signature over
/// `context` followed by that JSON.
fn encode_and_sign<T: Serialize>(
    what: &'static str,
    max: usize,
    context: &[u8],
    value: &T,
    identity: &Identity,
) -> Result<(Vec<u8>, Vec<u8>), IntentError> {
    let body = serde_json::to_vec(value).map_err(|e| IntentErrorKind::Malformed {
        reason: e.to_string(),
    })?;
    if body.len() > max {
        return Err(IntentErrorKind::TooBig {
            what,
            len: body.len(),
            max,
        }
        .into());
    }
    let signing = |reason| IntentErrorKind::Signing { reason };
    let signature = Signer::new(identity)
        .map_err(signing)?
        .sign(&signed_message(context, &body))
        .map_err(signing)?;
    Ok((body, signature))
}

/// Signs `intent` with an operator's identity. Refuses an agent's identity
/// ([`IntentErrorKind::NotAnOperator`]), an intent naming another operator
/// ([`IntentErrorKind::OperatorMismatch`]) and fields a host would refuse.
pub fn sign(intent: &Intent, identity: &Identity) -> Result<SignedIntent, IntentError> {
    operator_only(identity)?;
    if intent.operator != identity.name {
        return Err(IntentErrorKind::OperatorMismatch {
            certificate: identity.name.clone(),
            intent: quote(&intent.operator),
        }
        .into());
    }
    intent.check_fields()?;
    let (body, signature) = encode_and_sign("intent", MAX_BODY, INTENT_CONTEXT, intent, identity)?;
    Ok(SignedIntent {
        body,
        cert: identity.cert.to_vec(),
        signature,
    })
}

/// Accepts `signed` only if an operator of this fleet signed it recently; returns the intent.
///
/// Checks, in this order, and refuses with the first that fails: sizes ([`MAX_BODY`],
/// [`MAX_CERT`], [`MAX_SIGNATURE`]) before anything is parsed; a signature is present; the
/// certificate chains to the fleet CA, is valid at `now_unix` and is not revoked (by
/// `verifier`, which holds the fleet CA and the revocation list in force); it carries the
/// operator role; its key made the signature; the body decodes and its fields are valid; the
/// body's operator is the certificate's holder; it was created at most
/// [`MAX_CLOCK_SKEW_SECS`] after `now_unix` and at most [`MAX_AGE_SECS`] before. Nothing from
/// the body is parsed before the signature is known to be an operator's.
///
/// It does not check replays (that is [`Executed::admit`]) nor the bundle
/// ([`check_revision`]).
pub fn verify(
    signed: &SignedIntent,
    verifier: &mut CertVerifier,
    now_unix: u64,
) -> Result<Intent, IntentError> {
    let intent = verify_any_age(signed, verifier, now_unix)?;
    check_age(&intent, now_unix)?;
    Ok(intent)
}

/// [`verify`] without the age limit ([`MAX_AGE_SECS`]); still refused from the future.
/// Only for a catch-up ([`Intent::catch_up`]), which a host runs only once a majority of
/// the log's voters confirmed that the log made it: the voters vouch for it, not its age.
/// The operator's certificate must still be valid and unrevoked now.
pub fn verify_any_age(
    signed: &SignedIntent,
    verifier: &mut CertVerifier,
    now_unix: u64,
) -> Result<Intent, IntentError> {
    check_envelope(
        ("intent", signed.body.len(), MAX_BODY),
        &signed.cert,
        &signed.signature,
    )?;
    let operator = check_operator_signature(
        verifier,
        &signed.cert,
        &signed_message(INTENT_CONTEXT, &signed.body),
        &signed.signature,
        now_unix,
    )?;

    let intent: Intent =
        serde_json::from_slice(&signed.body).map_err(|e| IntentErrorKind::Malformed {
            reason: e.to_string(),
        })?;
    intent.check_fields()?;
    if intent.operator != operator {
        return Err(IntentErrorKind::OperatorMismatch {
            certificate: operator,
            intent: quote(&intent.operator),
        }
        .into());
    }
    check_not_future(intent.created_unix, now_unix)?;
    Ok(intent)
}

/// The sizes of a signed operator message (its body as `(what, len, max)`, its certificate
/// and its signature), checked before anything is parsed, and that it is signed at all.
fn check_envelope(
    body: (&'static str, usize, usize),
    cert: &[u8],
    signature: &[u8],
) -> Result<(), IntentError> {
    for (what, len, max) in [
        body,
        ("certificate", cert.len(), MAX_CERT),
        ("signature", signature.len(), MAX_SIGNATURE),
    ] {
        if len > max {
            return Err(IntentErrorKind::TooBig { what, len, max }.into());
        }
    }
    if signature.is_empty() {
        return Err(IntentErrorKind::Unsigned.into());
    }
    Ok(())
}

/// Who signed `msg`: the holder of `cert`, an operator certificate of the fleet, valid now,
/// unrevoked, whose key made `sig`.
fn check_operator_signature(
    verifier: &mut CertVerifier,
    cert: &[u8],
    msg: &[u8],
    sig: &[u8],
    now_unix: u64,
) -> Result<String, IntentError> {
    let untrusted = |reason: String| IntentErrorKind::UntrustedCertificate { reason };
    let (name, _) = name_and_role(cert).map_err(|e| untrusted(format!("{e:#}")))?;
    let now_ms = now_unix.saturating_mul(1000);
    match verifier.verify_as(Role::Operator, cert, &name, msg, sig, now_ms) {
        Ok(()) => Ok(name),
        Err(SignError::NotAnOperator(_)) => Err(IntentErrorKind::NotAnOperator { name }.into()),
        Err(SignError::BadSignature) => Err(IntentErrorKind::BadSignature.into()),
        Err(SignError::Revoked) => Err(IntentErrorKind::Revoked { name }.into()),
        Err(SignError::NotValidNow) => Err(IntentErrorKind::CertificateNotValidNow { name }.into()),
        Err(SignError::Untrusted(reason)) => Err(untrusted(reason).into()),
        Err(e) => Err(untrusted(e.to_string()).into()),
    }
}

/// Refuses a creation time more than [`MAX_CLOCK_SKEW_SECS`] after `now_unix`.
fn check_not_future(created_unix: u64, now_unix: u64) -> Result<(), IntentError> {
    if created_unix > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(IntentErrorKind::FromTheFuture {
            created_unix,
            now_unix,
            max_skew_secs: MAX_CLOCK_SKEW_SECS,
        }
        .into());
    }
    Ok(())
}

/// Refuses an intent older than [`MAX_AGE_SECS`] at `now_unix`.
fn check_age(intent: &Intent, now_unix: u64) -> Result<(), IntentError> {
    if intent.created_unix < now_unix.saturating_sub(MAX_AGE_SECS) {
        return Err(expired(intent, now_unix));
    }
    Ok(())
}

fn expired(intent: &Intent, now_unix: u64) -> IntentError {
    IntentErrorKind::Expired {
        created_unix: intent.created_unix,
        now_unix,
        max_age_secs: MAX_AGE_SECS,
    }
    .into()
}

/// Accepts the bundle a host holds only if it is the revision the operator signed.
/// `bundle_revision` is the id the host computed from the bundle's content
/// (`bundle::tree_id`), never one a peer asserted.
pub fn check_revision(intent: &Intent, bundle_revision: &str) -> Result<(), IntentError> {
    if intent.revision != bundle_revision {
        return Err(IntentErrorKind::RevisionMismatch {
            signed: intent.revision.clone(),
            bundle: quote(bundle_revision),
        }
        .into());
    }
    Ok(())
}

/// Accepts an intent on a host only if the host is one of its targets, by the host's own
/// tags (never the tags a coordinator or a peer says it has): a coordinator cannot carry
/// a revision approved for some hosts to others.
pub fn check_host(
    intent: &Intent,
    host: &str,
    own_tags: &std::collections::BTreeMap<String, String>,
) -> Result<(), IntentError> {
    if !intent.targets.matches(own_tags) {
        return Err(IntentErrorKind::NotATarget {
            host: quote(host),
            targets: intent.targets.to_string(),
        }
        .into());
    }
    Ok(())
}

/// Domain separation for [`SignedStop`]: a stop cannot be replayed as an intent, nor the
/// reverse.
pub const STOP_CONTEXT: &[u8] = b"shoal deployment stop v1\0";

/// The largest signed stop order's body (its JSON: an id, a name and a time).
const MAX_STOP: usize = 1024;

/// An operator's order to stop a deployment: no batch starts after it. Signed like an
/// intent ([`sign_stop`], [`verify_stop`]), so an agent, coordinator included, cannot stop
/// a deployment no operator asked to stop. Replaying one changes nothing: a stopped
/// deployment stays stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stop {
    /// The deployment to stop (its intent's id).
    pub deployment: String,
    /// The operator's name: the common name of the certificate that signs it.
    pub operator: String,
    /// When the operator made it, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// Roll the deployment back once its hosts in flight have reported (to the revision
    /// its intent consented to).
    #[serde(default)]
    pub rollback: bool,
}

/// A [`Stop`] as compact JSON with its operator's signature over [`STOP_CONTEXT`] + body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStop {
    pub body: Vec<u8>,
    pub cert: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Signs an order to stop `deployment` with an operator's identity; refuses an agent's.
pub fn sign_stop(
    deployment: &str,
    rollback: bool,
    identity: &Identity,
    now_unix: u64,
) -> Result<SignedStop, IntentError> {
    operator_only(identity)?;
    check_id(deployment)?;
    let stop = Stop {
        deployment: deployment.to_owned(),
        operator: identity.name.clone(),
        created_unix: now_unix,
        rollback,
    };
    let (body, signature) = encode_and_sign("stop order", MAX_STOP, STOP_CONTEXT, &stop, identity)?;
    Ok(SignedStop {
        body,
        cert: identity.cert.to_vec(),
        signature,
    })
}

/// Accepts `signed` only if an operator of this fleet signed it recently (the same
/// certificate, size and time checks as [`verify`]); returns the order.
pub fn verify_stop(
    signed: &SignedStop,
    verifier: &mut CertVerifier,
    now_unix: u64,
) -> Result<Stop, IntentError> {
    check_envelope(
        ("stop order", signed.body.len(), MAX_STOP),
        &signed.cert,
        &signed.signature,
    )?;
    let msg = signed_message(STOP_CONTEXT, &signed.body);
    let operator =
        check_operator_signature(verifier, &signed.cert, &msg, &signed.signature, now_unix)?;
    let stop: Stop =
        serde_json::from_slice(&signed.body).map_err(|e| IntentErrorKind::Malformed {
            reason: e.to_string(),
        })?;
    check_id(&stop.deployment)?;
    if stop.operator != operator {
        return Err(IntentErrorKind::OperatorMismatch {
            certificate: operator,
            intent: quote(&stop.operator),
        }
        .into());
    }
    if stop.created_unix > now_unix.saturating_add(MAX_CLOCK_SKEW_SECS)
        || stop.created_unix < now_unix.saturating_sub(MAX_AGE_SECS)
    {
        return Err(IntentErrorKind::Expired {
            created_unix: stop.created_unix,
            now_unix,
            max_age_secs: MAX_AGE_SECS,
        }
        .into());
    }
    Ok(stop)
}

/// The file in the store's directory that lists executed intents.
pub const EXECUTED_FILE: &str = "executed-intents.json";
/// The file whose lock makes one [`Executed`] per directory at a time.
const LOCK_FILE: &str = "executed-intents.lock";
/// The version of [`EXECUTED_FILE`]'s format.
const STORE_VERSION: u32 = 1;
/// Bytes per remembered id in the store file, generously: the id, its creation time, the
/// fence and an outcome whose reason is at most [`MAX_REASON`] bytes (escaped in JSON).
const BYTES_PER_ENTRY: usize = 2048;
/// The longest failure reason the store keeps for an intent (longer ones are cut).
pub const MAX_REASON: usize = 256;

/// The replay and fencing guard: the intents this host executed, on disk, with the highest
/// fence each was commanded with and how it ended here, so that no intent runs twice here
/// across restarts, a deposed coordinator's commands are refused, and a new coordinator
/// that asks again after a failover is answered rather than refused ([`Admission`]).
///
/// An id is remembered until its intent expires ([`MAX_AGE_SECS`] after its creation); after
/// that [`verify`] refuses the intent anyway. The store also keeps a *horizon*, the oldest
/// creation time it still admits, which only moves forward: an intent older than the horizon
/// is refused even if the host's clock is later set back, so forgetting an expired id never
/// lets it run again. At most `MAX_EXECUTED` ids are held; when all are unexpired, new
/// intents are refused ([`IntentErrorKind::ReplayStoreFull`]).
///
/// On disk: one directory holding [`EXECUTED_FILE`] (JSON: version, horizon, id → creation
/// time) and a lock file. The directory is created 0700 and must be a real directory (not a
/// symbolic link) owned by this user and writable by nobody else; the lock (`flock`, held
/// while the value lives) makes a second `Executed` on the same directory fail with
/// [`IntentErrorKind::StoreInUse`], so two handles can never each admit the same id. Files
/// are opened without following symbolic links, reads are bounded before allocation, and
/// every change is written whole with [`write_whole`] (temporary file, fsync, rename, fsync
/// of the directory). The whole file is rewritten on each admission: intents are rare (a
/// host executes a few a day), and at the cap it is about 6 MB.
#[derive(Debug)]
pub struct Executed {
    dir: PathBuf,
    horizon: u64,
    ids: BTreeMap<String, Run>,
    max: usize,
    _lock: nix::fcntl::Flock<File>,
}

/// [`EXECUTED_FILE`]'s shape.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    horizon: u64,
    executed: BTreeMap<String, Run>,
}

/// What the store remembers of one intent on this host: when it was created (for expiry),
/// the highest fence a coordinator commanded it with, and how it ended here, once it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Run {
    created: u64,
    fence: Fence,
    outcome: Option<Verdict>,
}

/// What a host does with a command that [`Executed::admit`] let through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A new intent: run it.
    Run,
    /// A newer coordinator asks again for an intent this host started and has no outcome
    /// for (the old coordinator died, or this host restarted mid-way): finish it (the
    /// lifecycle's journal recovers an interrupted deployment) and report; do not start it
    /// over.
    Resume,
    /// It ended here already: report this outcome again, run nothing.
    Done(Verdict),
}

impl Executed {
    /// Opens (or creates) the replay store in `dir`. Refuses a directory another `Executed`
    /// holds, an unsafe directory, and a store file it cannot read back (rather than start
    /// empty and forget what ran).
    pub fn open(dir: &Path) -> Result<Executed, IntentError> {
        Executed::open_capped(dir, MAX_EXECUTED)
    }

    fn open_capped(dir: &Path, max: usize) -> Result<Executed, IntentError> {
        let io = |e: std::io::Error| IntentErrorKind::StoreIo {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        check_dir(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(no_follow())
            .open(&lock_path)
            .map_err(|e| unsafe_or_io(&lock_path, e))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => IntentErrorKind::StoreInUse {
                    path: dir.to_path_buf(),
                },
                e => IntentErrorKind::StoreIo {
                    path: lock_path.clone(),
                    reason: e.to_string(),
                },
            })?;
        let (horizon, ids) = read_store(&dir.join(EXECUTED_FILE), max)?;
        Ok(Executed {
            dir: dir.to_path_buf(),
            horizon,
            ids,
            max,
            _lock: lock,
        })
    }

    /// Records that `intent` is about to run here under `fence` (the token of the command
    /// that carries it), or refuses it, and says what to do ([`Admission`]):
    /// - a new id is recorded and run;
    /// - a known id with an outcome is not run again: its outcome is reported again;
    /// - a known id without one, commanded with a newer fence (a new coordinator after a
    ///   failover), is resumed, never started over;
    /// - a fence below the one recorded is refused ([`IntentErrorKind::StaleFence`]: a
    ///   deposed coordinator), and the same fence again is a replay
    ///   ([`IntentErrorKind::Replayed`]);
    /// - an intent older than the horizon or [`MAX_AGE_SECS`] ([`IntentErrorKind::Expired`])
    ///   or from the future, or a full store, is refused.
    ///
    /// What is recorded is on disk, fsynced, before this returns: after a crash at any point
    /// the host either never acted on the intent or remembers it. Call it after [`verify`],
    /// [`check_revision`] and [`check_host`], before touching anything.
    pub fn admit(
        &mut self,
        intent: &Intent,
        fence: Fence,
        now_unix: u64,
    ) -> Result<Admission, IntentError> {
        check_id(&intent.id)?;
        check_not_future(intent.created_unix, now_unix)?;
        self.horizon = self.horizon.max(now_unix.saturating_sub(MAX_AGE_SECS));
        if intent.created_unix < self.horizon {
            return Err(expired(intent, now_unix));
        }
        if let Some(run) = self.ids.get(&intent.id).cloned() {
            if fence < run.fence {
                return Err(IntentErrorKind::StaleFence {
                    id: intent.id.clone(),
                    seen: run.fence,
                    got: fence,
                }
                .into());
            }
            if fence == run.fence && run.outcome.is_none() {
                return Err(IntentErrorKind::Replayed {
                    id: intent.id.clone(),
                }
                .into());
            }
            if fence > run.fence {
                self.record(
                    &intent.id,
                    Run {
                        fence,
                        ..run.clone()
                    },
                )?;
            }
            return Ok(match run.outcome {
                Some(outcome) => Admission::Done(outcome),
                None => Admission::Resume,
            });
        }
        let horizon = self.horizon;
        self.ids.retain(|_, run| run.created >= horizon);
        if self.ids.len() >= self.max {
            return Err(IntentErrorKind::ReplayStoreFull { max: self.max }.into());
        }
        self.record(
            &intent.id,
            Run {
                created: intent.created_unix,
                fence,
                outcome: None,
            },
        )?;
        Ok(Admission::Run)
    }

    /// Records how the intent `id`, admitted earlier, ended on this host (a failure's reason
    /// cut to [`MAX_REASON`] bytes), fsynced before this returns: a coordinator that asks
    /// again is told this outcome.
    pub fn finish(&mut self, id: &str, outcome: Verdict) -> Result<(), IntentError> {
        let Some(run) = self.ids.get(id).cloned() else {
            return Err(IntentErrorKind::NotAdmitted { id: quote(id) }.into());
        };
        let outcome = match outcome {
            Verdict::Failed { mut reason } => {
                if reason.len() > MAX_REASON {
                    let mut cut = MAX_REASON;
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                }
                Verdict::Failed { reason }
            }
            v => v,
        };
        self.record(
            id,
            Run {
                outcome: Some(outcome),
                ..run
            },
        )
    }

    /// Puts `run` in the store and on disk, or leaves both as they were.
    fn record(&mut self, id: &str, run: Run) -> Result<(), IntentError> {
        let before = self.ids.insert(id.to_string(), run);
        if let Err(e) = self.persist() {
            // Not on disk, so not recorded: memory stays what the disk says.
            match before {
                Some(b) => self.ids.insert(id.to_string(), b),
                None => self.ids.remove(id),
            };
            return Err(e);
        }
        Ok(())
    }

    /// How the intent with this id ended here, if it was executed here and ended.
    pub fn outcome(&self, id: &str) -> Option<&Verdict> {
        self.ids.get(id).and_then(|run| run.outcome.as_ref())
    }

    /// Whether the intent with this id was executed here (and has not expired).
    pub fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn persist(&self) -> Result<(), IntentError> {
        let path = self.dir.join(EXECUTED_FILE);
        let file = StoreFile {
            version: STORE_VERSION,
            horizon: self.horizon,
            executed: self.ids.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| IntentErrorKind::StoreIo {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_whole(&path, &bytes).map_err(|e| {
            IntentErrorKind::StoreIo {
                path,
                reason: format!("{e:#}"),
            }
            .into()
        })
    }
}

fn no_follow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// A symbolic link where a file should be is unsafe; anything else is an I/O error.
fn unsafe_or_io(path: &Path, e: std::io::Error) -> IntentError {
    if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
        IntentErrorKind::StoreUnsafe {
            path: path.to_path_buf(),
            reason: "it is a symbolic link".into(),
        }
        .into()
    } else {
        IntentErrorKind::StoreIo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
        .into()
    }
}

/// The store's directory, opened without following a link, is a directory owned by this
/// user that no one else may write into (so no one else can plant or swap its files).
fn check_dir(dir: &Path) -> Result<(), IntentError> {
    crate::beneath::check_private_dir(dir).map_err(|e| {
        match e {
            crate::beneath::PrivateDirError::Unsafe(reason) => IntentErrorKind::StoreUnsafe {
                path: dir.to_path_buf(),
                reason,
            },
            crate::beneath::PrivateDirError::Io(e) => IntentErrorKind::StoreIo {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            },
        }
        .into()
    })
}

/// Reads the store file: nothing yet if there is none; refuses one that is a link, too
/// large or not what [`Executed`] writes.
fn read_store(path: &Path, max: usize) -> Result<(u64, BTreeMap<String, Run>), IntentError> {
    let corrupt = |reason: String| IntentErrorKind::StoreCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, BTreeMap::new())),
        Err(e) => return Err(unsafe_or_io(path, e)),
    };
    let limit = max.saturating_mul(BYTES_PER_ENTRY).saturating_add(1024);
    let mut bytes = Vec::new();
    file.take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| IntentErrorKind::StoreIo {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if bytes.len() > limit {
        return Err(corrupt(format!("it is larger than {limit} bytes")).into());
    }
    let file: StoreFile =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("it does not decode: {e}")))?;
    if file.version != STORE_VERSION {
        return Err(corrupt(format!("version {} is not {STORE_VERSION}", file.version)).into());
    }
    if let Some(bad) = file.executed.keys().find(|id| check_id(id).is_err()) {
        return Err(corrupt(format!("{:?} is not an intent id", quote(bad))).into());
    }
    Ok((file.horizon, file.executed))
}

/// A deployment intent was refused (or could not be made, signed or recorded).
/// [`IntentError::kind`] says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deployment intent: {kind}")]
pub struct IntentError {
    kind: IntentErrorKind,
}

impl IntentError {
    /// What was wrong.
    pub fn kind(&self) -> &IntentErrorKind {
        &self.kind
    }
}

impl From<IntentErrorKind> for IntentError {
    fn from(kind: IntentErrorKind) -> Self {
        IntentError { kind }
    }
}

/// Why an intent was refused, and what to do about it. Text from an intent or a peer is cut
/// to 64 bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntentErrorKind {
    /// Signed, or asked to be signed, with a certificate that does not carry the operator
    /// role: agents cannot create, stop or roll back deployments.
    #[error(
        "`{name}` is not an operator: only an operator identity may create, stop or roll back \
         a deployment; use one issued with `shoal ca issue --operator`"
    )]
    NotAnOperator {
        /// The certificate's holder.
        name: String,
    },
    /// No signature at all.
    #[error(
        "the intent is not signed; deployments must be signed with an operator identity \
         (--identity DIR)"
    )]
    Unsigned,
    /// The signature was not made over this intent by this certificate's key.
    #[error(
        "the signature does not match the intent and its certificate: it was altered after \
         signing or signed with another key; nothing was installed, deploy again"
    )]
    BadSignature,
    /// The certificate is not one the fleet CA issued (or not a certificate).
    #[error(
        "the signing certificate is not from this fleet's CA ({reason}); sign with an \
         operator identity the fleet CA issued"
    )]
    UntrustedCertificate {
        /// What the chain check found.
        reason: String,
    },
    /// The certificate is expired or not yet valid at the host's time.
    #[error(
        "the certificate of `{name}` is expired or not yet valid; check this host's clock, \
         or issue the operator a new certificate"
    )]
    CertificateNotValidNow {
        /// The certificate's holder.
        name: String,
    },
    /// The certificate is on the fleet CA's revocation list.
    #[error("the certificate of `{name}` is revoked; the operator needs a new identity")]
    Revoked {
        /// The certificate's holder.
        name: String,
    },
    /// The intent names another operator than the one whose certificate signs it.
    #[error(
        "the intent names operator `{intent}` but is signed by `{certificate}`; an intent is \
         signed by the operator it names"
    )]
    OperatorMismatch {
        /// The signing certificate's holder.
        certificate: String,
        /// The operator the intent names.
        intent: String,
    },
    /// Created too far after the host's clock.
    #[error(
        "the intent was created at {created_unix} (Unix time), more than {max_skew_secs} s \
         after this host's clock ({now_unix}); check the clocks of the operator's machine \
         and of this host"
    )]
    FromTheFuture {
        /// The intent's creation time.
        created_unix: u64,
        /// The host's time.
        now_unix: u64,
        /// The skew allowed ([`MAX_CLOCK_SKEW_SECS`]).
        max_skew_secs: u64,
    },
    /// Older than an intent may be.
    #[error(
        "the intent was created at {created_unix} (Unix time), more than {max_age_secs} s \
         before this host's clock ({now_unix}) or before intents it already forgot; deploy \
         again to sign a fresh one"
    )]
    Expired {
        /// The intent's creation time.
        created_unix: u64,
        /// The host's time.
        now_unix: u64,
        /// The age allowed ([`MAX_AGE_SECS`]).
        max_age_secs: u64,
    },
    /// A part is larger than a host reads.
    #[error("the {what} is {len} bytes, more than the {max} a host accepts")]
    TooBig {
        /// Which part: `intent`, `certificate` or `signature`.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signed body is not an intent this agent understands.
    #[error(
        "the signed intent does not decode ({reason}); the operator's CLI and this agent may \
         be of incompatible versions"
    )]
    Malformed {
        /// What the decoder said.
        reason: String,
    },
    /// A field breaks its rules.
    #[error("the intent's {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// This host already executed this intent.
    #[error(
        "intent {id} was already executed on this host; an intent runs once, deploy again to \
         sign a new one"
    )]
    Replayed {
        /// The intent's id.
        id: String,
    },
    /// The bundle the host holds is not the revision the operator signed.
    #[error(
        "the operator signed revision {signed} but the bundle here is {bundle}; the bundle \
         was replaced or damaged on the way: fetch it again"
    )]
    RevisionMismatch {
        /// The revision in the intent.
        signed: String,
        /// The revision of the bundle.
        bundle: String,
    },
    /// A command carried a fence below the one this host already saw for the intent: it
    /// comes from a coordinator that has been replaced.
    #[error(
        "intent {id} was commanded with fence {got}, but this host already saw {seen}: the \
         command comes from a deposed coordinator and is refused"
    )]
    StaleFence {
        /// The intent's id.
        id: String,
        /// The highest fence this host saw for it.
        seen: Fence,
        /// The fence of the refused command.
        got: Fence,
    },
    /// An outcome was reported for an intent this host never admitted.
    #[error("intent {id} was never admitted on this host, so it has no outcome to record")]
    NotAdmitted {
        /// The id.
        id: String,
    },
    /// This host's own tags do not match the intent's targets.
    #[error(
        "host {host} is not among the targets the operator signed ({targets}): refused, \
         whatever the coordinator says"
    )]
    NotATarget {
        /// This host.
        host: String,
        /// The signed targets, in their canonical form.
        targets: String,
    },
    /// The replay store holds the most ids it may, none expired yet.
    #[error(
        "this host executed {max} intents in the last day, the most it remembers; it refuses \
         new ones until the oldest expire"
    )]
    ReplayStoreFull {
        /// The limit ([`MAX_EXECUTED`]).
        max: usize,
    },
    /// The identity could not sign.
    #[error("the operator identity cannot sign: {reason}")]
    Signing {
        /// What the signer said.
        reason: SignError,
    },
    /// The system's random number generator failed, so no fresh id could be made.
    #[error("the system's random number generator failed; no intent id could be made")]
    NoRandomness,
    /// The replay store could not be read or written.
    #[error("the executed-intents store {}: {reason}", path.display())]
    StoreIo {
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        reason: String,
    },
    /// The replay store's file is not what this agent writes. Starting empty would let
    /// intents run twice, so the agent refuses.
    #[error(
        "the executed-intents store {} cannot be read back ({reason}); restore it, or remove \
         it only if no intent signed in the last day may have run on this host",
        path.display()
    )]
    StoreCorrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Another handle holds the replay store's directory.
    #[error(
        "the executed-intents store {} is in use by another agent process on this host",
        path.display()
    )]
    StoreInUse {
        /// The directory.
        path: PathBuf,
    },
    /// The replay store's directory or files could be tampered with by someone else.
    #[error(
        "the executed-intents store {} is unsafe: {reason}; it must be a directory of the \
         agent's user that no one else can write to",
        path.display()
    )]
    StoreUnsafe {
        /// The directory or file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// The fence of the commands in tests that have one coordinator.
    const F: Fence = Fence { term: 1, index: 1 };
    use crate::identity::{init_ca, issue, revocation};

    /// A fleet CA with an operator (`alice`, `bob`) and an agent (`edge-1`), and another CA
    /// with its own `alice`.
    struct Fleet {
        dir: tempfile::TempDir,
    }

    impl Fleet {
        fn new() -> Fleet {
            let dir = tempfile::tempdir().unwrap();
            let ca = dir.path().join("ca");
            init_ca(&ca).unwrap();
            for (name, role) in [
                ("alice", Role::Operator),
                ("bob", Role::Operator),
                ("edge-1", Role::Agent),
            ] {
                issue(&ca, name, role, &dir.path().join(name)).unwrap();
            }
            let other = dir.path().join("other-ca");
            init_ca(&other).unwrap();
            issue(
                &other,
                "alice",
                Role::Operator,
                &dir.path().join("alice-elsewhere"),
            )
            .unwrap();
            Fleet { dir }
        }

        fn identity(&self, name: &str) -> Identity {
            Identity::load(&self.dir.path().join(name)).unwrap()
        }

        fn verifier(&self) -> CertVerifier {
            CertVerifier::new(self.identity("edge-1").ca)
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    const REV: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn intent_by(operator: &str, at: u64) -> Intent {
        Intent::new(
            "inference",
            "prod",
            "role=inference".parse().unwrap(),
            &RevisionId(REV.into()),
            DeploymentConfig::HalfAtATime,
            operator,
            at,
        )
        .unwrap()
    }

    /// Signs `body` as `who` would, bypassing [`sign`]'s checks: what an attacker holding
    /// `who`'s key can do.
    fn signed_by_hand(who: &Identity, body: Vec<u8>) -> SignedIntent {
        let signature = Signer::new(who)
            .unwrap()
            .sign(&signed_message(INTENT_CONTEXT, &body))
            .unwrap();
        SignedIntent {
            body,
            cert: who.cert.to_vec(),
            signature,
        }
    }

    fn refusal(r: Result<Intent, IntentError>) -> IntentErrorKind {
        r.unwrap_err().kind().clone()
    }

    #[test]
    fn an_operator_signs_and_every_host_verifies() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let intent = intent_by("alice", t);
        let signed = sign(&intent, &alice).unwrap();
        assert_eq!(signed.cert, alice.cert.to_vec());
        assert_eq!(
            serde_json::from_slice::<Intent>(&signed.body).unwrap(),
            intent
        );
        let mut verifier = fleet.verifier();
        assert_eq!(verify(&signed, &mut verifier, t).unwrap(), intent);
        assert_eq!(verify(&signed, &mut verifier, t).unwrap(), intent);
        assert_eq!(verifier.cached(), 1, "the chain is checked once");
        // Another host, another verifier: same answer.
        assert_eq!(verify(&signed, &mut fleet.verifier(), t).unwrap(), intent);
    }

    #[test]
    fn a_zone_tag_comes_with_a_rollout_zone_by_zone_and_only_with_it() {
        let zones = Rollout::zones(Some("60s"), None).unwrap();
        let ok = intent_by("alice", 1)
            .with_rollout(zones, Some("az"))
            .unwrap();
        assert_eq!(ok.zone_tag.as_deref(), Some("az"));
        // Its rollback goes in one wave, and names no zone tag.
        let back = ok
            .clone()
            .with_rollback_to(Some(REV.into()))
            .unwrap()
            .rollback()
            .unwrap();
        assert_eq!((back.rollout, back.zone_tag), (Rollout::Waveless, None));
        for (rollout, tag) in [
            (zones, None),
            (Rollout::Waveless, Some("az")),
            (zones, Some("")),
            (zones, Some("a\u{7}z")),
        ] {
            let kind = refusal(intent_by("alice", 1).with_rollout(rollout, tag));
            assert!(
                matches!(&kind, IntentErrorKind::InvalidField { field, .. } if *field == "zone_tag"),
                "{rollout} {tag:?}: {kind:?}"
            );
        }
        // What a host reads: the same rules, whoever wrote the intent.
        let mut forged = ok.clone();
        forged.zone_tag = None;
        let body = serde_json::to_vec(&forged).unwrap();
        assert!(serde_json::from_slice::<Intent>(&body).is_ok_and(|i| i.check_fields().is_err()));
    }

    #[test]
    fn a_signed_intent_survives_the_wire() {
        let fleet = Fleet::new();
        let t = now();
        let signed = sign(&intent_by("alice", t), &fleet.identity("alice")).unwrap();
        let via_postcard: SignedIntent =
            postcard::from_bytes(&postcard::to_allocvec(&signed).unwrap()).unwrap();
        let via_json: SignedIntent =
            serde_json::from_slice(&serde_json::to_vec(&signed).unwrap()).unwrap();
        for copy in [via_postcard, via_json] {
            assert_eq!(copy, signed);
            assert!(verify(&copy, &mut fleet.verifier(), t).is_ok());
        }
    }

    #[test]
    fn intent_ids_are_fresh_128_bit_hex() {
        let ids: HashSet<String> = (0..100).map(|_| intent_by("alice", 1).id).collect();
        assert_eq!(ids.len(), 100);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(is_lower_hex(id));
        }
    }

    #[test]
    fn the_constructor_refuses_fields_a_host_would_refuse() {
        let make = |app: &str, group: &str, revision: &str, operator: &str| {
            Intent::new(
                app,
                group,
                "env=prod".parse().unwrap(),
                &RevisionId(revision.into()),
                DeploymentConfig::default(),
                operator,
                1,
            )
        };
        assert!(make("inference", "", REV, "alice").is_ok(), "no group name");
        let field = |r: Result<Intent, IntentError>| match r.unwrap_err().kind() {
            IntentErrorKind::InvalidField { field, .. } => *field,
            k => panic!("{k:?}"),
        };
        assert_eq!(field(make("", "g", REV, "alice")), "app");
        assert_eq!(field(make("../etc", "g", REV, "alice")), "app");
        assert_eq!(field(make(&"a".repeat(65), "g", REV, "alice")), "app");
        assert_eq!(field(make("app", "a b", REV, "alice")), "group");
        assert_eq!(field(make("app", "g", "abc", "alice")), "revision");
        assert_eq!(
            field(make("app", "g", &REV.to_uppercase(), "alice")),
            "revision"
        );
        assert_eq!(field(make("app", "g", REV, "")), "operator");
        assert_eq!(field(make("app", "g", REV, &"o".repeat(64))), "operator");
    }

    #[test]
    fn an_agent_identity_cannot_sign() {
        let fleet = Fleet::new();
        let agent = fleet.identity("edge-1");
        let err = sign(&intent_by("edge-1", now()), &agent).unwrap_err();
        assert_eq!(
            err.kind(),
            &IntentErrorKind::NotAnOperator {
                name: "edge-1".into()
            }
        );
    }

    #[test]
    fn an_agent_signature_made_by_hand_is_refused_on_the_host() {
        let fleet = Fleet::new();
        let agent = fleet.identity("edge-1");
        let t = now();
        // A compromised agent (a coordinator, say) signs with its own key and certificate.
        let forged = signed_by_hand(&agent, serde_json::to_vec(&intent_by("edge-1", t)).unwrap());
        assert_eq!(
            refusal(verify(&forged, &mut fleet.verifier(), t)),
            IntentErrorKind::NotAnOperator {
                name: "edge-1".into()
            }
        );
        // The same, claiming to be alice in the body.
        let claim = signed_by_hand(&agent, serde_json::to_vec(&intent_by("alice", t)).unwrap());
        assert_eq!(
            refusal(verify(&claim, &mut fleet.verifier(), t)),
            IntentErrorKind::NotAnOperator {
                name: "edge-1".into()
            }
        );
        // An agent's certificate with a signature it did not make: still not an operator.
        let mixed = SignedIntent {
            signature: sign(&intent_by("alice", t), &fleet.identity("alice"))
                .unwrap()
                .signature,
            ..forged
        };
        assert_eq!(
            refusal(verify(&mixed, &mut fleet.verifier(), t)),
            IntentErrorKind::NotAnOperator {
                name: "edge-1".into()
            }
        );
    }

    #[test]
    fn an_unsigned_intent_is_refused() {
        let fleet = Fleet::new();
        let t = now();
        let unsigned = SignedIntent {
            signature: Vec::new(),
            ..sign(&intent_by("alice", t), &fleet.identity("alice")).unwrap()
        };
        assert_eq!(
            refusal(verify(&unsigned, &mut fleet.verifier(), t)),
            IntentErrorKind::Unsigned
        );
        let no_cert = SignedIntent {
            cert: Vec::new(),
            ..sign(&intent_by("alice", t), &fleet.identity("alice")).unwrap()
        };
        assert!(matches!(
            refusal(verify(&no_cert, &mut fleet.verifier(), t)),
            IntentErrorKind::UntrustedCertificate { .. }
        ));
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let signed = sign(&intent_by("alice", t), &alice).unwrap();
        let mut verifier = fleet.verifier();

        // One flipped bit anywhere in the body or the signature.
        for i in 0..signed.body.len() {
            let mut body = signed.body.clone();
            body[i] ^= 1 << (i % 8);
            let tampered = SignedIntent {
                body,
                ..signed.clone()
            };
            assert_eq!(
                refusal(verify(&tampered, &mut verifier, t)),
                IntentErrorKind::BadSignature,
                "bit flipped in body byte {i}"
            );
        }
        for i in 0..signed.signature.len() {
            let mut signature = signed.signature.clone();
            signature[i] ^= 0x80;
            let tampered = SignedIntent {
                signature,
                ..signed.clone()
            };
            assert_eq!(
                refusal(verify(&tampered, &mut verifier, t)),
                IntentErrorKind::BadSignature,
                "bit flipped in signature byte {i}"
            );
        }
        // A coordinator swaps the revision (or anything else) and keeps the signature.
        let mut other = intent_by("alice", t);
        other.revision = "f".repeat(64);
        let swapped = SignedIntent {
            body: serde_json::to_vec(&other).unwrap(),
            ..signed.clone()
        };
        assert_eq!(
            refusal(verify(&swapped, &mut verifier, t)),
            IntentErrorKind::BadSignature
        );
        // Alice's signature of the same body without the intent context (made for some other
        // purpose) is no intent signature.
        let out_of_context = SignedIntent {
            signature: Signer::new(&alice).unwrap().sign(&signed.body).unwrap(),
            ..signed.clone()
        };
        assert_eq!(
            refusal(verify(&out_of_context, &mut verifier, t)),
            IntentErrorKind::BadSignature
        );
        // Alice's signature presented with Bob's certificate.
        let borrowed = SignedIntent {
            cert: fleet.identity("bob").cert.to_vec(),
            ..signed.clone()
        };
        assert_eq!(
            refusal(verify(&borrowed, &mut verifier, t)),
            IntentErrorKind::BadSignature
        );
        // A flipped bit in the certificate's own signature breaks its chain.
        let mut cert = signed.cert.clone();
        *cert.last_mut().unwrap() ^= 1;
        let bad_cert = SignedIntent {
            cert,
            ..signed.clone()
        };
        assert!(matches!(
            refusal(verify(&bad_cert, &mut verifier, t)),
            IntentErrorKind::UntrustedCertificate { .. }
        ));
        assert!(verify(&signed, &mut verifier, t).is_ok(), "the original");
    }

    #[test]
    fn an_intent_naming_another_operator_is_refused() {
        let fleet = Fleet::new();
        let bob = fleet.identity("bob");
        let t = now();
        assert_eq!(
            sign(&intent_by("alice", t), &bob).unwrap_err().kind(),
            &IntentErrorKind::OperatorMismatch {
                certificate: "bob".into(),
                intent: "alice".into()
            }
        );
        // Bob signs, by hand, an intent that says Alice asked for it.
        let claim = signed_by_hand(&bob, serde_json::to_vec(&intent_by("alice", t)).unwrap());
        assert_eq!(
            refusal(verify(&claim, &mut fleet.verifier(), t)),
            IntentErrorKind::OperatorMismatch {
                certificate: "bob".into(),
                intent: "alice".into()
            }
        );
        assert!(
            verify(
                &sign(&intent_by("bob", t), &bob).unwrap(),
                &mut fleet.verifier(),
                t
            )
            .is_ok()
        );
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let fleet = Fleet::new();
        let t = now();
        let foreign = sign(&intent_by("alice", t), &fleet.identity("alice-elsewhere")).unwrap();
        assert!(matches!(
            refusal(verify(&foreign, &mut fleet.verifier(), t)),
            IntentErrorKind::UntrustedCertificate { .. }
        ));
        // The fleet CA's own certificate carries no role: it signs nothing.
        let ca = fleet.identity("alice").ca.to_vec();
        let as_ca = SignedIntent {
            cert: ca,
            ..foreign
        };
        assert!(matches!(
            refusal(verify(&as_ca, &mut fleet.verifier(), t)),
            IntentErrorKind::UntrustedCertificate { .. }
        ));
    }

    #[test]
    fn a_revoked_operator_is_refused() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let signed = sign(&intent_by("alice", t), &alice).unwrap();
        let mut verifier = fleet.verifier();
        assert!(
            verify(&signed, &mut verifier, t).is_ok(),
            "cached before revocation"
        );
        verifier.set_revoked(HashSet::from([revocation::serial_of(&alice.cert).unwrap()]));
        assert_eq!(
            refusal(verify(&signed, &mut verifier, t)),
            IntentErrorKind::Revoked {
                name: "alice".into()
            }
        );
        // A revoked agent is refused as revoked too.
        let agent = fleet.identity("edge-1");
        verifier.set_revoked(HashSet::from([revocation::serial_of(&agent.cert).unwrap()]));
        let by_agent = signed_by_hand(&agent, signed.body.clone());
        assert_eq!(
            refusal(verify(&by_agent, &mut verifier, t)),
            IntentErrorKind::Revoked {
                name: "edge-1".into()
            }
        );
        assert!(
            verify(&signed, &mut verifier, t).is_ok(),
            "alice is no longer revoked"
        );
    }

    #[test]
    fn a_certificate_outside_its_validity_is_refused() {
        let fleet = Fleet::new();
        // Signed (with a matching clock) three years on: the certificate has expired.
        let later = now() + 3 * 365 * 86_400;
        let signed = sign(&intent_by("alice", later), &fleet.identity("alice")).unwrap();
        assert_eq!(
            refusal(verify(&signed, &mut fleet.verifier(), later)),
            IntentErrorKind::CertificateNotValidNow {
                name: "alice".into()
            }
        );
    }

    #[test]
    fn oversized_parts_are_refused_before_parsing() {
        let fleet = Fleet::new();
        let t = now();
        let signed = sign(&intent_by("alice", t), &fleet.identity("alice")).unwrap();
        let cases = [
            (
                SignedIntent {
                    body: vec![b' '; MAX_BODY + 1],
                    ..signed.clone()
                },
                "intent",
                MAX_BODY,
            ),
            (
                SignedIntent {
                    cert: vec![0x30; MAX_CERT + 1],
                    ..signed.clone()
                },
                "certificate",
                MAX_CERT,
            ),
            (
                SignedIntent {
                    signature: vec![0; MAX_SIGNATURE + 1],
                    ..signed.clone()
                },
                "signature",
                MAX_SIGNATURE,
            ),
        ];
        for (big, what, max) in cases {
            assert_eq!(
                refusal(verify(&big, &mut fleet.verifier(), t)),
                IntentErrorKind::TooBig {
                    what,
                    len: max + 1,
                    max
                }
            );
        }
        // Even an operator's valid signature over a body that large is refused unread.
        let mut huge = serde_json::to_vec(&intent_by("alice", t)).unwrap();
        huge.resize(MAX_BODY + 1, b' ');
        let huge = signed_by_hand(&fleet.identity("alice"), huge);
        assert!(matches!(
            refusal(verify(&huge, &mut fleet.verifier(), t)),
            IntentErrorKind::TooBig { what: "intent", .. }
        ));
    }

    #[test]
    fn a_catch_up_outlives_its_original_s_age_and_keeps_a_replay_record_of_its_own() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let original = intent_by("alice", t)
            .with_rollout(Rollout::zones(Some("60s"), None).unwrap(), Some("az"))
            .unwrap()
            .with_rollback_to(Some(REV.into()))
            .unwrap()
            .outdated_only(true);
        let signed = sign(&original, &alice).unwrap();
        let week_later = t + 7 * 24 * 3600;
        // Too old as itself; its signature still checks without the age limit.
        assert!(matches!(
            refusal(verify(&signed, &mut fleet.verifier(), week_later)),
            IntentErrorKind::Expired { .. }
        ));
        let read = verify_any_age(&signed, &mut fleet.verifier(), week_later).unwrap();
        assert_eq!(read, original);
        // Still refused from the future, and when forged.
        let ahead = sign(&intent_by("alice", t + MAX_CLOCK_SKEW_SECS + 10), &alice).unwrap();
        assert!(matches!(
            refusal(verify_any_age(&ahead, &mut fleet.verifier(), t)),
            IntentErrorKind::FromTheFuture { .. }
        ));
        let mut forged = signed.clone();
        forged.body = String::from_utf8(forged.body)
            .unwrap()
            .replace(&format!("\"created_unix\":{t}"), "\"created_unix\":1")
            .into_bytes();
        assert!(matches!(
            refusal(verify_any_age(&forged, &mut fleet.verifier(), week_later)),
            IntentErrorKind::BadSignature
        ));

        // The catch-up: the same revision and targets, one wave, no rollback, all hosts,
        // an id of its own per number, created when the host admits it.
        let first = read.catch_up(0, week_later).unwrap();
        let second = read.catch_up(1, week_later).unwrap();
        assert_eq!(first.id, catch_up_id(&original.id, 0));
        assert_ne!(first.id, second.id);
        assert_ne!(first.id, original.id);
        assert_ne!(first.id, rollback_id(&original.id));
        assert_eq!(
            (&first.revision, &first.targets, &first.app, &first.group),
            (
                &original.revision,
                &original.targets,
                &original.app,
                &original.group
            )
        );
        assert_eq!(
            (
                first.rollout,
                first.zone_tag.as_deref(),
                first.rollback_to.as_deref(),
                first.outdated_only,
                first.created_unix
            ),
            (Rollout::Waveless, None, None, false, week_later)
        );
        // A host's replay store admits it once, as a fresh intent.
        let dir = tempfile::tempdir().unwrap();
        let mut executed = Executed::open(dir.path()).unwrap();
        let fence = Fence { term: 1, index: 5 };
        assert_eq!(
            executed.admit(&first, fence, week_later).unwrap(),
            Admission::Run
        );
        assert!(matches!(
            executed
                .admit(&first, fence, week_later)
                .unwrap_err()
                .kind(),
            IntentErrorKind::Replayed { .. }
        ));
        assert_eq!(
            executed.admit(&second, fence, week_later).unwrap(),
            Admission::Run
        );
    }

    #[test]
    fn an_intent_expires_and_may_not_come_from_the_future() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let signed = sign(&intent_by("alice", t), &alice).unwrap();
        assert!(verify(&signed, &mut fleet.verifier(), t + MAX_AGE_SECS).is_ok());
        assert_eq!(
            refusal(verify(&signed, &mut fleet.verifier(), t + MAX_AGE_SECS + 1)),
            IntentErrorKind::Expired {
                created_unix: t,
                now_unix: t + MAX_AGE_SECS + 1,
                max_age_secs: MAX_AGE_SECS
            }
        );
        // Created within the allowed skew ahead of the host: fine; beyond it: refused.
        let ahead = sign(&intent_by("alice", t + MAX_CLOCK_SKEW_SECS), &alice).unwrap();
        assert!(verify(&ahead, &mut fleet.verifier(), t).is_ok());
        let too_far = sign(&intent_by("alice", t + MAX_CLOCK_SKEW_SECS + 1), &alice).unwrap();
        assert_eq!(
            refusal(verify(&too_far, &mut fleet.verifier(), t)),
            IntentErrorKind::FromTheFuture {
                created_unix: t + MAX_CLOCK_SKEW_SECS + 1,
                now_unix: t,
                max_skew_secs: MAX_CLOCK_SKEW_SECS
            }
        );
        let absurd = sign(&intent_by("alice", u64::MAX), &alice).unwrap();
        assert!(matches!(
            refusal(verify(&absurd, &mut fleet.verifier(), t)),
            IntentErrorKind::FromTheFuture { .. }
        ));
    }

    #[test]
    fn a_signed_body_that_is_not_an_intent_is_refused() {
        let fleet = Fleet::new();
        let alice = fleet.identity("alice");
        let t = now();
        let good = serde_json::to_string(&intent_by("alice", t)).unwrap();
        let malformed = |body: String| {
            let signed = signed_by_hand(&alice, body.into_bytes());
            refusal(verify(&signed, &mut fleet.verifier(), t))
        };
        for body in [
            "not json".to_string(),
            String::new(),
            good.replace("\"app\"", "\"application\""),
            good.replacen('{', "{\"extra\":1,", 1),
            // A second `revision` a lenient parser might take instead of the first.
            good.replacen('{', &format!("{{\"revision\":\"{}\",", "e".repeat(64)), 1),
            format!("{good}{good}"),
            good.replace("\"role=inference\"", "\"\""),
            good.replace(
                "\"HalfAtATime\"",
                "{\"Custom\":{\"min_healthy\":{\"Percent\":101}}}",
            ),
        ] {
            assert!(
                matches!(malformed(body.clone()), IntentErrorKind::Malformed { .. }),
                "{body}"
            );
        }
        let bad_revision = good.replace(REV, "../../etc");
        assert!(matches!(
            malformed(bad_revision),
            IntentErrorKind::InvalidField {
                field: "revision",
                ..
            }
        ));
        let bad_id = {
            let mut intent = intent_by("alice", t);
            intent.id = "short".into();
            serde_json::to_string(&intent).unwrap()
        };
        assert!(matches!(
            malformed(bad_id),
            IntentErrorKind::InvalidField { field: "id", .. }
        ));
    }

    #[test]
    fn a_revision_other_than_the_bundles_is_refused() {
        let intent = intent_by("alice", 1);
        assert!(check_revision(&intent, REV).is_ok());
        let other = "a".repeat(64);
        assert_eq!(
            check_revision(&intent, &other).unwrap_err().kind(),
            &IntentErrorKind::RevisionMismatch {
                signed: REV.into(),
                bundle: other
            }
        );
        assert!(check_revision(&intent, &REV[..63]).is_err());
        assert!(check_revision(&intent, "").is_err());
    }

    #[test]
    fn a_host_outside_the_signed_targets_refuses() {
        let intent = intent_by("alice", 1);
        let tags = |v: &str| [("role".to_string(), v.to_string())].into_iter().collect();
        assert!(check_host(&intent, "edge-1", &tags("inference")).is_ok());
        assert_eq!(
            check_host(&intent, "db-1", &tags("db")).unwrap_err().kind(),
            &IntentErrorKind::NotATarget {
                host: "db-1".into(),
                targets: "role=inference".into()
            }
        );
        assert!(check_host(&intent, "bare", &Default::default()).is_err());
    }

    #[test]
    fn a_replay_is_refused_also_after_reopening_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("intents");
        let t = now();
        let (first, second) = (intent_by("alice", t), intent_by("alice", t));
        let mut executed = Executed::open(&store).unwrap();
        assert!(executed.is_empty());
        executed.admit(&first, F, t).unwrap();
        assert_eq!(
            executed.admit(&first, F, t + 1).unwrap_err().kind(),
            &IntentErrorKind::Replayed {
                id: first.id.clone()
            }
        );
        executed.admit(&second, F, t + 1).unwrap();
        drop(executed);

        let mut executed = Executed::open(&store).unwrap();
        assert_eq!(executed.len(), 2);
        for intent in [&first, &second] {
            assert!(executed.contains(&intent.id));
            assert_eq!(
                executed.admit(intent, F, t + 2).unwrap_err().kind(),
                &IntentErrorKind::Replayed {
                    id: intent.id.clone()
                }
            );
        }
    }

    #[test]
    fn a_new_coordinator_resumes_a_host_and_a_deposed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let intent = intent_by("alice", t);
        let (old, new) = (Fence { term: 3, index: 40 }, Fence { term: 4, index: 2 });
        let mut executed = Executed::open(dir.path()).unwrap();
        assert_eq!(executed.admit(&intent, old, t).unwrap(), Admission::Run);
        // The coordinator died before the host reported; the next one asks again.
        assert_eq!(executed.admit(&intent, new, t).unwrap(), Admission::Resume);
        // The deposed one is refused, even for an intent it started.
        assert_eq!(
            executed.admit(&intent, old, t).unwrap_err().kind(),
            &IntentErrorKind::StaleFence {
                id: intent.id.clone(),
                seen: new,
                got: old
            }
        );
        // Once it ended, every later ask gets the outcome, across a restart, and a reason
        // is kept bounded.
        let long = "é".repeat(MAX_REASON);
        executed
            .finish(&intent.id, Verdict::Failed { reason: long })
            .unwrap();
        drop(executed);
        let mut executed = Executed::open(dir.path()).unwrap();
        let later = Fence { term: 5, index: 1 };
        match executed.admit(&intent, later, t).unwrap() {
            Admission::Done(Verdict::Failed { reason }) => assert!(reason.len() <= MAX_REASON),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            executed.admit(&intent, new, t).unwrap_err().kind(),
            &IntentErrorKind::StaleFence {
                id: intent.id.clone(),
                seen: later,
                got: new
            }
        );
        assert!(matches!(
            executed
                .finish("0123456789abcdef0123456789abcdef", Verdict::Succeeded)
                .unwrap_err()
                .kind(),
            IntentErrorKind::NotAdmitted { .. }
        ));
    }

    #[test]
    fn an_id_is_on_disk_before_admit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let intent = intent_by("alice", t);
        let mut executed = Executed::open(dir.path()).unwrap();
        executed.admit(&intent, F, t).unwrap();
        // Read as a restarted agent would, while this one still holds the store.
        let on_disk: StoreFile =
            serde_json::from_slice(&std::fs::read(dir.path().join(EXECUTED_FILE)).unwrap())
                .unwrap();
        assert_eq!(on_disk.executed.get(&intent.id).map(|r| r.created), Some(t));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "the store and its lock, no temporary file: {names:?}"
        );
    }

    #[test]
    fn the_store_forgets_only_expired_ids_and_refuses_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let mut executed = Executed::open_capped(dir.path(), 3).unwrap();
        let old: Vec<Intent> = (0..3).map(|i| intent_by("alice", t + i)).collect();
        for intent in &old {
            executed.admit(intent, F, t + 2).unwrap();
        }
        let fresh = intent_by("alice", t + 10);
        assert_eq!(
            executed.admit(&fresh, F, t + 10).unwrap_err().kind(),
            &IntentErrorKind::ReplayStoreFull { max: 3 }
        );
        assert!(!executed.contains(&fresh.id), "refused, not recorded");
        assert!(
            old.iter().all(|i| executed.contains(&i.id)),
            "nothing forgotten"
        );
        // Once the oldest has expired, its place is free.
        let later = t + MAX_AGE_SECS + 1;
        executed.admit(&fresh, F, later).unwrap();
        assert!(!executed.contains(&old[0].id));
        assert!(executed.contains(&old[1].id) && executed.contains(&old[2].id));
        assert_eq!(executed.len(), 3);
        drop(executed);
        assert_eq!(Executed::open_capped(dir.path(), 3).unwrap().len(), 3);
    }

    #[test]
    fn a_clock_set_back_does_not_bring_forgotten_intents_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = now();
        let old = intent_by("alice", t);
        let mut executed = Executed::open(dir.path()).unwrap();
        executed.admit(&old, F, t).unwrap();
        // A day and more later another intent runs, and the old id is forgotten.
        let later = t + MAX_AGE_SECS + 100;
        executed
            .admit(&intent_by("alice", later), F, later)
            .unwrap();
        assert!(!executed.contains(&old.id));
        drop(executed);
        // The clock goes back to when the old intent was fresh, and the agent restarts.
        let mut executed = Executed::open(dir.path()).unwrap();
        assert!(matches!(
            executed.admit(&old, F, t).unwrap_err().kind(),
            IntentErrorKind::Expired { .. }
        ));
        let never_seen = intent_by("alice", t);
        assert!(matches!(
            executed.admit(&never_seen, F, t).unwrap_err().kind(),
            IntentErrorKind::Expired { .. }
        ));
        // And an absurd creation time cannot fill the store with ids that never expire.
        assert!(matches!(
            executed
                .admit(&intent_by("alice", u64::MAX), F, t)
                .unwrap_err()
                .kind(),
            IntentErrorKind::FromTheFuture { .. }
        ));
    }

    #[test]
    fn one_handle_per_store_directory() {
        let dir = tempfile::tempdir().unwrap();
        let executed = Executed::open(dir.path()).unwrap();
        assert_eq!(
            Executed::open(dir.path()).unwrap_err().kind(),
            &IntentErrorKind::StoreInUse {
                path: dir.path().to_path_buf()
            }
        );
        drop(executed);
        assert!(Executed::open(dir.path()).is_ok());
    }

    #[test]
    fn a_store_that_does_not_read_back_is_refused_not_forgotten() {
        let t = now();
        let corrupt = |bytes: &[u8]| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(EXECUTED_FILE), bytes).unwrap();
            Executed::open_capped(dir.path(), 3)
                .unwrap_err()
                .kind()
                .clone()
        };
        for bytes in [
            b"".to_vec(),
            b"{\"version\":1}".to_vec(),
            b"{\"version\":2,\"horizon\":0,\"executed\":{}}".to_vec(),
            b"{\"version\":1,\"horizon\":0,\"executed\":{\"nope\":1}}".to_vec(),
            vec![b' '; 3 * BYTES_PER_ENTRY + 1025],
        ] {
            assert!(
                matches!(corrupt(&bytes), IntentErrorKind::StoreCorrupt { .. }),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // A store written by another handle reads back.
        let dir = tempfile::tempdir().unwrap();
        let intent = intent_by("alice", t);
        Executed::open(dir.path())
            .unwrap()
            .admit(&intent, F, t)
            .unwrap();
        assert!(Executed::open(dir.path()).unwrap().contains(&intent.id));
    }

    #[test]
    fn an_unsafe_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let unsafe_kind = |r: Result<Executed, IntentError>| match r.unwrap_err().kind() {
            IntentErrorKind::StoreUnsafe { .. } => {}
            k => panic!("{k:?}"),
        };
        // Others may write into the directory.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        unsafe_kind(Executed::open(&open));
        // The directory is a link to another.
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        unsafe_kind(Executed::open(&link));
        // The store file is a link (to a file someone else controls).
        let planted = dir.path().join("planted");
        std::fs::create_dir(&planted).unwrap();
        std::fs::write(dir.path().join("elsewhere.json"), b"{}").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("elsewhere.json"),
            planted.join(EXECUTED_FILE),
        )
        .unwrap();
        unsafe_kind(Executed::open(&planted));
        // A new store directory is made 0700.
        let fresh = dir.path().join("a/b");
        Executed::open(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
