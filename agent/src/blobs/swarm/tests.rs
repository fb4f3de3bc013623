//! The swarm's decisions, driven by hand: no network, no clock but the one passed in.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::*;

fn chunks(n: u8) -> Vec<(ChunkId, u32)> {
    let mut all: Vec<(ChunkId, u32)> = (0..n)
        .map(|i| {
            let mut id = [0u8; 32];
            id[0] = i;
            id[1] = 0xab;
            (ChunkId(id), 1000 + u32::from(i))
        })
        .collect();
    all.sort();
    all
}

fn small() -> Config {
    Config {
        batch: 2,
        pipeline: 2,
        origin_pipeline: 1,
        ..Config::default()
    }
}

/// Takes every action the swarm has now.
fn drain(s: &mut Swarm, now: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = s.poll_action(now) {
        out.push(a);
    }
    out
}

fn fetches(actions: &[Action]) -> Vec<(u64, String, Vec<ChunkId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch {
                batch,
                peer,
                chunks,
            } => Some((*batch, peer.clone(), chunks.iter().map(|c| c.0).collect())),
            Action::AskHave { .. } => None,
        })
        .collect()
}

/// Answers a batch whole: every chunk stored.
fn give(s: &mut Swarm, now: Instant, batch: u64, ids: &[ChunkId]) {
    for id in ids {
        s.handle_chunk(now, batch, id, Got::Stored);
    }
    s.handle_batch_end(now, batch, Ended::Done);
}

#[test]
fn holders_are_asked_before_the_origin_and_every_chunk_once() {
    let now = Instant::now();
    let all = chunks(8);
    let mut s = Swarm::new("me", all.clone(), |_| false, small());
    s.add_peer(now, "origin", Role::Origin);
    s.add_peer(now, "h1", Role::Holder);
    s.add_peer(now, "h2", Role::Holder);
    let first = fetches(&drain(&mut s, now));
    // Two holders, two batches each, two chunks a batch: all 8 chunks, none from the origin.
    assert_eq!(first.len(), 4, "{first:?}");
    assert!(first.iter().all(|(_, p, _)| p != "origin"), "{first:?}");
    let asked: HashSet<ChunkId> = first.iter().flat_map(|(_, _, c)| c.clone()).collect();
    assert_eq!(asked.len(), 8, "each chunk asked once");
    for (batch, _, ids) in &first {
        give(&mut s, now, *batch, ids);
    }
    assert!(s.is_done());
    assert_eq!(s.progress(), (all.iter().map(|c| u64::from(c.1)).sum(), 0));
    assert!(s.poll_action(now).is_none());
}

#[test]
fn chunks_already_stored_are_not_asked_for() {
    let now = Instant::now();
    let all = chunks(6);
    let stored: HashSet<ChunkId> = all[..4].iter().map(|c| c.0).collect();
    let mut s = Swarm::new("me", all.clone(), |id| stored.contains(id), small());
    s.add_peer(now, "h1", Role::Holder);
    let asked: Vec<ChunkId> = fetches(&drain(&mut s, now))
        .into_iter()
        .flat_map(|(_, _, c)| c)
        .collect();
    assert_eq!(asked, vec![all[4].0, all[5].0]);
}

#[test]
fn the_origin_gives_only_what_no_other_peer_holds() {
    let now = Instant::now();
    let all = chunks(4);
    let mut s = Swarm::new("me", all.clone(), |_| false, small());
    s.add_peer(now, "origin", Role::Origin);
    s.add_peer(now, "f1", Role::Fetcher);
    let ask = drain(&mut s, now);
    assert!(
        ask.contains(&Action::AskHave { peer: "f1".into() }),
        "a fetcher is asked what it holds first: {ask:?}"
    );
    // f1 holds chunks 0 and 1.
    s.handle_have(now, "f1", Some(vec![true, true, false, false]));
    let asked = fetches(&ask)
        .into_iter()
        .chain(fetches(&drain(&mut s, now)))
        .collect::<Vec<_>>();
    for (_, peer, ids) in &asked {
        for id in ids {
            let i = all.iter().position(|c| c.0 == *id).unwrap();
            if peer == "origin" {
                assert!(i >= 2, "the origin was asked for chunk {i}, which f1 holds");
            } else {
                assert!(i < 2, "f1 was asked for chunk {i}, which it lacks");
            }
        }
    }
    assert!(asked.iter().any(|(_, p, _)| p == "origin"));
    assert!(asked.iter().any(|(_, p, _)| p == "f1"));
}

#[test]
fn fetchers_that_start_together_take_different_parts_from_the_origin() {
    let now = Instant::now();
    let all: Vec<(ChunkId, u32)> = (0..=255u8)
        .map(|i| {
            let mut id = [0u8; 32];
            id[0] = i;
            id[8] = i.wrapping_mul(37);
            id[9] = i;
            (ChunkId(id), 100)
        })
        .collect();
    let first_batch = |me: &str, fetchers: &[String]| {
        let mut s = Swarm::new(
            me,
            all.clone(),
            |_| false,
            Config {
                batch: 8,
                origin_batch: 8,
                ..small()
            },
        );
        s.set_fetchers(fetchers);
        s.add_peer(now, "origin", Role::Origin);
        let f = fetches(&drain(&mut s, now));
        assert_eq!(f.len(), 1, "one request to the origin at a time");
        f[0].2.iter().copied().collect::<HashSet<_>>()
    };
    // By their turns.
    let together = ["a".to_string(), "b".into(), "c".into()];
    let (a, b, c) = (
        first_batch("a", &together),
        first_batch("b", &together),
        first_batch("c", &together),
    );
    assert!(a.is_disjoint(&b) && b.is_disjoint(&c) && a.is_disjoint(&c));
    // Knowing of no other fetcher yet: by their salts.
    let (a, b) = (first_batch("host-a", &[]), first_batch("host-b", &[]));
    assert_eq!(a.len(), 8);
    assert!(a.is_disjoint(&b), "{a:?} {b:?}");
}

#[test]
fn the_origins_window_is_shared_by_the_fetchers_it_serves() {
    let t0 = Instant::now();
    let all = chunks(200);
    let c = Config::default();
    // A fetch with `fetchers` fetchers (f0 and peers f1..), `dropped` of the peers found
    // to lie, the others holding nothing yet; what f0 asks the origin at once, as
    // (chunks per request, requests), while patient, and then once the patience is over.
    let asks = |fetchers: usize, dropped: usize| {
        let mut s = Swarm::new("f0", all.clone(), |_| false, Config::default());
        let names: Vec<String> = (0..fetchers).map(|i| format!("f{i}")).collect();
        s.set_fetchers(&names);
        for (i, name) in names.iter().enumerate().skip(1) {
            s.add_peer(t0, name, Role::Fetcher);
            // A list of the wrong length drops the peer.
            let bits = if i <= dropped {
                vec![false; 3]
            } else {
                vec![false; all.len()]
            };
            s.handle_have(t0, name, Some(bits));
        }
        s.add_peer(t0, "origin", Role::Origin);
        let shape = |f: &[(u64, String, Vec<ChunkId>)]| {
            assert!(f.iter().all(|(_, p, _)| p == "origin"), "{f:?}");
            let most = f.iter().map(|(_, _, ids)| ids.len()).max().unwrap_or(0);
            (most, f.len())
        };
        let patient = shape(&fetches(&drain(&mut s, t0)));
        let end = t0 + c.patience;
        s.handle_timeout(end);
        let impatient = shape(&fetches(&drain(&mut s, end)));
        (patient, impatient)
    };
    let most = (c.origin_batch, c.origin_pipeline);
    // Few fetchers: the most per fetcher (4 chunks a request, 2 requests).
    assert_eq!(asks(1, 0).0, most);
    assert_eq!(asks(4, 0).0, most);
    // 8 fetchers: 32 / 8 = 4 chunks each, in 2 requests of 2.
    assert_eq!(asks(8, 0).0, (2, 2));
    // 16: 2 chunks each, in one request; never less, however many.
    assert_eq!(asks(16, 0).0, (2, 1));
    assert_eq!(asks(40, 0).0, (2, 1));
    // Fetchers dropped take no share: 16 named, 12 dropped, as 4.
    assert_eq!(asks(16, 12).0, most);
    assert_eq!(asks(16, 8).0, (2, 2));
    // Once impatient (nothing stored for a while: nobody else brings anything), the most,
    // in the 2 requests the pipeline allows (the first one still in flight).
    let (_, impatient) = asks(16, 0);
    assert_eq!(impatient, (c.origin_batch, 1));
}

#[test]
fn a_peer_that_sends_a_corrupt_chunk_is_dropped_and_its_chunks_asked_elsewhere() {
    let now = Instant::now();
    let all = chunks(4);
    let mut s = Swarm::new(
        "me",
        all.clone(),
        |_| false,
        Config {
            pipeline: 1,
            ..small()
        },
    );
    s.add_peer(now, "liar", Role::Holder);
    s.add_peer(now, "honest", Role::Holder);
    let first = fetches(&drain(&mut s, now));
    let (liar_batch, _, liar_ids) = first.iter().find(|(_, p, _)| p == "liar").unwrap().clone();
    let (honest_batch, _, honest_ids) = first
        .iter()
        .find(|(_, p, _)| p == "honest")
        .unwrap()
        .clone();
    s.handle_chunk(now, liar_batch, &liar_ids[0], Got::Corrupt);
    assert_eq!(s.dropped().len(), 1);
    assert_eq!(s.dropped()[0].0, "liar");
    // Its batch is over; the honest peer's ends, and the liar's chunks go to it.
    give(&mut s, now, honest_batch, &honest_ids);
    let next = fetches(&drain(&mut s, now));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1, "honest");
    assert_eq!(next[0].2, liar_ids);
    // Whatever the liar says later is not taken for its batch.
    s.handle_batch_end(now, liar_batch, Ended::Done);
    give(&mut s, now, next[0].0, &next[0].2);
    assert!(s.is_done());
    assert_eq!(s.bytes_from().keys().collect::<Vec<_>>(), vec!["honest"]);
}

#[test]
fn a_late_batch_is_asked_again_elsewhere_and_a_peer_late_three_times_is_dropped() {
    let t0 = Instant::now();
    let all = chunks(2);
    let config = Config {
        batch: 2,
        pipeline: 1,
        ..small()
    };
    let mut s = Swarm::new("me", all.clone(), |_| false, config);
    s.add_peer(t0, "slow", Role::Holder);
    let first = fetches(&drain(&mut s, t0));
    assert_eq!(first.len(), 1);
    // The batch's deadline: 5 s and its bytes at the slowest rate allowed.
    let late = Config::default().batch_base + Duration::from_millis(100);
    assert!(s.poll_timeout().is_some());
    let mut now = t0 + late;
    for round in 1..=3 {
        s.handle_timeout(now);
        if round < 3 {
            assert!(s.dropped().is_empty(), "round {round}");
            let again = fetches(&drain(&mut s, now));
            assert_eq!(again.len(), 1, "re-asked after a miss");
            now += late;
        }
    }
    assert_eq!(s.dropped().len(), 1, "three misses drop the peer");
    assert!(s.is_stuck());
    // A new holder appears: the chunks are asked of it.
    s.add_peer(now, "fast", Role::Holder);
    let next = fetches(&drain(&mut s, now));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1, "fast");
    assert!(!s.is_stuck());
}

#[test]
fn in_the_end_game_chunks_in_flight_are_asked_of_an_idle_peer_too() {
    let now = Instant::now();
    let all = chunks(2);
    let config = Config {
        batch: 2,
        pipeline: 1,
        ..small()
    };
    let mut s = Swarm::new("me", all.clone(), |_| false, config);
    s.add_peer(now, "slow", Role::Holder);
    let first = fetches(&drain(&mut s, now));
    assert_eq!(first.len(), 1);
    s.add_peer(now, "fast", Role::Holder);
    let second = fetches(&drain(&mut s, now));
    assert_eq!(second.len(), 1, "the idle peer gets the same chunks");
    assert_eq!(second[0].1, "fast");
    assert_eq!(second[0].2, first[0].2);
    give(&mut s, now, second[0].0, &second[0].2);
    assert!(s.is_done());
    // The slow answer comes after: nothing changes, nothing more is asked.
    give(&mut s, now, first[0].0, &first[0].2);
    assert!(s.is_done());
    assert!(s.poll_action(now).is_none());
}

#[test]
fn a_holder_that_lacks_chunks_is_not_asked_for_them_again_and_the_origin_gives_them() {
    let now = Instant::now();
    let all = chunks(4);
    let mut s = Swarm::new(
        "me",
        all.clone(),
        |_| false,
        Config {
            batch: 4,
            origin_batch: 4,
            ..small()
        },
    );
    s.add_peer(now, "origin", Role::Origin);
    s.add_peer(now, "h", Role::Holder);
    let f = fetches(&drain(&mut s, now));
    assert_eq!(f.len(), 1, "the holder first, the origin waits: {f:?}");
    assert_eq!(f[0].1, "h");
    // It has none of them after all (an older agent, its manifest dropped).
    for id in &f[0].2 {
        s.handle_chunk(now, f[0].0, id, Got::Missing);
    }
    s.handle_batch_end(now, f[0].0, Ended::Done);
    // Gossip says again that it holds the revision: it is not believed over its answers.
    s.add_peer(now, "h", Role::Holder);
    let next = fetches(&drain(&mut s, now));
    assert!(next.iter().all(|(_, p, _)| p == "origin"), "{next:?}");
    let mut pending = next;
    let mut later = now;
    while !s.is_done() {
        assert!(!pending.is_empty(), "stalled");
        for (batch, peer, ids) in pending.drain(..) {
            assert_eq!(peer, "origin");
            give(&mut s, later, batch, &ids);
        }
        later += Duration::from_millis(10);
        pending = fetches(&drain(&mut s, later));
        assert!(
            later < now + Duration::from_secs(5),
            "the fetch did not end"
        );
    }
    assert!(s.dropped().is_empty(), "lacking chunks is not lying");
}

#[test]
fn a_busy_peer_is_left_alone_a_moment_and_not_held_against_it() {
    let t0 = Instant::now();
    let all = chunks(2);
    let config = Config {
        batch: 2,
        pipeline: 1,
        ..small()
    };
    let mut s = Swarm::new("me", all, |_| false, config.clone());
    s.add_peer(t0, "h", Role::Holder);
    for round in 0..5 {
        let now = t0 + config.busy_rest * (round * 2);
        let f = fetches(&drain(&mut s, now));
        assert_eq!(f.len(), 1, "round {round}");
        s.handle_batch_end(now, f[0].0, Ended::Busy);
        assert!(
            fetches(&drain(&mut s, now)).is_empty(),
            "resting after a busy answer"
        );
    }
    assert!(s.dropped().is_empty(), "busy five times, still a source");
    // A holder that answers `Missing` to `Have` holds nothing; a `Have` of another
    // revision's length drops a fetcher.
    s.add_peer(t0, "f", Role::Fetcher);
    s.handle_have(t0, "f", Some(vec![true; 5]));
    assert_eq!(s.dropped().len(), 1);
}

#[test]
fn fetchers_are_asked_again_what_they_hold() {
    let t0 = Instant::now();
    let all = chunks(2);
    let mut s = Swarm::new("me", all, |_| false, small());
    s.add_peer(t0, "f", Role::Fetcher);
    assert_eq!(
        drain(&mut s, t0),
        vec![Action::AskHave { peer: "f".into() }]
    );
    s.handle_have(t0, "f", None);
    assert!(drain(&mut s, t0).is_empty(), "it holds nothing yet");
    let due = s.poll_timeout().unwrap();
    assert_eq!(due, t0 + Config::default().have_every);
    s.handle_timeout(due);
    assert_eq!(
        drain(&mut s, due),
        vec![Action::AskHave { peer: "f".into() }]
    );
    // It finished: a holder now.
    s.add_peer(due, "f", Role::Holder);
    s.handle_have(due, "f", Some(vec![true, true]));
    assert_eq!(fetches(&drain(&mut s, due)).len(), 1);
}

#[test]
fn the_origin_gives_this_fetchers_turn_then_the_next_ones_from_its_other_end_then_any() {
    let t0 = Instant::now();
    // 17 chunks in each fetcher's part: batches of 4 leave one alone at the end of it.
    let all: Vec<(ChunkId, u32)> = (0..51u8)
        .map(|i| {
            let mut id = [0u8; 32];
            id[0] = i;
            id[8] = i;
            (ChunkId(id), 100)
        })
        .collect();
    let config = Config {
        origin_batch: 4,
        origin_pipeline: 1,
        ..small()
    };
    let fetchers: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
    let swarm = |me: &str| {
        let mut s = Swarm::new(me, all.clone(), |_| false, config.clone());
        s.set_fetchers(&fetchers);
        s.add_peer(t0, "origin", Role::Origin);
        s
    };
    // Three fetchers: "a" has the chunks whose first byte is 0 mod 3, "b" 1 mod 3, "c" 2.
    let part = |id: &ChunkId| id.0[0] % 3;
    // One request at a time; each answered whole at once, so the fetcher stays patient.
    let next = |s: &mut Swarm, now: Instant| -> Option<Vec<ChunkId>> {
        let f = fetches(&drain(s, now));
        assert!(f.len() <= 1, "one request to the origin at a time");
        let (batch, _, ids) = f.into_iter().next()?;
        give(s, now, batch, &ids);
        Some(ids)
    };
    let asked = |s: &mut Swarm| {
        let mut parts = Vec::new();
        while let Some(ids) = next(s, t0) {
            let p: HashSet<u8> = ids.iter().map(part).collect();
            assert_eq!(p.len(), 1, "a batch of one part: {ids:?}");
            parts.push((*p.iter().next().unwrap(), ids));
        }
        parts
    };
    let mut a = swarm("a");
    let parts = asked(&mut a);
    // Its own part first, then the next fetcher's ("b"), from its other end, but not the
    // first 8 (two of its shares of the origin, 2 × origin_batch × origin_pipeline here:
    // what "b" may have asked and not yet said it holds); while patient, never the
    // third's ("c"'s).
    let order: Vec<u8> = parts.iter().map(|(p, _)| *p).collect();
    assert_eq!(order, [&[0; 5][..], &[1; 3]].concat(), "{parts:?}");
    let of_b: Vec<ChunkId> = all
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| part(id) == 1)
        .collect();
    let first_help = &parts[5].1;
    assert!(
        first_help.contains(of_b.last().unwrap()),
        "not from the other end: {first_help:?}"
    );
    let helped: HashSet<ChunkId> = parts[5..].iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(
        helped,
        of_b[8..].iter().copied().collect(),
        "the helper left b's front to b"
    );
    assert!(fetches(&drain(&mut a, t0 + config.patience / 2)).is_empty());
    // "b" takes its part from the front: the two first batches are apart.
    let mut b = swarm("b");
    let first_of_b = fetches(&drain(&mut b, t0))[0].2.clone();
    assert!(first_of_b.contains(&of_b[0]), "{first_of_b:?}");
    assert!(
        first_help.iter().all(|id| !first_of_b.contains(id)),
        "a helper took b's first chunks: {first_help:?} and {first_of_b:?}"
    );
    // The last fetcher helps the first: the turns are a ring.
    let order: Vec<u8> = asked(&mut swarm("c")).iter().map(|(p, _)| *p).collect();
    assert_eq!(order, [&[2; 5][..], &[0; 3]].concat());
    // Nothing stored for longer than the patience: the origin is asked for the rest, the
    // front of the next part first, then the third's.
    let mut late = t0;
    let mut rest = Vec::new();
    while !a.is_done() {
        late += config.patience * 2;
        rest.push(next(&mut a, late).expect("the rest, at last"));
    }
    let rest: Vec<u8> = rest.iter().map(|ids| part(&ids[0])).collect();
    assert_eq!(rest, [&[1; 2][..], &[2; 5]].concat());
}

#[test]
fn the_patience_ends_once_and_then_wakes_nothing_until_a_chunk_comes() {
    let t0 = Instant::now();
    let config = small();
    let all = chunks(4);
    let mut s = Swarm::new("me", all.clone(), |_| false, config.clone());
    s.add_peer(t0, "origin", Role::Origin);
    s.add_peer(t0, "f", Role::Fetcher);
    // f never says what it holds: the origin waits out the patience.
    assert!(fetches(&drain(&mut s, t0)).is_empty());
    let end = t0 + config.patience;
    assert_eq!(s.poll_timeout(), Some(end));
    s.handle_timeout(end);
    let asked = fetches(&drain(&mut s, end));
    assert_eq!(
        asked.len(),
        1,
        "the origin, once patience is over: {asked:?}"
    );
    // Nothing comes: the next wake is the batch's deadline, not the past end of the
    // patience (which would wake the driver again at once, for ever).
    let next = s.poll_timeout().expect("the batch's deadline");
    assert!(next > end, "a wake in the past: {next:?}");
    s.handle_timeout(next - Duration::from_millis(1));
    assert_eq!(s.poll_timeout(), Some(next));
    // A chunk stored: the patience runs again from it.
    let (batch, _, ids) = &asked[0];
    let at = end + Duration::from_millis(10);
    s.handle_chunk(at, *batch, &ids[0], Got::Stored);
    assert_eq!(s.poll_timeout(), Some(at + config.patience));
}

/// A fetch of 4 chunks with two fetchers, "f1" and "f2", both asked what they hold.
fn two_fetchers(now: Instant) -> (Swarm, Vec<(ChunkId, u32)>) {
    let all = chunks(4);
    let mut s = Swarm::new("me", all.clone(), |_| false, small());
    s.add_peer(now, "f1", Role::Fetcher);
    s.add_peer(now, "f2", Role::Fetcher);
    assert_eq!(drain(&mut s, now).len(), 2, "both asked what they hold");
    (s, all)
}

#[test]
fn a_peer_whose_list_is_not_this_revisions_is_dropped_and_what_it_was_asked_goes_back() {
    let now = Instant::now();
    let (mut s, all) = two_fetchers(now);
    s.handle_have(now, "f1", Some(vec![true, true, false, false]));
    let first = fetches(&drain(&mut s, now));
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, "f1");
    // Its next list has 7 chunks: not this revision's.
    s.handle_have(now, "f1", Some(vec![true; 7]));
    assert_eq!(s.dropped()[0].0, "f1");
    // f2 holds everything: it is asked for every chunk, f1's two among them, at once.
    s.handle_have(now, "f2", Some(vec![true; 4]));
    let asked: HashSet<ChunkId> = fetches(&drain(&mut s, now))
        .into_iter()
        .inspect(|(_, peer, _)| assert_eq!(peer, "f2"))
        .flat_map(|(_, _, ids)| ids)
        .collect();
    assert_eq!(asked, all.iter().map(|(id, _)| *id).collect());
}

#[test]
fn a_chunk_in_flight_is_asked_again_only_in_the_end_game_and_only_of_an_idle_peer() {
    let now = Instant::now();
    let (mut s, all) = two_fetchers(now);
    s.handle_have(now, "f1", Some(vec![true, true, false, false]));
    s.handle_have(now, "f2", Some(vec![true, true, false, false]));
    let first = fetches(&drain(&mut s, now));
    // Chunks 2 and 3 are not asked of anyone yet: f2 is not asked for what f1 brings.
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].2, vec![all[0].0, all[1].0]);
    let other = if first[0].1 == "f1" { "f2" } else { "f1" };
    s.handle_have(now, other, Some(vec![true; 4]));
    let second = fetches(&drain(&mut s, now));
    // Every chunk is asked now (the end game), but both peers are busy.
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].1, other);
    assert_eq!(second[0].2, vec![all[2].0, all[3].0]);
    give(&mut s, now, second[0].0, &second[0].2);
    // Idle again: it is asked for what the other still has in flight.
    let third = fetches(&drain(&mut s, now));
    assert_eq!(third.len(), 1, "{third:?}");
    assert_eq!((third[0].1.as_str(), &third[0].2), (other, &first[0].2));
    assert!(drain(&mut s, now).is_empty());
}

#[test]
fn what_is_asked_of_peers_follows_the_recent_rate_and_does_not_hold_back_the_origin() {
    let t0 = Instant::now();
    let all = chunks(20);
    let config = Config {
        batch: 1,
        pipeline: 16,
        origin_batch: 4,
        min_in_flight_bytes: 2500,
        in_flight_time: Duration::from_secs(1),
        ..small()
    };
    let mut s = Swarm::new("me", all.clone(), |_| false, config);
    s.add_peer(t0, "origin", Role::Origin);
    s.add_peer(t0, "f1", Role::Fetcher);
    drain(&mut s, t0);
    // f1 holds the first 12 chunks; only the origin holds the other 8.
    s.handle_have(t0, "f1", Some((0..20).map(|i| i < 12).collect()));
    let count = |f: &[(u64, String, Vec<ChunkId>)], peer: &str| {
        f.iter().filter(|(_, p, _)| p == peer).count()
    };
    let first = fetches(&drain(&mut s, t0));
    // About 1,000 bytes a chunk: 2,500 bytes allow three requests of one chunk of f1.
    assert_eq!(count(&first, "f1"), 3, "{first:?}");
    assert_eq!(
        count(&first, "origin"),
        1,
        "the origin's request is not held back"
    );
    // Seven chunks stored within the second: 7,057 bytes may be asked now, so eight
    // requests (the last goes over).
    let t1 = t0 + Duration::from_millis(100);
    for (batch, _, ids) in &first {
        give(&mut s, t1, *batch, ids);
    }
    let second = fetches(&drain(&mut s, t1));
    assert_eq!(count(&second, "f1"), 8, "{second:?}");
    // Over a second later, only what came since counts: the least again, 2,500 bytes.
    let t2 = t1 + Duration::from_millis(1500);
    give(&mut s, t2, second[0].0, &second[0].2);
    let in_flight: Vec<_> = second[1..].iter().filter(|(_, p, _)| p == "f1").collect();
    assert_eq!(in_flight.len(), 7);
    assert!(
        count(&fetches(&drain(&mut s, t2)), "f1") == 0,
        "7 requests still out"
    );
    for (batch, _, ids) in &in_flight[..5] {
        give(&mut s, t2, *batch, ids);
    }
    // Six chunks stored just now: about 6,000 bytes; two requests out, the last chunk
    // f1 holds is asked.
    let third = fetches(&drain(&mut s, t2));
    assert_eq!(count(&third, "f1"), 1, "the last f1 holds: {third:?}");
}

#[test]
fn a_batch_whose_chunks_keep_coming_is_slow_not_late_up_to_a_point() {
    let t0 = Instant::now();
    let all = chunks(4);
    let config = Config {
        batch: 4,
        pipeline: 1,
        stretch: 3,
        ..small()
    };
    let due = |bytes: u64| Swarm::due(&config, bytes);
    let mut s = Swarm::new("me", all.clone(), |_| false, config.clone());
    s.add_peer(t0, "origin", Role::Origin);
    let first = fetches(&drain(&mut s, t0));
    assert_eq!(first.len(), 1);
    let batch = first[0].0;
    let whole: u64 = all.iter().map(|c| u64::from(c.1)).sum();
    // A chunk just before each deadline: past the first deadline, and not late.
    let mut now = t0;
    let mut left = whole;
    let mut step = |s: &mut Swarm, now: &mut Instant, i: usize| {
        *now += due(left) - Duration::from_millis(10);
        s.handle_timeout(*now);
        s.handle_chunk(*now, batch, &all[i].0, Got::Stored);
        left -= u64::from(all[i].1);
    };
    step(&mut s, &mut now, 0);
    step(&mut s, &mut now, 1);
    assert!(now > t0 + due(whole));
    s.handle_timeout(now);
    assert!(s.dropped().is_empty());
    assert!(
        fetches(&drain(&mut s, now)).is_empty(),
        "the batch is still on its way"
    );
    // A third chunk in time too; but a batch takes three times its first deadline at most,
    // however its chunks trickle in.
    step(&mut s, &mut now, 2);
    let latest = t0 + due(whole) * 3;
    assert!(now < latest && now + due(u64::from(all[3].1)) > latest);
    let before = latest - Duration::from_millis(1);
    s.handle_timeout(before);
    assert!(fetches(&drain(&mut s, before)).is_empty());
    s.handle_timeout(latest);
    let again = fetches(&drain(&mut s, latest));
    assert_eq!(again.len(), 1, "the last chunk asked again");
    assert_eq!(again[0].2, vec![all[3].0]);
}

#[test]
fn an_origin_late_three_times_is_left_alone_a_moment_not_dropped() {
    let t0 = Instant::now();
    let all = chunks(2);
    let config = Config {
        origin_batch: 2,
        ..small()
    };
    let mut s = Swarm::new("me", all.clone(), |_| false, config.clone());
    s.add_peer(t0, "origin", Role::Origin);
    let mut now = t0;
    for round in 1..=3 {
        let asked = fetches(&drain(&mut s, now));
        assert_eq!(asked.len(), 1, "round {round}: asked again after a miss");
        now += Swarm::due(&config, 2001) + Duration::from_millis(1);
        s.handle_timeout(now);
    }
    assert!(s.dropped().is_empty(), "the origin is not dropped");
    assert!(!s.is_stuck());
    // Left alone a moment, then asked again.
    assert!(fetches(&drain(&mut s, now)).is_empty());
    let later = now + config.origin_rest;
    assert!(s.poll_timeout().is_some_and(|t| t <= later));
    s.handle_timeout(later);
    let again = fetches(&drain(&mut s, later));
    assert_eq!(again.len(), 1);
    give(&mut s, later, again[0].0, &again[0].2);
    assert!(s.is_done());
}
