//! Which agents hold the deployment log: 1, 3 or 5 voters, chosen from the members the
//! mesh holds alive, so the log survives the loss of a minority without every agent
//! paying for consensus. Sans-IO: the leader feeds [`Voters::decide`] what it knows and
//! proposes the membership it returns (openraft's `change_membership`); the rules are
//! unit-tested here.
//!
//! The rule:
//! - **Size.** With `n` agents alive: 1 voter below 3, 3 voters below 5, 5 from 5 up. Five
//!   tolerate two failures; more would slow every commit for little.
//! - **Stability.** A voter stays a voter while the mesh holds it alive or suspect. A
//!   voter the mesh holds dead (or gone) for [`REPLACE_AFTER`] is replaced: long enough
//!   not to churn on a restart or a short partition, short enough that a second failure
//!   is unlikely meanwhile.
//! - **Choice.** New voters are the alive non-voters with the smallest Raft ids (a hash of
//!   the name): deterministic, so every leader picks the same, and spread over the fleet
//!   without regard to names.
//! - **Shrinking.** When the fleet shrinks below a size, the voters beyond it that are not
//!   alive go first, then those with the largest ids; the leader stays.
//! - **Majority kept.** One change at a time, and only while the voters alive are a
//!   majority of the current set (otherwise there is no leader to decide anything).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::log::{NodeId, node_id};

/// How long a voter may be dead before it is replaced.
pub const REPLACE_AFTER: Duration = Duration::from_secs(60);

/// What the mesh says of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Alive or suspect: counted, kept.
    Up,
    /// Dead or left.
    Down,
}

/// The voter-set decisions of one leader. Sans-IO.
#[derive(Debug, Default)]
pub struct Voters {
    /// Voters seen down, and since when.
    down_since: BTreeMap<String, Instant>,
}

/// The number of voters for `alive` agents.
pub fn size_for(alive: usize) -> usize {
    match alive {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

impl Voters {
    /// The voter set the log should have, given the current voters, the members and their
    /// liveness (every agent, this one included), and the leader's own name. `None` when
    /// nothing should change.
    pub fn decide(
        &mut self,
        now: Instant,
        current: &BTreeSet<String>,
        members: &BTreeMap<String, Liveness>,
        leader: &str,
    ) -> Option<BTreeSet<String>> {
        let up = |name: &str| members.get(name) == Some(&Liveness::Up);
        // How long each voter has been down.
        self.down_since
            .retain(|name, _| current.contains(name) && !up(name));
        for v in current.iter().filter(|v| !up(v)) {
            self.down_since.entry(v.clone()).or_insert(now);
        }
        let alive_voters = current.iter().filter(|v| up(v)).count();
        if alive_voters * 2 <= current.len() {
            return None;
        }
        let alive = members.values().filter(|l| **l == Liveness::Up).count();
        let want = size_for(alive);
        let replaceable: BTreeSet<&String> = current
            .iter()
            .filter(|v| {
                self.down_since
                    .get(*v)
                    .is_some_and(|since| now.saturating_duration_since(*since) >= REPLACE_AFTER)
            })
            .collect();
        let mut next: BTreeSet<String> = current
            .iter()
            .filter(|v| !replaceable.contains(v))
            .cloned()
            .collect();
        // Grow (or replace) with the alive non-voters of smallest id.
        let mut candidates: Vec<&String> = members
            .iter()
            .filter(|(name, l)| **l == Liveness::Up && !current.contains(*name))
            .map(|(name, _)| name)
            .collect();
        candidates.sort_by_key(|name| (node_id(name), (*name).clone()));
        let mut candidates = candidates.into_iter();
        while next.len() < want {
            match candidates.next() {
                Some(c) => {
                    next.insert(c.clone());
                }
                None => break,
            }
        }
        // Shrink: voters down first, then the largest ids; never the leader.
        while next.len() > want {
            let drop = next
                .iter()
                .filter(|v| v.as_str() != leader)
                .max_by_key(|v| (!up(v), node_id(v)))
                .cloned();
            match drop {
                Some(d) => {
                    next.remove(&d);
                }
                None => break,
            }
        }
        // One change at a time: at most one voter in and one out per decision keeps every
        // step's majorities overlapping (openraft's joint consensus does the rest).
        let added: Vec<&String> = next.difference(current).collect();
        let removed: Vec<&String> = current.difference(&next).collect();
        if added.is_empty() && removed.is_empty() {
            return None;
        }
        let mut step = current.clone();
        if let Some(a) = added.first() {
            step.insert((*a).clone());
        }
        if let Some(r) = removed.first() {
            step.remove(*r);
        }
        Some(step)
    }

    /// The Raft ids of a voter set.
    pub fn ids(voters: &BTreeSet<String>) -> BTreeSet<NodeId> {
        voters.iter().map(|v| node_id(v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(up: &[&str], down: &[&str]) -> BTreeMap<String, Liveness> {
        up.iter()
            .map(|n| (n.to_string(), Liveness::Up))
            .chain(down.iter().map(|n| (n.to_string(), Liveness::Down)))
            .collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Applies decisions until none is left, as a leader would over time.
    fn settle(
        v: &mut Voters,
        now: Instant,
        mut current: BTreeSet<String>,
        m: &BTreeMap<String, Liveness>,
        leader: &str,
    ) -> BTreeSet<String> {
        for _ in 0..20 {
            match v.decide(now, &current, m, leader) {
                Some(next) => {
                    let changed = next.symmetric_difference(&current).count();
                    assert!(
                        changed <= 2,
                        "one in, one out at most: {current:?} -> {next:?}"
                    );
                    current = next;
                }
                None => return current,
            }
        }
        panic!("no fixed point: {current:?}");
    }

    #[test]
    fn sizes_follow_the_fleet() {
        assert_eq!([1, 2, 3, 4, 5, 6, 100].map(size_for), [1, 1, 3, 3, 5, 5, 5]);
    }

    #[test]
    fn a_growing_fleet_gets_three_then_five_voters() {
        let mut v = Voters::default();
        let now = Instant::now();
        let names: Vec<String> = (1..=8).map(|i| format!("edge-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let three = settle(
            &mut v,
            now,
            set(&["edge-1"]),
            &members(&refs[..3], &[]),
            "edge-1",
        );
        assert_eq!(three.len(), 3);
        let five = settle(&mut v, now, three.clone(), &members(&refs, &[]), "edge-1");
        assert_eq!(five.len(), 5);
        assert!(three.is_subset(&five), "voters stay voters");
        // The same inputs give the same choice (any leader decides alike).
        let again = settle(
            &mut Voters::default(),
            now,
            three,
            &members(&refs, &[]),
            "edge-1",
        );
        assert_eq!(again, five);
    }

    #[test]
    fn a_dead_voter_is_replaced_only_after_a_while() {
        let mut v = Voters::default();
        let t0 = Instant::now();
        let voters = set(&["a", "b", "c"]);
        let m = members(&["a", "b", "d", "e"], &["c"]);
        // Four alive: three voters; c is down but not for long.
        assert_eq!(v.decide(t0, &voters, &m, "a"), None);
        assert_eq!(v.decide(t0 + REPLACE_AFTER / 2, &voters, &m, "a"), None);
        let next = settle(&mut v, t0 + REPLACE_AFTER, voters, &m, "a");
        assert_eq!(next.len(), 3);
        assert!(!next.contains("c"));
        assert!(next.contains("a") && next.contains("b"));
    }

    #[test]
    fn a_voter_back_before_the_deadline_stays() {
        let mut v = Voters::default();
        let t0 = Instant::now();
        let voters = set(&["a", "b", "c"]);
        assert_eq!(
            v.decide(t0, &voters, &members(&["a", "b", "d"], &["c"]), "a"),
            None
        );
        let back = members(&["a", "b", "c", "d"], &[]);
        assert_eq!(v.decide(t0 + REPLACE_AFTER / 2, &voters, &back, "a"), None);
        // Down again later: the clock starts over.
        let down = members(&["a", "b", "d"], &["c"]);
        assert_eq!(v.decide(t0 + REPLACE_AFTER, &voters, &down, "a"), None);
    }

    #[test]
    fn a_shrinking_fleet_drops_down_voters_first_and_never_the_leader() {
        let mut v = Voters::default();
        let t0 = Instant::now();
        let voters = set(&["a", "b", "c", "d", "e"]);
        // Two agents left for good: five alive would still be 5; three alive means 3.
        let m = members(&["a", "b", "c"], &["d", "e"]);
        let next = settle(&mut v, t0 + REPLACE_AFTER, voters, &m, "c");
        assert_eq!(next, set(&["a", "b", "c"]));
    }

    #[test]
    fn no_decision_without_a_majority_of_voters_alive() {
        let mut v = Voters::default();
        let t0 = Instant::now();
        let voters = set(&["a", "b", "c"]);
        let m = members(&["a", "x", "y", "z"], &["b", "c"]);
        assert_eq!(v.decide(t0 + REPLACE_AFTER * 2, &voters, &m, "a"), None);
    }
}
