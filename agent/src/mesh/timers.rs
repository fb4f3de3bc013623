//! One deadline-ordered timer queue per node, in the manner of foca's example `TimerQueue`:
//! timers go in with the instant they are due, come out in order of that instant (then of
//! insertion), and the driver sleeps once, until the earliest. No task per timer, so their
//! order is what was asked for, and a stopped node leaves no sleeping task behind.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Timers of type `T`, ordered by deadline.
pub struct TimerQueue<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

struct Entry<T> {
    at: Instant,
    seq: u64,
    timer: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> TimerQueue<T> {
    /// Schedules `timer` for `at`.
    pub fn push(&mut self, at: Instant, timer: T) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            timer,
        }));
    }

    /// The earliest deadline, if any timer is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// The earliest timer due at or before `now`, taken out of the queue, with the deadline
    /// it was due at (how late it fires says how busy the caller is).
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, T)> {
        if self.next_deadline()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| (e.at, e.timer))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timers_come_out_by_deadline_then_by_insertion() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = TimerQueue::default();
        q.push(ms(30), "c");
        q.push(ms(10), "a");
        q.push(ms(30), "d");
        q.push(ms(20), "b");
        assert_eq!(q.next_deadline(), Some(ms(10)));
        assert_eq!(q.pop_due(ms(5)), None, "nothing is due yet");
        let mut due = Vec::new();
        while let Some((_, t)) = q.pop_due(ms(30)) {
            due.push(t);
        }
        assert_eq!(due, ["a", "b", "c", "d"]);
        assert!(q.is_empty() && q.next_deadline().is_none());
    }
}
