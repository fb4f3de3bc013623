//! What `shoal hosts` shows: every host the mesh knows of, with its membership state from
//! SWIM and its tags and applications from the gossiped host table. Pure, so it is tested
//! directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::hoststate::{AppRecord, HostTable, LogRecord};
use super::membership::MemberId;

/// A member's state as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

/// One host in `shoal hosts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub addr: SocketAddr,
    pub state: MemberState,
    pub tags: BTreeMap<String, String>,
    /// Application → active revision.
    pub apps: BTreeMap<String, Option<String>>,
    /// Application → health and the revisions held.
    pub details: BTreeMap<String, AppRecord>,
    /// Its part in the deployment log, as it says.
    #[serde(default)]
    pub log: Option<LogRecord>,
    /// The version of the host's gossiped record shown (0: none received yet).
    pub version: u64,
}

/// Combines what SWIM says (`members`: every identity it knows, with its state) with the
/// host table. This agent is alive by definition. A host with a record but no membership
/// entry yet is a suspect until SWIM confirms it; one SWIM declared down is dead, or left
/// if its last record says it left on purpose.
pub fn views<'a>(
    me: &MemberId,
    table: &HostTable,
    members: impl Iterator<Item = (&'a MemberId, foca::State)>,
) -> Vec<HostView> {
    // Per name, the liveliest identity (a restarted agent's old life is down).
    let mut swim: BTreeMap<&str, (&MemberId, MemberState)> = BTreeMap::new();
    for (id, state) in members {
        if id.name.is_empty() {
            continue;
        }
        let state = match state {
            foca::State::Alive => MemberState::Alive,
            foca::State::Suspect => MemberState::Suspect,
            foca::State::Down => MemberState::Dead,
        };
        let entry = swim.entry(id.name.as_str()).or_insert((id, state));
        if state < entry.1 {
            *entry = (id, state);
        }
    }
    let mut out: BTreeMap<String, HostView> = BTreeMap::new();
    for (name, (id, state)) in &swim {
        out.insert(
            name.to_string(),
            HostView {
                name: name.to_string(),
                addr: id.addr,
                state: *state,
                tags: BTreeMap::new(),
                apps: BTreeMap::new(),
                details: BTreeMap::new(),
                log: None,
                version: 0,
            },
        );
    }
    for record in table.records() {
        let state = if record.name == me.name {
            MemberState::Alive
        } else {
            match swim.get(record.name.as_str()) {
                Some((_, MemberState::Dead)) | None if record.left => MemberState::Left,
                Some((_, state)) => *state,
                None => MemberState::Suspect,
            }
        };
        let addr = match swim.get(record.name.as_str()) {
            Some((id, _)) if record.name != me.name => id.addr,
            _ => record.addr,
        };
        out.insert(
            record.name.clone(),
            HostView {
                name: record.name.clone(),
                addr,
                state,
                tags: record.tags.clone(),
                apps: record
                    .apps
                    .iter()
                    .map(|(app, a)| (app.clone(), a.revision.clone()))
                    .collect(),
                details: record.apps.clone(),
                log: record.log.clone(),
                version: record.version,
            },
        );
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::hoststate::{Authority, GossipMsg, Health, HostRecord, SimAuthority};
    use std::collections::BTreeSet;

    fn id(name: &str, i: u8, bump: u16) -> MemberId {
        MemberId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, i], 7400)),
            bump,
        }
    }

    fn record(name: &str, i: u8, left: bool) -> HostRecord {
        let mut apps = BTreeMap::new();
        apps.insert(
            "inference".to_string(),
            AppRecord {
                revision: Some("abc".into()),
                health: Health::Running,
                held: BTreeSet::from(["abc".to_string()]),
                problem: None,
                restarts: 0,
                fetching: None,
            },
        );
        HostRecord {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, i], 7400)),
            version: 3,
            left,
            tags: BTreeMap::from([("role".to_string(), "inference".to_string())]),
            apps,
            log: None,
        }
    }

    #[test]
    fn membership_and_records_make_one_list() {
        let me = id("a", 1, 0);
        let sim = |name: &str| Box::new(SimAuthority::new(name, b"fleet"));
        let mut table = HostTable::new(record("a", 1, false), sim("a"), 1).unwrap();
        let push = GossipMsg::Push(
            [
                record("b", 2, false),
                record("c", 3, false),
                record("d", 4, true),
                record("e", 5, false),
            ]
            .into_iter()
            .map(|r| sim(&r.name).sign(&r).unwrap())
            .collect(),
        );
        table.handle(me.addr, push, &[], 0);
        let (b, c_old, c_new, d, f) = (
            id("b", 2, 0),
            id("c", 3, 0),
            id("c", 3, 1),
            id("d", 4, 0),
            id("f", 6, 0),
        );
        let members = vec![
            (&b, foca::State::Suspect),
            (&c_old, foca::State::Down),
            (&c_new, foca::State::Alive),
            (&d, foca::State::Down),
            (&f, foca::State::Down),
        ];
        let views = views(&me, &table, members.into_iter());
        let states: Vec<(&str, MemberState)> =
            views.iter().map(|v| (v.name.as_str(), v.state)).collect();
        assert_eq!(
            states,
            [
                ("a", MemberState::Alive),
                ("b", MemberState::Suspect),
                ("c", MemberState::Alive),
                ("d", MemberState::Left),
                ("e", MemberState::Suspect),
                ("f", MemberState::Dead),
            ]
        );
        assert_eq!(views[1].tags["role"], "inference");
        assert_eq!(views[1].apps["inference"].as_deref(), Some("abc"));
        assert!(views[5].apps.is_empty() && views[5].version == 0);
    }
}
