//! Simulated time for the mesh simulations (`membership_simulation.rs`,
//! `hoststate_simulation.rs`): one deadline-ordered queue of events.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Simulated time, shared by the mesh simulations: events come out in order of time, then of
/// scheduling; a message takes 1 to 20 ms, drawn from a seeded generator.
pub struct Clock<E> {
    pub now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, E>,
    lcg: u64,
}

impl<E> Clock<E> {
    pub fn new(seed: u64) -> Self {
        Clock {
            now_ms: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            lcg: seed,
        }
    }

    pub fn at(&mut self, at_ms: u64, event: E) {
        self.seq += 1;
        self.queue.push(Reverse((at_ms, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// A message's delivery, after 1 to 20 ms of latency.
    pub fn deliver(&mut self, event: E) {
        self.lcg = self
            .lcg
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = self.now_ms + 1 + (self.lcg >> 33) % 20;
        self.at(at, event);
    }

    /// The next event due by `limit_ms`, with the clock moved to its time.
    pub fn next(&mut self, limit_ms: u64) -> Option<E> {
        let &Reverse((at, seq)) = self.queue.peek()?;
        if at > limit_ms {
            return None;
        }
        self.queue.pop();
        self.now_ms = at;
        self.events.remove(&seq)
    }
}
