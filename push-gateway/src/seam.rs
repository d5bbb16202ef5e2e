//! The per-connection, per-chat delivery cursor: which sequence is due next, what is known to
//! exist, and whether an offered event is sent, dropped or reveals a gap. Pure and synchronous,
//! so the seam between inbox replay and live delivery is tested without any I/O.

/// What to do with an event offered to a [`ChatCursor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Already sent (or acked), past the user's removal, or the chat has ended: never send.
    Drop,
    /// Exactly the sequence that was due: send it. `ends` says the chat stops here for this
    /// connection (the user's removal was just delivered).
    Send { ends: bool },
    /// Something before it is missing: do not send; catch up from PostgreSQL.
    Gap,
}

/// Delivery state of one chat on one connection.
///
/// Invariant: every sequence below `next` has been sent on this connection or was already acked
/// by the device; nothing at or above `next` has been sent. So frames leave strictly in order,
/// and nothing is sent twice on one connection.
#[derive(Debug, Clone)]
pub(crate) struct ChatCursor {
    next: u64,
    /// The highest sequence known to exist (live events seen, the stream's head, the read
    /// model's `last_sequence`): catch-up is not done before `next` passes it.
    known: u64,
    /// The sequence of the event that removes the user: delivered, and nothing after it.
    left_seq: Option<u64>,
    /// The sequence of the event that made the user a member.
    joined_seq: u64,
    /// The user was added again (at this sequence) while the removal before it was still
    /// undelivered: after delivering the removal, resume here instead of ending.
    rejoin_at: Option<u64>,
    ended: bool,
}

impl ChatCursor {
    /// A cursor for a device that holds everything up to `acked` (its effective cursor).
    pub(crate) fn new(acked: u64, joined_seq: u64, left_seq: Option<u64>) -> Self {
        Self {
            next: acked.saturating_add(1),
            known: acked,
            left_seq,
            joined_seq,
            rejoin_at: None,
            ended: left_seq.is_some_and(|l| l <= acked),
        }
    }

    pub(crate) fn next_expected(&self) -> u64 {
        self.next
    }

    /// The highest sequence this connection sent, or the device had acked before: an ack above
    /// it acknowledges something the device cannot hold.
    pub(crate) fn highest_sent(&self) -> u64 {
        self.next - 1
    }

    /// The highest sequence a catch-up query may return (the removal), if any.
    pub(crate) fn upper_bound(&self) -> Option<u64> {
        self.left_seq
    }

    #[cfg(test)]
    pub(crate) fn joined_seq(&self) -> u64 {
        self.joined_seq
    }

    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Still a member (not merely delivering a removal): live feed and typing apply.
    pub(crate) fn is_member(&self) -> bool {
        !self.ended && self.left_seq.is_none()
    }

    /// Records that `seq` exists in the chat.
    pub(crate) fn learn(&mut self, seq: u64) {
        self.known = self.known.max(seq);
    }

    /// Whether events that must be delivered are known to exist but have not been sent yet.
    pub(crate) fn behind(&self) -> bool {
        if self.ended {
            return false;
        }
        let target = match self.left_seq {
            Some(left) => left,
            None => self.known,
        };
        self.next <= target
    }

    /// Offers event `seq`; `removes_me` says it is a `participants_modified` removing this
    /// connection's user. Advances the cursor when the verdict is `Send`.
    pub(crate) fn offer(&mut self, seq: u64, removes_me: bool) -> Verdict {
        if self.ended {
            return Verdict::Drop;
        }
        self.learn(seq);
        if seq < self.next || self.left_seq.is_some_and(|left| seq > left) {
            return Verdict::Drop;
        }
        if seq > self.next {
            return Verdict::Gap;
        }
        self.next += 1;
        if removes_me || self.left_seq == Some(seq) {
            if let Some(rejoin) = self.rejoin_at.take().filter(|&r| r > seq) {
                // Removed and added back: the events in between are not the user's to see.
                self.next = rejoin;
                self.joined_seq = rejoin;
                self.left_seq = None;
                return Verdict::Send { ends: false };
            }
            self.ended = true;
            self.left_seq = Some(seq);
            return Verdict::Send { ends: true };
        }
        Verdict::Send { ends: false }
    }

    /// An event `seq` exists but cannot be rendered from the live feed (a type this build does
    /// not know): returns whether it is still due, so the projector's rendering must be fetched.
    pub(crate) fn unrenderable(&mut self, seq: u64) -> bool {
        self.learn(seq);
        self.behind()
    }

    /// The user was added (again) at `seq` while this cursor is still live. If a removal lies
    /// between, it is delivered first and delivery resumes at `seq`.
    pub(crate) fn added_at(&mut self, seq: u64) {
        self.learn(seq);
        if seq > self.joined_seq && seq >= self.next {
            self.rejoin_at = Some(self.rejoin_at.map_or(seq, |r| r.max(seq)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send() -> Verdict {
        Verdict::Send { ends: false }
    }

    #[test]
    fn events_in_order_are_sent_once_and_duplicates_dropped() {
        let mut c = ChatCursor::new(0, 1, None);
        assert_eq!(c.offer(1, false), send());
        assert_eq!(c.offer(2, false), send());
        assert_eq!(c.offer(2, false), Verdict::Drop);
        assert_eq!(c.offer(1, false), Verdict::Drop);
        assert_eq!(c.highest_sent(), 2);
        assert!(!c.behind());
    }

    #[test]
    fn a_sequence_past_the_next_one_is_a_gap_and_makes_the_cursor_behind() {
        let mut c = ChatCursor::new(4, 1, None);
        assert_eq!(c.offer(7, false), Verdict::Gap);
        assert_eq!(c.next_expected(), 5);
        assert!(c.behind());
        assert_eq!(c.offer(5, false), send());
        assert_eq!(c.offer(6, false), send());
        assert!(c.behind(), "7 is known but not sent");
        assert_eq!(c.offer(7, false), send());
        assert!(!c.behind());
    }

    #[test]
    fn the_removal_is_delivered_then_nothing_more() {
        let mut c = ChatCursor::new(2, 1, None);
        assert_eq!(c.offer(3, true), Verdict::Send { ends: true });
        assert!(c.ended());
        assert_eq!(c.offer(4, false), Verdict::Drop);
        assert!(!c.behind());
        assert_eq!(c.highest_sent(), 3);
    }

    #[test]
    fn a_known_left_seq_bounds_delivery_even_without_a_removal_flag() {
        let mut c = ChatCursor::new(1, 1, Some(3));
        assert!(c.behind());
        assert_eq!(c.offer(4, false), Verdict::Drop);
        assert_eq!(c.offer(2, false), send());
        assert_eq!(c.offer(3, false), Verdict::Send { ends: true });
        assert!(c.ended());
    }

    #[test]
    fn a_device_that_acked_its_removal_starts_ended() {
        let c = ChatCursor::new(5, 1, Some(5));
        assert!(c.ended());
        assert!(!c.behind());
    }

    #[test]
    fn added_again_before_the_removal_is_delivered_resumes_at_the_rejoin() {
        let mut c = ChatCursor::new(2, 1, None);
        c.added_at(6);
        assert!(c.behind());
        assert_eq!(c.offer(3, false), send());
        assert_eq!(
            c.offer(4, true),
            send(),
            "removal delivered, chat continues"
        );
        assert!(!c.ended());
        assert_eq!(c.offer(5, false), Verdict::Drop, "not a member at 5");
        assert_eq!(c.offer(6, false), send());
        assert_eq!(c.joined_seq(), 6);
    }

    #[test]
    fn an_unrenderable_live_event_still_due_asks_for_the_read_model() {
        let mut c = ChatCursor::new(3, 1, None);
        assert!(c.unrenderable(4));
        assert!(!c.unrenderable(2) || c.behind());
        let mut done = ChatCursor::new(9, 1, None);
        assert!(!done.unrenderable(9));
    }
}
