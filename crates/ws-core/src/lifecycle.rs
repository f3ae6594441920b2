//! The lifecycle of one tunnel, as the proxy sees it: the time directives' deadlines (idle,
//! lifetime, proxy pings, drain), the proxy's own close handshake, when an end of stream must
//! wait, and why the tunnel ended.
//!
//! Pure: the clock comes in as `now` (milliseconds), the state of the two directions'
//! close frames as a [`Handshake`]; what must happen comes out as a [`Tick`] or a
//! [`CloseOrder`]. The nginx glue owns the timer, the flows and the connections, and does what
//! it is told.

use crate::flow::Violation;
use crate::record::{End, From};

/// Milliseconds (nginx's `ngx_msec_t` clock).
pub type Msec = u64;

/// Payload prefix of the proxy's own Pings.
pub const PING_PREFIX: &str = "ngx-ws-ping-";

/// While the proxy waits for a blocked peer to take its Close, it retries this often.
pub const RETRY_MSEC: Msec = 100;

/// The time directives in force for a tunnel (milliseconds, 0 = off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timers {
    pub idle: Msec,
    pub lifetime: Msec,
    pub ping: Msec,
    pub pong: Msec,
    pub close: Msec,
    pub drain: Msec,
}

/// Where the close frames stand, read off the two directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The proxy's Close to the client is completely written.
    pub to_client_written: bool,
    /// The proxy's Close to the upstream is completely written.
    pub to_upstream_written: bool,
    /// The client sent its Close (completely forwarded or consumed).
    pub client_closed: bool,
    /// The upstream sent its Close.
    pub upstream_closed: bool,
    /// The proxy has bytes of its own waiting in some direction.
    pub pending: bool,
}

impl Handshake {
    /// Both Close frames went out and both peers answered with theirs.
    pub fn done(&self) -> bool {
        self.to_client_written
            && self.to_upstream_written
            && self.client_closed
            && self.upstream_closed
    }
}

/// The proxy closes the tunnel: the Close frame each peer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseOrder {
    pub to_client: (u16, &'static str),
    pub to_upstream: (u16, &'static str),
}

/// What the tunnel's timer must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Nothing is due: set the timer to [`Lifecycle::next_deadline`].
    Wait,
    /// Send this Ping to the client (and consume the Pong that answers it).
    Ping(Vec<u8>),
    /// Begin closing: send these Close frames at the next frame boundaries.
    Close(CloseOrder),
    /// Closing: write what is pending, then wait again.
    Flush,
    /// End the tunnel now; `answered` is false when the close handshake did not complete
    /// within `ws_close_timeout`.
    End { answered: bool },
}

/// The proxy is closing the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    pub since: Msec,
    pub end: End,
    /// The code and reason the close record and `$ws_close_*` show.
    pub code: u16,
    pub reason: &'static str,
}

/// What nginx says about the connections when the tunnel ends, for the end cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndFacts {
    /// nginx ended it as an upstream timeout (504, or a timed-out upstream event).
    pub upstream_timeout: bool,
    /// nginx ended it as a client timeout (408).
    pub client_timeout: bool,
    pub upstream_gone: bool,
    pub client_gone: bool,
}

/// One tunnel's deadlines and close state.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    timers: Timers,
    start: Msec,
    last_data: Msec,
    last_client_rx: Msec,
    ping_sent: Option<Msec>,
    ping_seq: u32,
    closing: Option<Closing>,
    drain_at: Option<Msec>,
    first_close: Option<From>,
    /// A rate limit holds back a message from the client (bit 0) or the upstream (bit 1).
    held: u8,
}

impl Lifecycle {
    pub fn new(timers: Timers, now: Msec) -> Lifecycle {
        Lifecycle {
            timers,
            start: now,
            last_data: now,
            last_client_rx: now,
            ping_sent: None,
            ping_seq: 0,
            closing: None,
            drain_at: None,
            first_close: None,
            held: 0,
        }
    }

    pub fn timers(&self) -> Timers {
        self.timers
    }

    pub fn start(&self) -> Msec {
        self.start
    }

    /// The proxy's own close, once begun.
    pub fn closing(&self) -> Option<Closing> {
        self.closing
    }

    /// The first peer that sent a Close, if one did.
    pub fn first_close(&self) -> Option<From> {
        self.first_close
    }

    /// Whether the proxy itself ever writes in this tunnel (Pings, Closes) because of time.
    pub fn timed(&self) -> bool {
        let t = self.timers;
        t.idle > 0 || t.lifetime > 0 || t.ping > 0 || t.drain > 0
    }

    /// The client's bytes went through: it is alive (pings wait again).
    pub fn client_bytes(&mut self, now: Msec) {
        self.last_client_rx = now;
        self.ping_sent = None;
    }

    /// A data frame passed in either direction (the idle timeout starts again).
    pub fn data(&mut self, now: Msec) {
        self.last_data = now;
    }

    /// A rate limit holds back (`held`) or releases a message from `from`.
    ///
    /// A held message is activity: a sender that waits for the proxy is neither idle nor
    /// silent. While a direction is held the idle timeout does not run (and, for the client,
    /// neither do pings and the pong timeout: its Pong would queue behind the held message);
    /// on release both start again from `now`.
    pub fn holding(&mut self, from: From, held: bool, now: Msec) {
        let bit = if from == From::Client { 1 } else { 2 };
        if held {
            self.held |= bit;
        } else if self.held & bit != 0 {
            self.held &= !bit;
            self.last_data = now;
            if from == From::Client {
                self.client_bytes(now);
            }
        }
    }

    /// The Pong answering the proxy's Ping came.
    pub fn pong(&mut self) {
        self.ping_sent = None;
    }

    /// A peer's Close passed.
    pub fn peer_closed(&mut self, from: From) {
        if self.first_close.is_none() {
            self.first_close = Some(from);
        }
    }

    /// The worker begins to shut down: the tunnel closes with 1012 `spread` milliseconds from
    /// now (a random share of `ws_drain`). Returns whether a deadline was set.
    pub fn drain_soon(&mut self, now: Msec, random: u64) -> bool {
        if self.drain_at.is_some() || self.timers.drain == 0 {
            return false;
        }
        self.drain_at = Some(now + random % self.timers.drain);
        true
    }

    /// The proxy closes the tunnel for `end` with one code for both peers.
    pub fn begin_close(
        &mut self,
        now: Msec,
        end: End,
        code: u16,
        reason: &'static str,
    ) -> Option<CloseOrder> {
        self.close_both(now, end, (code, reason), (code, reason), (code, reason))
    }

    /// A peer sent a frame the policy refused: the sender gets 1009/1002/1007, the other 1001.
    pub fn refused(&mut self, now: Msec, from: From, v: Violation) -> Option<CloseOrder> {
        let end = match v {
            Violation::TooBig => End::TooBig,
            Violation::Protocol(_) | Violation::Invalid => End::ProtocolError,
            Violation::RateLimited => End::RateLimited,
        };
        let (sender, peer) = (v.sender_close(), v.peer_close());
        match from {
            From::Client => self.close_both(now, end, sender, peer, sender),
            _ => self.close_both(now, end, peer, sender, sender),
        }
    }

    fn close_both(
        &mut self,
        now: Msec,
        end: End,
        to_client: (u16, &'static str),
        to_upstream: (u16, &'static str),
        recorded: (u16, &'static str),
    ) -> Option<CloseOrder> {
        if self.closing.is_some() {
            return None;
        }
        self.closing = Some(Closing {
            since: now,
            end,
            code: recorded.0,
            reason: recorded.1,
        });
        Some(CloseOrder {
            to_client,
            to_upstream,
        })
    }

    /// When the timer must fire next, if ever.
    pub fn next_deadline(&self, now: Msec, hs: &Handshake) -> Option<Msec> {
        let mut next: Option<Msec> = None;
        let mut at = |d: Msec| next = Some(next.map_or(d, |n| n.min(d)));
        let t = self.timers;
        if let Some(c) = self.closing {
            at(c.since + t.close);
            if hs.pending {
                at(now + RETRY_MSEC);
            }
        } else {
            if t.idle > 0 && self.held == 0 {
                at(self.last_data + t.idle);
            }
            if t.lifetime > 0 {
                at(self.start + t.lifetime);
            }
            if t.ping > 0 && self.held & 1 == 0 {
                match self.ping_sent {
                    Some(s) => at(s + t.pong),
                    None => at(self.last_client_rx + t.ping),
                }
            }
            if let Some(d) = self.drain_at {
                at(d);
            }
        }
        next
    }

    /// The timer fired at `now`: what is due. Lifetime first, then idle, drain, pings.
    pub fn on_tick(&mut self, now: Msec, hs: &Handshake) -> Tick {
        let t = self.timers;
        if let Some(c) = self.closing {
            if hs.done() || now.wrapping_sub(c.since) >= t.close {
                return Tick::End {
                    answered: hs.done(),
                };
            }
            return Tick::Flush;
        }
        let order = if t.lifetime > 0 && now.wrapping_sub(self.start) >= t.lifetime {
            self.begin_close(now, End::MaxLifetime, 1001, "max lifetime")
        } else if t.idle > 0 && self.held == 0 && now.wrapping_sub(self.last_data) >= t.idle {
            self.begin_close(now, End::IdleTimeout, 1001, "idle timeout")
        } else if self.drain_at.is_some_and(|d| now >= d) {
            self.begin_close(now, End::Drain, 1012, "service restart")
        } else if t.ping > 0 && self.held & 1 == 0 {
            match self.ping_sent {
                Some(s) if now.wrapping_sub(s) >= t.pong => {
                    self.begin_close(now, End::PingTimeout, 1001, "ping timeout")
                }
                None if now.wrapping_sub(self.last_client_rx) >= t.ping => {
                    self.ping_seq = self.ping_seq.wrapping_add(1);
                    self.ping_sent = Some(now);
                    return Tick::Ping(format!("{PING_PREFIX}{}", self.ping_seq).into_bytes());
                }
                _ => None,
            }
        } else {
            None
        };
        order.map_or(Tick::Wait, Tick::Close)
    }

    /// Whether an end of stream from `from` must wait: the proxy is closing and the other
    /// peer, still connected, has not answered its Close yet.
    pub fn hold_eof(&self, from: From, hs: &Handshake) -> bool {
        if self.closing.is_none() || hs.done() {
            return false;
        }
        match from {
            // The client left: wait for the upstream's reply.
            From::Client => !hs.upstream_closed,
            _ => !hs.client_closed,
        }
    }

    /// Why the tunnel ended, and who closed it.
    pub fn end(&self, f: EndFacts) -> (End, From) {
        if let Some(c) = self.closing {
            (c.end, From::Proxy)
        } else if let Some(first) = self.first_close {
            (End::Normal, first)
        } else if f.upstream_timeout {
            (End::UpstreamTimeout, From::Proxy)
        } else if f.client_timeout {
            (End::Error, From::Proxy)
        } else if f.upstream_gone {
            (End::UpstreamAbort, From::Upstream)
        } else if f.client_gone {
            (End::ClientAbort, From::Client)
        } else {
            (End::Error, From::Proxy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Rule;
    use proptest::prelude::*;

    fn timers() -> Timers {
        Timers {
            idle: 1000,
            lifetime: 10_000,
            ping: 300,
            pong: 200,
            close: 500,
            drain: 0,
        }
    }

    fn answered() -> Handshake {
        Handshake {
            to_client_written: true,
            to_upstream_written: true,
            client_closed: true,
            upstream_closed: true,
            pending: false,
        }
    }

    #[test]
    fn pings_then_ping_timeout() {
        let mut l = Lifecycle::new(timers(), 0);
        let hs = Handshake::default();
        assert_eq!(l.next_deadline(0, &hs), Some(300));
        assert_eq!(l.on_tick(299, &hs), Tick::Wait);
        assert_eq!(l.on_tick(300, &hs), Tick::Ping(b"ngx-ws-ping-1".to_vec()));
        assert_eq!(l.next_deadline(300, &hs), Some(500));
        // No answer: closed with 1001 "ping timeout".
        let Tick::Close(o) = l.on_tick(500, &hs) else {
            panic!("no close")
        };
        assert_eq!(o.to_client, (1001, "ping timeout"));
        assert_eq!(l.closing().map(|c| c.end), Some(End::PingTimeout));
        assert_eq!(l.next_deadline(500, &hs), Some(1000));
        assert_eq!(l.on_tick(999, &hs), Tick::Flush);
        assert_eq!(l.on_tick(1000, &hs), Tick::End { answered: false });
    }

    #[test]
    fn a_live_client_is_not_pinged_and_pongs_count() {
        let mut l = Lifecycle::new(timers(), 0);
        let hs = Handshake::default();
        l.client_bytes(250);
        assert_eq!(l.next_deadline(250, &hs), Some(550));
        assert_eq!(l.on_tick(550, &hs), Tick::Ping(b"ngx-ws-ping-1".to_vec()));
        // The Pong arrives (its bytes are the client's too).
        l.pong();
        l.client_bytes(560);
        assert_eq!(l.next_deadline(560, &hs), Some(860));
        assert_eq!(l.on_tick(860, &hs), Tick::Ping(b"ngx-ws-ping-2".to_vec()));
    }

    #[test]
    fn idle_ignores_everything_but_data() {
        let t = Timers {
            idle: 1000,
            ..Timers::default()
        };
        let mut l = Lifecycle::new(t, 0);
        let hs = Handshake::default();
        l.client_bytes(900);
        l.pong();
        assert_eq!(l.next_deadline(900, &hs), Some(1000));
        l.data(900);
        assert_eq!(l.next_deadline(900, &hs), Some(1900));
        assert!(matches!(l.on_tick(1900, &hs), Tick::Close(_)));
        assert_eq!(l.end(EndFacts::default()), (End::IdleTimeout, From::Proxy));
    }

    #[test]
    fn a_held_message_is_activity() {
        let t = Timers {
            idle: 1000,
            ping: 300,
            pong: 200,
            lifetime: 5000,
            ..Timers::default()
        };
        let mut l = Lifecycle::new(t, 0);
        let hs = Handshake::default();
        l.holding(From::Client, true, 100);
        // Neither idle nor pings while the client waits for the proxy; the lifetime still runs.
        assert_eq!(l.next_deadline(100, &hs), Some(5000));
        assert_eq!(l.on_tick(2000, &hs), Tick::Wait);
        l.holding(From::Client, false, 2500);
        assert_eq!(l.next_deadline(2500, &hs), Some(2800));
        // An upstream hold stops only the idle timeout.
        l.holding(From::Upstream, true, 2500);
        assert_eq!(l.on_tick(2800, &hs), Tick::Ping(b"ngx-ws-ping-1".to_vec()));
        assert_eq!(l.next_deadline(2800, &hs), Some(3000));
        l.holding(From::Upstream, false, 2900);
        l.client_bytes(2950);
        assert_eq!(l.next_deadline(2950, &hs), Some(3250));
        assert!(matches!(l.on_tick(5000, &hs), Tick::Close(_)));
        assert_eq!(l.end(EndFacts::default()).0, End::MaxLifetime);
    }

    #[test]
    fn lifetime_wins_over_idle_and_close_happens_once() {
        let t = Timers {
            idle: 100,
            lifetime: 100,
            close: 50,
            ..Timers::default()
        };
        let mut l = Lifecycle::new(t, 0);
        let hs = Handshake::default();
        let Tick::Close(o) = l.on_tick(100, &hs) else {
            panic!()
        };
        assert_eq!(o.to_upstream, (1001, "max lifetime"));
        assert_eq!(
            l.begin_close(120, End::Drain, 1012, "service restart"),
            None
        );
        assert_eq!(l.on_tick(120, &answered()), Tick::End { answered: true });
    }

    #[test]
    fn refusals_close_the_sender_with_its_code() {
        let mut l = Lifecycle::new(Timers::default(), 0);
        let o = l.refused(5, From::Upstream, Violation::TooBig).unwrap();
        assert_eq!(o.to_upstream, (1009, "message too big"));
        assert_eq!(o.to_client, (1001, "message too big"));
        let c = l.closing().unwrap();
        assert_eq!((c.end, c.code), (End::TooBig, 1009));
        let mut l = Lifecycle::new(Timers::default(), 0);
        let o = l
            .refused(5, From::Client, Violation::Protocol(Rule::Masking))
            .unwrap();
        assert_eq!(o.to_client, (1002, "protocol error"));
        assert_eq!(
            l.end(EndFacts::default()),
            (End::ProtocolError, From::Proxy)
        );
    }

    #[test]
    fn eof_waits_only_for_an_unanswered_close() {
        let mut l = Lifecycle::new(Timers::default(), 0);
        let mut hs = Handshake::default();
        assert!(!l.hold_eof(From::Client, &hs));
        l.begin_close(0, End::Drain, 1012, "service restart");
        assert!(l.hold_eof(From::Client, &hs));
        hs.upstream_closed = true;
        assert!(!l.hold_eof(From::Client, &hs));
        assert!(l.hold_eof(From::Upstream, &hs));
        assert!(!l.hold_eof(From::Upstream, &answered()));
    }

    #[test]
    fn drain_is_spread_and_set_once() {
        let t = Timers {
            drain: 1000,
            ..Timers::default()
        };
        let mut l = Lifecycle::new(t, 0);
        let hs = Handshake::default();
        assert_eq!(l.next_deadline(0, &hs), None);
        assert!(l.drain_soon(10, 1234));
        assert!(!l.drain_soon(20, 0));
        assert_eq!(l.next_deadline(20, &hs), Some(10 + 234));
        let Tick::Close(o) = l.on_tick(244, &hs) else {
            panic!()
        };
        assert_eq!(o.to_client, (1012, "service restart"));
    }

    #[test]
    fn end_causes_in_order() {
        let l = Lifecycle::new(Timers::default(), 0);
        let f = |upstream_timeout, client_timeout, upstream_gone, client_gone| EndFacts {
            upstream_timeout,
            client_timeout,
            upstream_gone,
            client_gone,
        };
        assert_eq!(l.end(f(true, false, true, true)).0, End::UpstreamTimeout);
        assert_eq!(l.end(f(false, true, true, true)), (End::Error, From::Proxy));
        assert_eq!(l.end(f(false, false, true, true)).0, End::UpstreamAbort);
        assert_eq!(l.end(f(false, false, false, true)).0, End::ClientAbort);
        assert_eq!(l.end(f(false, false, false, false)).0, End::Error);
        let mut l = l;
        l.peer_closed(From::Upstream);
        l.peer_closed(From::Client);
        assert_eq!(
            l.end(f(true, false, true, true)),
            (End::Normal, From::Upstream)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u16),
        Data,
        ClientBytes,
        Pong,
        Tick,
        Answer,
        Refuse,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u16..2000).prop_map(Op::Advance),
            Just(Op::Data),
            Just(Op::ClientBytes),
            Just(Op::Pong),
            Just(Op::Tick),
            Just(Op::Answer),
            Just(Op::Refuse),
        ]
    }

    proptest! {
        /// Whatever happens, a deadline is never in the past of the last event that set it,
        /// the proxy asks to close at most once, pings stop once it closes, and a closing
        /// tunnel ends by `ws_close_timeout` after the close began.
        #[test]
        fn timers_and_closing_hold_their_promises(
            ops in proptest::collection::vec(op(), 1..60),
            idle in 0u64..3000, lifetime in 0u64..5000, ping in 0u64..800,
            pong in 1u64..500, close in 1u64..1000,
        ) {
            let t = Timers { idle, lifetime, ping, pong, close, drain: 0 };
            let mut l = Lifecycle::new(t, 1000);
            let mut now = 1000;
            let mut hs = Handshake::default();
            let mut closes = 0;
            let mut ended = false;
            for op in ops {
                if ended {
                    break;
                }
                match op {
                    Op::Advance(d) => now += u64::from(d),
                    Op::Data => l.data(now),
                    Op::ClientBytes => l.client_bytes(now),
                    Op::Pong => l.pong(),
                    Op::Answer => hs = answered(),
                    Op::Refuse => {
                        if l.refused(now, From::Client, Violation::TooBig).is_some() {
                            closes += 1;
                        }
                    }
                    Op::Tick => {
                        let was_closing = l.closing();
                        match l.on_tick(now, &hs) {
                            Tick::Close(_) => closes += 1,
                            Tick::Ping(_) => prop_assert!(was_closing.is_none()),
                            Tick::End { answered } => {
                                let c = was_closing.expect("end without closing");
                                prop_assert!(answered || now - c.since >= close);
                                ended = true;
                            }
                            Tick::Flush => {
                                let c = was_closing.expect("flush without closing");
                                prop_assert!(now - c.since < close && !hs.done());
                            }
                            Tick::Wait => {
                                if let Some(d) = l.next_deadline(now, &hs) {
                                    prop_assert!(d > now, "due at {d}, now {now}, not acted on");
                                }
                            }
                        }
                    }
                }
                prop_assert!(closes <= 1);
                if let Some(c) = l.closing() {
                    prop_assert_eq!(l.next_deadline(now, &hs).map(|d| d <= c.since + close), Some(true));
                }
            }
        }
    }
}
