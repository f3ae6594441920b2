//! One direction of a tunnel as the proxy shapes it: forwards the peer's bytes, injects its own
//! frames (Close, Ping) only at frame boundaries, consumes Pongs that answer its own Pings, and
//! swallows everything after it has sent Close.
//!
//! Pure Rust. [`Flow::send`] stands in for nginx's `send(c, buf, size)`: it is given the bytes
//! nginx wants written and a [`Sink`] (the connection's original `send`), and says how many of
//! nginx's bytes it consumed. Everything it writes on its own (injected frames, held bytes) lives
//! in its own buffers, and a write that returned "again" is always retried first with the same
//! bytes, as `SSL_write` requires.

use crate::frame::{encode_header, peek_header, unmask, FrameHeader, Opcode};
use crate::lifecycle::Msec;
use crate::observe::{Capture, Direction, Inflate, Observed, Verdict, Whole};

/// Compressed frames up to this size on the wire are held whole and inflated before they are
/// forwarded when the proxy judges what they inflate to (`ws_max_inflated_size`, or invalid
/// data under `ws_protocol_check`); larger ones are judged as they pass.
pub const INFLATE_HOLD_MAX: u64 = 16 * 1024;

/// A hold buffer that grew past this (a held compressed frame) is freed once released.
const HELD_KEEP: usize = 4096;

/// Result of one write to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Done(usize),
    Again,
    Error,
}

/// Where bytes go: the connection's original `send`.
pub trait Sink {
    fn write(&mut self, data: &[u8]) -> Write;
}

/// What [`Flow::send`] tells nginx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// This many of nginx's bytes are dealt with (written, consumed or swallowed).
    Consumed(usize),
    Again,
    Error,
}

/// Frame policy: size limits and RFC 6455 checks, judged on each frame's header before any
/// byte of the frame is forwarded.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Largest frame payload (0: no limit).
    pub max_frame: u64,
    /// Largest message, summed over its fragments (0: no limit).
    pub max_message: u64,
    /// Enforce RFC 6455 framing.
    pub protocol_check: bool,
    /// Frames in this direction must be masked (client to server), or must not be.
    pub expect_masked: bool,
    /// RSV bits (RSV1 = 4, RSV2 = 2, RSV3 = 1) that negotiated extensions allow on the first
    /// frame of a message.
    pub rsv_allowed: u8,
    /// Largest uncompressed message (0: no limit): compressed messages are judged by what
    /// they inflate to (see [`Capture::inflate`]), the others by their size.
    pub max_inflated: u64,
}

impl Policy {
    fn active(&self) -> bool {
        self.max_frame > 0 || self.max_message > 0 || self.protocol_check || self.max_inflated > 0
    }

    /// Judges a frame header against the policy, given whether a message is in progress and
    /// the size the frame adds to (see [`Direction::counted`]).
    pub fn check(&self, h: &FrameHeader, in_message: bool, counted: u64) -> Option<Violation> {
        if self.protocol_check {
            let rsv = (u8::from(h.rsv1) << 2) | (u8::from(h.rsv2) << 1) | u8::from(h.rsv3);
            let allowed = match h.opcode {
                Opcode::Text | Opcode::Binary => self.rsv_allowed,
                _ => 0,
            };
            let broken = if rsv & !allowed != 0 {
                Some(Rule::ReservedBits)
            } else if matches!(h.opcode, Opcode::Reserved(_)) {
                Some(Rule::ReservedOpcode)
            } else if h.opcode.is_control() && h.len > 125 {
                Some(Rule::ControlTooLong)
            } else if h.opcode.is_control() && !h.fin {
                Some(Rule::ControlFragmented)
            } else if h.opcode == Opcode::Continuation && !in_message {
                Some(Rule::OrphanContinuation)
            } else if matches!(h.opcode, Opcode::Text | Opcode::Binary) && in_message {
                Some(Rule::InterruptedMessage)
            } else if h.opcode == Opcode::Close && h.len == 1 {
                Some(Rule::CloseOneByte)
            } else if !h.length_encoding_valid() {
                Some(Rule::LengthEncoding)
            } else if h.mask.is_some() != self.expect_masked {
                Some(Rule::Masking)
            } else {
                None
            };
            if let Some(rule) = broken {
                return Some(Violation::Protocol(rule));
            }
        }
        if self.max_frame > 0 && h.len > self.max_frame {
            return Some(Violation::TooBig);
        }
        if self.max_message > 0
            && h.opcode.is_data()
            && counted.saturating_add(h.len) > self.max_message
        {
            return Some(Violation::TooBig);
        }
        None
    }
}

/// A frame the policy refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Over `ws_max_frame_size` or `ws_max_message_size`: Close 1009 to the sender.
    TooBig,
    /// Broke an RFC 6455 framing rule: Close 1002 to the sender.
    Protocol(Rule),
    /// Compressed data that does not inflate (`ws_protocol_check`): Close 1007 to the sender.
    Invalid,
    /// A data message over a `ws_limit ... nodelay`: Close 1008 to the sender.
    RateLimited,
}

/// The RFC 6455 framing rules `ws_protocol_check` enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// An RSV bit that no negotiated extension defines (5.2).
    ReservedBits,
    /// A reserved opcode (5.2).
    ReservedOpcode,
    /// A control frame with more than 125 bytes of payload (5.5).
    ControlTooLong,
    /// A fragmented control frame (5.5).
    ControlFragmented,
    /// A continuation frame with no message to continue (5.4).
    OrphanContinuation,
    /// A new text or binary frame inside an unfinished message (5.4).
    InterruptedMessage,
    /// A Close frame with a 1-byte payload (5.5.1).
    CloseOneByte,
    /// A length not in the minimal encoding, or a 64-bit length with the top bit set (5.2).
    LengthEncoding,
    /// A client frame without a mask, or a server frame with one (5.1).
    Masking,
}

impl Rule {
    pub const ALL: [Rule; 9] = [
        Rule::ReservedBits,
        Rule::ReservedOpcode,
        Rule::ControlTooLong,
        Rule::ControlFragmented,
        Rule::OrphanContinuation,
        Rule::InterruptedMessage,
        Rule::CloseOneByte,
        Rule::LengthEncoding,
        Rule::Masking,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ReservedBits => "reserved_bits",
            Rule::ReservedOpcode => "reserved_opcode",
            Rule::ControlTooLong => "control_too_long",
            Rule::ControlFragmented => "control_fragmented",
            Rule::OrphanContinuation => "orphan_continuation",
            Rule::InterruptedMessage => "interrupted_message",
            Rule::CloseOneByte => "close_one_byte",
            Rule::LengthEncoding => "length_encoding",
            Rule::Masking => "masking",
        }
    }

    /// For the error log.
    pub fn describe(self) -> &'static str {
        match self {
            Rule::ReservedBits => "an RSV bit no extension defines (RFC 6455 5.2)",
            Rule::ReservedOpcode => "a reserved opcode (RFC 6455 5.2)",
            Rule::ControlTooLong => "a control frame over 125 bytes (RFC 6455 5.5)",
            Rule::ControlFragmented => "a fragmented control frame (RFC 6455 5.5)",
            Rule::OrphanContinuation => "a continuation with no message (RFC 6455 5.4)",
            Rule::InterruptedMessage => "a new message inside an unfinished one (RFC 6455 5.4)",
            Rule::CloseOneByte => "a close frame with a 1-byte payload (RFC 6455 5.5.1)",
            Rule::LengthEncoding => "a non-minimal or out-of-range length (RFC 6455 5.2)",
            Rule::Masking => "a frame masked the wrong way for its direction (RFC 6455 5.1)",
        }
    }

    /// Position in [`Rule::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl Violation {
    /// The Close the sender gets.
    pub fn sender_close(self) -> (u16, &'static str) {
        match self {
            Violation::TooBig => (1009, "message too big"),
            Violation::Protocol(_) => (1002, "protocol error"),
            Violation::Invalid => (1007, "invalid payload data"),
            Violation::RateLimited => (1008, "rate limit"),
        }
    }

    /// The Close the other peer gets.
    pub fn peer_close(self) -> (u16, &'static str) {
        match self {
            Violation::TooBig => (1001, "message too big"),
            Violation::Protocol(_) => (1001, "protocol error"),
            Violation::Invalid => (1001, "invalid payload data"),
            Violation::RateLimited => (1001, "rate limit"),
        }
    }
}

/// A rate limit's say about the data messages of a direction (`ws_limit`, see
/// [`crate::limit`]): asked once for each message, when its first frame is next.
pub trait Admit {
    fn admit(&mut self) -> Admission;
}

/// What [`Admit::admit`] decided about a data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Forward it now.
    Pass,
    /// Forward nothing from its first frame on until [`Flow::release`] at this time.
    Hold(Msec),
    /// Refuse it: it is not forwarded, the direction gets its Close there.
    Refuse,
}

/// No limit: every message passes.
pub struct Unlimited;

impl Admit for Unlimited {
    fn admit(&mut self) -> Admission {
        Admission::Pass
    }
}

/// A limited direction's message accounting (boxed in the flow: most tunnels have no limit,
/// and the flow is in every tunnel twice).
#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    /// Messages (numbered like [`Direction::starts`]) that have their verdict.
    asked: u64,
    /// A message that must not pass yet, or at all: its number and what was decided.
    pending: Option<(u64, Admission)>,
}

/// What the gate lets through at a boundary.
enum Scan {
    /// This many bytes: everything before the next message that must wait.
    Go(usize),
    /// The message at the boundary waits.
    Hold,
    /// The message at the boundary is refused.
    Refuse,
}

/// Whether a frame whose first byte is `b0` begins a data message (Text or Binary).
fn begins_message(b0: u8) -> bool {
    matches!(b0 & 0x0f, 1 | 2)
}

/// Something the flow did, for records and counters.
#[derive(Debug)]
pub enum Event<'a> {
    /// A peer frame or message passed (or was consumed: see `PongConsumed`).
    Peer(Observed<'a>),
    /// A frame the proxy injected was completely written.
    Proxy {
        opcode: Opcode,
        len: u64,
        masked: bool,
        code: Option<u16>,
        reason: Option<&'static str>,
    },
    /// A Pong answering the proxy's Ping was consumed, not forwarded.
    PongConsumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Inject,
    Held,
    /// nginx's bytes; the retry must write at least this many.
    Peer(usize),
}

#[derive(Debug, Clone, Copy)]
struct Injected {
    opcode: Opcode,
    len: u64,
    masked: bool,
    code: Option<u16>,
    reason: Option<&'static str>,
}

/// What the proxy writes on its own and what it holds back to judge. Most tunnels never inject
/// or hold, so a flow allocates this only when it first does.
#[derive(Debug, Default)]
struct Own {
    inject: Vec<u8>,
    inject_off: usize,
    injected: Vec<(usize, Injected)>,
    held: Vec<u8>,
    held_off: usize,
    /// Held bytes are decided: they go out (true) after `inject`.
    held_release: bool,
    /// A Close to inject at the next boundary.
    close_request: Option<(u16, &'static str, Option<[u8; 4]>)>,
    /// A Ping payload to inject at the next boundary.
    ping_request: Option<(Vec<u8>, Option<[u8; 4]>)>,
    /// A Pong with this payload answers the proxy's Ping: consume it.
    watch_pong: Option<Vec<u8>>,
}

impl Own {
    /// Nothing pending, held or requested.
    fn quiet(&self) -> bool {
        self.inject.is_empty()
            && self.held.is_empty()
            && self.close_request.is_none()
            && self.ping_request.is_none()
    }

    fn has_pending(&self) -> bool {
        self.inject_off < self.inject.len()
            || (self.held_release && self.held_off < self.held.len())
    }

    fn requested(&self) -> bool {
        self.close_request.is_some() || self.ping_request.is_some()
    }

    /// A held frame start still waits for its verdict.
    fn deciding(&self) -> bool {
        !self.held.is_empty() && !self.held_release
    }

    fn report_injected<F: FnMut(Event<'_>)>(&mut self, close_written: &mut bool, on: &mut F) {
        while let Some(&(end, f)) = self.injected.first() {
            if self.inject_off < end {
                break;
            }
            self.injected.remove(0);
            if f.opcode == Opcode::Close {
                *close_written = true;
            }
            on(Event::Proxy {
                opcode: f.opcode,
                len: f.len,
                masked: f.masked,
                code: f.code,
                reason: f.reason,
            });
        }
    }

    fn push_frame(
        &mut self,
        opcode: Opcode,
        payload: &[u8],
        mask: Option<[u8; 4]>,
        code: Option<u16>,
        reason: Option<&'static str>,
    ) {
        let h = FrameHeader::single(opcode, mask, payload.len() as u64);
        let (hdr, n) = encode_header(&h);
        self.inject.extend_from_slice(&hdr[..n]);
        let start = self.inject.len();
        self.inject.extend_from_slice(payload);
        if let Some(m) = mask {
            unmask(&mut self.inject[start..], m, 0);
        }
        self.injected.push((
            self.inject.len(),
            Injected {
                opcode,
                len: payload.len() as u64,
                masked: mask.is_some(),
                code,
                reason,
            },
        ));
    }
}

/// The proxy's shaping of one direction.
#[derive(Debug, Default)]
pub struct Flow {
    /// The peer's frames, as they came in.
    pub obs: Direction,
    capture: Capture,
    /// Injection and hold state; `None` until the flow first injects or holds.
    own: Option<Box<Own>>,
    retry: Option<Src>,
    /// The proxy queued its Close: all further input is swallowed.
    pub closed: bool,
    /// The proxy's Close is completely written.
    pub close_written: bool,
    policy: Policy,
    /// The frame the policy refused; the proxy then closes this direction with the peer's
    /// code and the tunnel closes the other.
    pub violation: Option<Violation>,
    /// Mask state for injected frames (client to server frames are masked); 0: unmasked.
    mask_state: u32,
    /// Rate limits on this direction's messages, when limited.
    gate: Option<Box<Gate>>,
}

impl Flow {
    /// A flow; `mask_seed` (non-zero) masks the frames the proxy injects.
    pub fn new(capture: Capture, policy: Policy, mask_seed: u32) -> Flow {
        Flow {
            capture,
            policy,
            mask_state: mask_seed,
            ..Flow::default()
        }
    }

    /// Observes bytes that nginx's own `send` wrote, in a tunnel where the proxy never writes
    /// a frame of its own: every frame and message is reported as [`Flow::send`] reports it,
    /// without the shaping (nothing to inject, hold or judge).
    pub fn observe_sent<F: FnMut(Event<'_>)>(&mut self, data: &[u8], mut on: F) {
        self.obs.feed(data, self.capture, |o| on(Event::Peer(o)));
    }

    /// [`Direction::whole_message`] for bytes nginx's own `send` wrote, observed with this
    /// flow's capture (`report`, as [`Flow::observe_sent`]) or counted only (as
    /// [`Direction::count`]): `None` when the bytes must go to one of those.
    #[inline(always)]
    pub fn observe_whole<'a>(&'a mut self, data: &'a [u8], report: bool) -> Option<Whole<'a>> {
        let cap = if report {
            self.capture
        } else {
            Capture::default()
        };
        self.obs.whole_message(data, cap, report)
    }

    fn next_mask(&mut self) -> Option<[u8; 4]> {
        if self.mask_state == 0 {
            return None;
        }
        // xorshift32: masks differ frame to frame; the seed comes from nginx's random().
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        Some(x.to_ne_bytes())
    }

    /// Whether frames are judged (policy or an awaited Pong) before they are forwarded.
    fn judging(&self) -> bool {
        self.policy.active() || self.watching_pong() || self.capture.inflate.limit() > 0
    }

    /// Whether compressed frames are inflated before they are forwarded, to be judged.
    fn inflate_judged(&self) -> bool {
        self.capture.inflate.limit() > 0 || self.policy.protocol_check
    }

    /// What the proxy does about what inflation found.
    fn verdict_violation(&self, v: Verdict) -> Option<Violation> {
        match v {
            Verdict::TooBig => Some(Violation::TooBig),
            Verdict::Corrupt => self.policy.protocol_check.then_some(Violation::Invalid),
        }
    }

    /// The whole frame `frame`, at the boundary, is inflated before it is forwarded (when it
    /// belongs to a compressed message the proxy judges); says what the policy makes of it.
    fn judge_inflated(&mut self, frame: &[u8]) -> Option<Violation> {
        if !self.inflate_judged() {
            return None;
        }
        let v = self.obs.inflate_ahead(frame, self.capture)?;
        self.verdict_violation(v)
    }

    /// Inflation judged a frame that has (partly) passed: at a boundary, the direction closes
    /// as for a refused frame. Inside a frame no Close can go in: a message past the inflated
    /// size stops there (the rest is swallowed, the peer gets no Close, the tunnel's close
    /// timeout ends it); invalid data gets its Close at the next boundary, ordered by the
    /// tunnel.
    fn judge_passed(&mut self) {
        let Some(v) = self.obs.take_verdict() else {
            return;
        };
        let Some(v) = self.verdict_violation(v) else {
            return;
        };
        if self.closed || self.violation.is_some() {
            return;
        }
        if self.at_boundary() {
            self.refuse(v);
        } else {
            self.violation = Some(v);
            if v == Violation::TooBig {
                self.closed = true;
            }
        }
    }

    /// From now on a Pong with this payload answers the proxy's Ping: it is consumed.
    pub fn watch_pong(&mut self, payload: Vec<u8>) {
        self.own_mut().watch_pong = Some(payload);
    }

    /// Whether a Pong answering the proxy's Ping is still awaited.
    pub fn watching_pong(&self) -> bool {
        self.own.as_deref().is_some_and(|o| o.watch_pong.is_some())
    }

    fn pong_seen(&mut self) {
        if let Some(o) = self.own.as_deref_mut() {
            o.watch_pong = None;
        }
    }

    /// The injection and hold state, allocated on first use.
    fn own_mut(&mut self) -> &mut Own {
        self.own.get_or_insert_with(Box::default)
    }

    /// Nothing pending, held, requested, judged or limited: peer bytes just pass.
    fn idle(&self) -> bool {
        self.retry.is_none()
            && !self.closed
            && self.own.as_deref().is_none_or(Own::quiet)
            && !self.judging()
            && self.gate.is_none()
    }

    /// Idle but for the message limits.
    fn idle_but_limited(&self) -> bool {
        self.retry.is_none()
            && !self.closed
            && self.own.as_deref().is_none_or(Own::quiet)
            && !self.judging()
    }

    /// Writes nginx's bytes in one write and observes what was written.
    fn write_through<S: Sink, F: FnMut(Event<'_>)>(
        &mut self,
        buf: &[u8],
        sink: &mut S,
        on: &mut F,
    ) -> Sent {
        match sink.write(buf) {
            Write::Done(n) => {
                let n = n.min(buf.len());
                self.obs
                    .feed(&buf[..n], self.capture, |o| on(Event::Peer(o)));
                Sent::Consumed(n)
            }
            Write::Again => {
                self.retry = Some(Src::Peer(buf.len()));
                Sent::Again
            }
            Write::Error => Sent::Error,
        }
    }

    /// From now on each data message is admitted by the `Admit` given to
    /// [`Flow::send_limited`] when its first frame is next.
    pub fn limit_messages(&mut self) {
        self.gate = Some(Box::new(Gate {
            asked: self.obs.starts,
            pending: None,
        }));
    }

    /// Whether messages are still limited.
    pub fn limited(&self) -> bool {
        self.gate.is_some()
    }

    /// When the message held back may go, if one is.
    pub fn held_until(&self) -> Option<Msec> {
        match self.gate.as_deref().and_then(|g| g.pending) {
            Some((_, Admission::Hold(t))) => Some(t),
            _ => None,
        }
    }

    /// Whether the direction is stopped at a held message right now (nginx must be woken up
    /// when it is released: it got "again" from a writable connection).
    pub fn stopped(&self) -> bool {
        self.held_until().is_some()
            && !self.closed
            && self.at_boundary()
            && self.retry.is_none()
            && self
                .gate
                .as_deref()
                .and_then(|g| g.pending)
                .is_some_and(|(i, _)| i == self.obs.starts)
    }

    /// The held message may go if its time has come; returns whether it was released.
    pub fn release(&mut self, now: Msec) -> bool {
        match self.held_until() {
            Some(t) if t <= now => {
                if let Some(g) = self.gate.as_deref_mut() {
                    g.pending = None;
                }
                true
            }
            _ => false,
        }
    }

    /// No more limits (the receiving peer is closing): a held message goes now, a refused
    /// one is forgotten. Returns whether a message was held.
    pub fn lift_limits(&mut self) -> bool {
        let held = self.held_until().is_some();
        self.gate = None;
        held
    }

    /// At a boundary: how much of `rest` may go before a message that must wait, asking
    /// `admit` about each message that begins there (only the first frame's when `single`).
    fn admit_scan<A: Admit>(&mut self, rest: &[u8], admit: &mut A, single: bool) -> Scan {
        let mut p = 0usize;
        let mut index = self.obs.starts;
        let Some(gate) = self.gate.as_deref_mut() else {
            return Scan::Go(rest.len());
        };
        loop {
            if p >= rest.len() || (single && p > 0) {
                return Scan::Go(rest.len());
            }
            if begins_message(rest[p]) {
                if index >= gate.asked && gate.pending.is_none() {
                    gate.asked = index + 1;
                    match admit.admit() {
                        Admission::Pass => {}
                        a => gate.pending = Some((index, a)),
                    }
                }
                match gate.pending {
                    Some((i, a)) if i == index => {
                        return match (p, a) {
                            (0, Admission::Refuse) => Scan::Refuse,
                            (0, _) => Scan::Hold,
                            _ => Scan::Go(p),
                        };
                    }
                    _ => {}
                }
                index += 1;
            }
            match peek_header(&rest[p..]) {
                Ok(h) => {
                    let whole = u64::from(h.header_len).saturating_add(h.len);
                    p = p.saturating_add(usize::try_from(whole).unwrap_or(usize::MAX));
                }
                // The rest of the input is this frame's.
                Err(_) => return Scan::Go(rest.len()),
            }
        }
    }

    /// Whether the proxy has bytes of its own waiting to be written.
    pub fn has_pending(&self) -> bool {
        self.own.as_deref().is_some_and(Own::has_pending)
    }

    /// Whether a write returned "again" and must be retried with the same bytes.
    pub fn awaiting_retry(&self) -> bool {
        self.retry.is_some()
    }

    /// Whether the proxy still waits for a frame boundary to inject something.
    pub fn wants_boundary(&self) -> bool {
        !self.closed
            && (self.own.as_deref().is_some_and(Own::requested)
                || self.judging()
                || self.gate.is_some())
    }

    /// The input is between frames (nothing held, no frame half passed).
    pub fn at_boundary(&self) -> bool {
        self.obs.at_boundary() && self.own.as_deref().is_none_or(|o| o.held.is_empty())
    }

    /// Asks for a Close frame at the next frame boundary; afterwards nothing else is delivered.
    pub fn request_close(&mut self, code: u16, reason: &'static str) {
        let requested = self
            .own
            .as_deref()
            .is_some_and(|o| o.close_request.is_some());
        if !self.closed && !requested {
            let mask = self.next_mask();
            self.own_mut().close_request = Some((code, reason, mask));
        }
    }

    /// Asks for a Ping frame at the next frame boundary.
    pub fn request_ping(&mut self, payload: Vec<u8>) {
        if !self.closed {
            let mask = self.next_mask();
            self.own_mut().ping_request = Some((payload, mask));
        }
    }

    /// Deals with `buf`, nginx's bytes for this direction, writing through `sink`.
    pub fn send<S: Sink, F: FnMut(Event<'_>)>(
        &mut self,
        buf: &[u8],
        sink: &mut S,
        on: &mut F,
    ) -> Sent {
        self.send_limited(buf, sink, on, &mut Unlimited)
    }

    /// [`Flow::send`] for a limited direction: `admit` decides about each data message.
    ///
    /// A held message stops the direction at its first frame: the bytes before it are
    /// consumed, it and what follows are not ("again" when nothing was), until
    /// [`Flow::release`] or [`Flow::lift_limits`]; injected frames (Pings, Closes) still go
    /// out at that boundary.
    pub fn send_limited<S: Sink, F: FnMut(Event<'_>), A: Admit>(
        &mut self,
        buf: &[u8],
        sink: &mut S,
        on: &mut F,
        admit: &mut A,
    ) -> Sent {
        let sent = self.send_inner(buf, sink, on, admit);
        if self.inflate_judged() {
            self.judge_passed();
        }
        sent
    }

    fn send_inner<S: Sink, F: FnMut(Event<'_>), A: Admit>(
        &mut self,
        buf: &[u8],
        sink: &mut S,
        on: &mut F,
        admit: &mut A,
    ) -> Sent {
        if self.gate.is_some()
            && self.idle_but_limited()
            && self.obs.at_boundary()
            && !buf.is_empty()
        {
            // The usual case of a limit that does not trigger, in one write: every message
            // that begins in `buf` passes. Otherwise the loop below does the rest (the
            // verdicts asked here are kept).
            if let Scan::Go(n) = self.admit_scan(buf, admit, false) {
                if n == buf.len() {
                    return self.write_through(buf, sink, on);
                }
            }
        }
        if self.idle() {
            // The usual case, in one write: what the loop below does when the proxy has
            // nothing of its own to send, to hold or to judge.
            if buf.is_empty() {
                return Sent::Consumed(0);
            }
            return self.write_through(buf, sink, on);
        }
        let mut consumed = 0;
        let progress = |consumed: usize| {
            if consumed > 0 {
                Sent::Consumed(consumed)
            } else {
                Sent::Again
            }
        };
        loop {
            if self.inflate_judged() {
                self.judge_passed();
            }
            // A write that returned "again" goes first, with the same bytes.
            if !matches!(self.retry, Some(Src::Peer(_))) {
                match self.flush_own(sink, on) {
                    Write::Done(_) => {}
                    Write::Again => return progress(consumed),
                    Write::Error => return Sent::Error,
                }
            }
            let rest = &buf[consumed..];
            // The whole length of a frame judged at this boundary: forward no further.
            let mut judged: Option<u64> = None;

            if self.closed && !matches!(self.retry, Some(Src::Peer(_))) {
                // Swallow: the proxy has closed this direction. Still watch for the peer's Close,
                // but inflate nothing more: a sender of bombs costs no more CPU once refused.
                let cap = Capture {
                    inflate: Inflate::Off,
                    ..self.capture
                };
                self.obs.feed(rest, cap, |o| on(Event::Peer(o)));
                return Sent::Consumed(buf.len());
            }

            if !matches!(self.retry, Some(Src::Peer(_))) && self.at_boundary() {
                if self.queue_injection() {
                    continue;
                }
                if rest.is_empty() {
                    return Sent::Consumed(consumed);
                }
                if self.gate.is_some() {
                    match self.admit_scan(rest, admit, self.judging()) {
                        Scan::Go(n) => judged = Some(n as u64),
                        Scan::Hold => return progress(consumed),
                        Scan::Refuse => {
                            self.gate = None;
                            self.refuse(Violation::RateLimited);
                            continue;
                        }
                    }
                }
                if self.judging() {
                    match self.judge(rest) {
                        Judge::Forward(total) => {
                            judged = Some(total);
                            let whole = usize::try_from(total).unwrap_or(usize::MAX);
                            if let Some(frame) = rest.get(..whole) {
                                if let Some(v) = self.judge_inflated(frame) {
                                    self.refuse(v);
                                    continue;
                                }
                            }
                        }
                        Judge::Consume(len) => {
                            self.obs
                                .feed(&rest[..len], self.capture, |o| on(Event::Peer(o)));
                            on(Event::PongConsumed);
                            self.pong_seen();
                            consumed += len;
                            continue;
                        }
                        Judge::Violate(v) => {
                            self.refuse(v);
                            continue;
                        }
                        Judge::NeedMore(_) => {
                            // Hold the start of the frame until it can be judged.
                            let n = self.hold(rest, on);
                            consumed += n;
                            continue;
                        }
                    }
                }
            }
            if self.own.as_deref().is_some_and(Own::deciding) {
                // Still deciding about a held frame start: take more input.
                if rest.is_empty() {
                    return Sent::Consumed(consumed);
                }
                let n = self.hold(rest, on);
                consumed += n;
                continue;
            }
            if rest.is_empty() {
                return Sent::Consumed(consumed);
            }

            // Forward the peer's bytes, stopping at the frame end when an injection waits or
            // the next frame must be judged.
            let mut limit = rest.len();
            if self.wants_boundary() {
                if let Some(left) = self.obs.until_known().or(judged) {
                    limit = limit.min(usize::try_from(left).unwrap_or(usize::MAX));
                }
            }
            if let Some(Src::Peer(min)) = self.retry {
                // A write that returned "again" is retried with exactly its bytes: they were
                // bounded when it was made (by a judged frame's end, which is not known here:
                // the judging above was skipped). Bytes past them wait for their own boundary.
                limit = if self.wants_boundary() {
                    min
                } else {
                    limit.max(min)
                };
                limit = limit.min(rest.len());
            }
            match sink.write(&rest[..limit]) {
                Write::Done(n) => {
                    self.retry = None;
                    let n = n.min(limit);
                    self.obs
                        .feed(&rest[..n], self.capture, |o| on(Event::Peer(o)));
                    consumed += n;
                    if n < limit {
                        return Sent::Consumed(consumed);
                    }
                }
                Write::Again => {
                    self.retry = Some(Src::Peer(limit));
                    return progress(consumed);
                }
                Write::Error => return Sent::Error,
            }
        }
    }

    /// Writes what the proxy itself has pending: injected frames, then released held bytes.
    pub fn flush_own<S: Sink, F: FnMut(Event<'_>)>(&mut self, sink: &mut S, on: &mut F) -> Write {
        let Flow {
            own,
            obs,
            capture,
            retry,
            close_written,
            ..
        } = self;
        let Some(own) = own.as_deref_mut() else {
            return Write::Done(0);
        };
        let mut total = 0;
        while own.inject_off < own.inject.len() {
            match sink.write(&own.inject[own.inject_off..]) {
                Write::Done(n) => {
                    *retry = None;
                    own.inject_off += n;
                    total += n;
                    own.report_injected(close_written, on);
                }
                Write::Again => {
                    *retry = Some(Src::Inject);
                    return Write::Again;
                }
                Write::Error => return Write::Error,
            }
        }
        if own.inject_off == own.inject.len() && !own.inject.is_empty() {
            own.inject.clear();
            own.inject_off = 0;
        }
        while own.held_release && own.held_off < own.held.len() {
            match sink.write(&own.held[own.held_off..]) {
                Write::Done(n) => {
                    *retry = None;
                    let start = own.held_off;
                    own.held_off += n;
                    total += n;
                    obs.feed(&own.held[start..start + n], *capture, |o| {
                        on(Event::Peer(o))
                    });
                }
                Write::Again => {
                    *retry = Some(Src::Held);
                    return Write::Again;
                }
                Write::Error => return Write::Error,
            }
        }
        if own.held_release && own.held_off == own.held.len() {
            if own.held.capacity() > HELD_KEEP {
                // A whole compressed frame was held: do not keep its room for the tunnel's life.
                own.held = Vec::new();
            }
            own.held.clear();
            own.held_off = 0;
            own.held_release = false;
        }
        Write::Done(total)
    }

    /// At a boundary: queues a requested Close (first) or Ping. Returns whether it did.
    fn queue_injection(&mut self) -> bool {
        let Some(own) = self.own.as_deref_mut() else {
            return false;
        };
        if let Some((code, reason, mask)) = own.close_request.take() {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason.as_bytes());
            own.push_frame(Opcode::Close, &payload, mask, Some(code), Some(reason));
            own.ping_request = None;
            self.closed = true;
            return true;
        }
        if let Some((payload, mask)) = own.ping_request.take() {
            own.push_frame(Opcode::Ping, &payload, mask, None, None);
            return true;
        }
        false
    }

    /// Judges the frame starting at `have`.
    fn judge(&self, have: &[u8]) -> Judge {
        let h = match peek_header(have) {
            Ok(h) => h,
            Err(need) => return Judge::NeedMore(need),
        };
        let in_message = self.obs.message_in_progress().is_some();
        if let Some(v) = self.policy.check(&h, in_message, self.obs.counted(&h)) {
            return Judge::Violate(v);
        }
        if self.policy.max_inflated > 0
            && h.opcode.is_data()
            && !self.obs.compressed(&h, self.capture)
            && self.obs.counted(&h).saturating_add(h.len) > self.policy.max_inflated
        {
            return Judge::Violate(Violation::TooBig);
        }
        let whole = u64::from(h.header_len).saturating_add(h.len);
        if whole <= INFLATE_HOLD_MAX
            && have.len() < whole as usize
            && self.inflate_judged()
            && self.obs.inflates(&h, self.capture)
        {
            // Held whole, to be inflated before any byte of it goes on.
            return Judge::NeedMore(whole as usize);
        }
        let Some(expect) = self.own.as_deref().and_then(|o| o.watch_pong.as_deref()) else {
            return Judge::Forward(whole);
        };
        if h.opcode != Opcode::Pong || !h.fin || h.len != expect.len() as u64 {
            return Judge::Forward(whole);
        }
        let hlen = usize::from(h.header_len);
        let total = hlen + expect.len();
        if have.len() < total {
            return Judge::NeedMore(total);
        }
        let mut p = have[hlen..total].to_vec();
        if let Some(m) = h.mask {
            unmask(&mut p, m, 0);
        }
        if p == expect {
            Judge::Consume(total)
        } else {
            Judge::Forward(whole)
        }
    }

    /// The policy refused the frame at the input's boundary: it is not forwarded; this
    /// direction gets its Close now and swallows the rest.
    fn refuse(&mut self, v: Violation) {
        self.violation = Some(v);
        let (code, reason) = v.peer_close();
        if let Some(own) = self.own.as_deref_mut() {
            own.close_request = None;
        }
        self.request_close(code, reason);
        self.queue_injection();
    }

    /// Takes input into the hold buffer until the frame can be judged; returns bytes taken.
    fn hold<F: FnMut(Event<'_>)>(&mut self, rest: &[u8], on: &mut F) -> usize {
        let mut take = 0;
        loop {
            let held = self.own.as_deref().map_or(&[][..], |o| o.held.as_slice());
            let mut verdict = self.judge(held);
            if let Judge::Forward(total) = verdict {
                // A whole compressed frame may still be refused for what it inflates to.
                let frame = self
                    .own
                    .as_deref_mut()
                    .map(|o| core::mem::take(&mut o.held))
                    .unwrap_or_default();
                let whole = usize::try_from(total).unwrap_or(usize::MAX);
                let v = frame.get(..whole).and_then(|f| self.judge_inflated(f));
                self.own_mut().held = frame;
                if let Some(v) = v {
                    verdict = Judge::Violate(v);
                }
            }
            let need = match verdict {
                Judge::NeedMore(n) => n,
                Judge::Forward(_) => {
                    self.own_mut().held_release = true;
                    return take;
                }
                Judge::Violate(v) => {
                    // The held start of the refused frame is swallowed like the rest of it.
                    let held = self
                        .own
                        .as_deref_mut()
                        .map(|o| core::mem::take(&mut o.held))
                        .unwrap_or_default();
                    self.obs.feed(&held, self.capture, |o| on(Event::Peer(o)));
                    self.refuse(v);
                    return take;
                }
                Judge::Consume(len) => {
                    // Feed the Pong to the observer (it was received) and drop it.
                    let own = self.own_mut();
                    let frame: Vec<u8> = own.held.drain(..len).collect();
                    if !own.held.is_empty() {
                        own.held_release = true;
                    }
                    self.obs.feed(&frame, self.capture, |o| on(Event::Peer(o)));
                    on(Event::PongConsumed);
                    self.pong_seen();
                    return take;
                }
            };
            let have = self.own.as_deref().map_or(0, |o| o.held.len());
            let want = need.saturating_sub(have);
            let n = want.min(rest.len() - take);
            if n == 0 {
                return take;
            }
            self.own_mut().held.extend_from_slice(&rest[take..take + n]);
            take += n;
        }
    }
}

enum Judge {
    /// Need at least this many bytes of the frame.
    NeedMore(usize),
    /// Forward the frame, whose header and payload take this many bytes.
    Forward(u64),
    /// The frame (this many bytes) is the awaited Pong.
    Consume(usize),
    /// The policy refuses the frame.
    Violate(Violation),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::{build_frame, header_with_ext};
    use crate::frame::{Event as FrameEvent, Parser};
    use proptest::prelude::*;

    /// A connection that accepts at most `caps[i]` bytes on the i-th write (0 = again).
    struct Conn {
        out: Vec<u8>,
        caps: Vec<usize>,
        i: usize,
        last_again: Option<(usize, usize)>,
    }

    impl Conn {
        fn new(caps: Vec<usize>) -> Conn {
            Conn {
                out: Vec::new(),
                caps,
                i: 0,
                last_again: None,
            }
        }
    }

    impl Sink for Conn {
        fn write(&mut self, data: &[u8]) -> Write {
            // SSL_write's rule: a retry after "again" has the same start and no fewer bytes.
            if let Some((ptr, len)) = self.last_again.take() {
                assert_eq!(ptr, data.as_ptr() as usize, "retry with other bytes");
                assert!(data.len() >= len, "retry shorter than before");
            }
            let cap = if self.caps.is_empty() {
                usize::MAX
            } else {
                self.caps[self.i % self.caps.len()]
            };
            self.i += 1;
            if cap == 0 {
                self.last_again = Some((data.as_ptr() as usize, data.len()));
                return Write::Again;
            }
            let n = cap.min(data.len());
            self.out.extend_from_slice(&data[..n]);
            Write::Done(n)
        }
    }

    /// Drives `flow` like nginx: a buffer filled from `input` in `reads`-sized pieces, sent with
    /// the consumed prefix removed; `at(k)` lets a test act after k input bytes were read.
    fn drive(
        flow: &mut Flow,
        conn: &mut Conn,
        input: &[u8],
        reads: &[usize],
        mut at: impl FnMut(usize, &mut Flow),
    ) -> Vec<String> {
        let mut events = Vec::new();
        // Like nginx's buffer: fixed memory, a position that advances.
        let mut buf: Vec<u8> = Vec::with_capacity(input.len());
        let mut pos = 0;
        let mut read = 0;
        let mut r = 0;
        let mut spins = 0;
        while read < input.len() || pos < buf.len() || flow.has_pending() {
            if read < input.len() {
                let n = reads
                    .get(r % reads.len().max(1))
                    .copied()
                    .unwrap_or(7)
                    .max(1);
                r += 1;
                let n = n.min(input.len() - read);
                buf.extend_from_slice(&input[read..read + n]);
                read += n;
                at(read, flow);
            }
            match flow.send(&buf[pos..], conn, &mut |e| events.push(describe(&e))) {
                Sent::Consumed(n) => pos += n,
                Sent::Again => {}
                Sent::Error => panic!("error"),
            }
            spins += 1;
            assert!(spins < 1_000_000, "no progress");
        }
        events
    }

    fn describe(e: &Event<'_>) -> String {
        match e {
            Event::Peer(Observed::Frame(f)) => {
                format!("peer {:?} {}", f.header.opcode, f.header.len)
            }
            Event::Peer(Observed::Message(m)) => format!("message {}", m.len),
            Event::Proxy { opcode, code, .. } => format!("proxy {opcode:?} {code:?}"),
            Event::PongConsumed => "pong consumed".into(),
        }
    }

    fn frames_of(stream: &[u8]) -> Vec<(Opcode, Vec<u8>, bool)> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        let mut cur: Option<(FrameHeader, Vec<u8>)> = None;
        p.feed(stream, |ev| match ev {
            FrameEvent::Header(h) => cur = Some((h, Vec::new())),
            FrameEvent::Payload { offset, data } => {
                let (h, b) = cur.as_mut().unwrap();
                let mut d = data.to_vec();
                if let Some(m) = h.mask {
                    unmask(&mut d, m, offset);
                }
                b.extend(d);
            }
            FrameEvent::End => {
                let (h, b) = cur.take().unwrap();
                out.push((h.opcode, b, h.mask.is_some()));
            }
        });
        assert!(p.at_boundary(), "output ends mid-frame");
        out
    }

    fn stream() -> Vec<u8> {
        let mut s = build_frame(true, Opcode::Text, Some([1, 2, 3, 4]), &[b'a'; 300], false);
        s.extend(build_frame(
            true,
            Opcode::Binary,
            Some([5, 6, 7, 8]),
            &[7u8; 1000],
            false,
        ));
        s.extend(build_frame(
            true,
            Opcode::Text,
            Some([9, 9, 9, 9]),
            b"last",
            false,
        ));
        s
    }

    #[test]
    fn passes_bytes_unchanged() {
        let s = stream();
        let mut f = Flow::new(Capture::default(), Policy::default(), 0);
        let mut c = Conn::new(vec![5, 0, 100, 1]);
        let ev = drive(&mut f, &mut c, &s, &[3, 50, 1], |_, _| {});
        assert_eq!(c.out, s);
        assert_eq!(ev.iter().filter(|e| e.starts_with("peer")).count(), 3);
        assert!(
            f.own.is_none(),
            "a flow that never injects or holds allocates nothing"
        );
    }

    #[test]
    fn close_waits_for_the_frame_end_then_swallows() {
        let s = stream();
        let mut f = Flow::new(Capture::default(), Policy::default(), 7);
        let mut c = Conn::new(vec![64, 0]);
        // Ask for the close while the 1000-byte frame is half read.
        let ev = drive(&mut f, &mut c, &s, &[100], |read, f| {
            if read == 900 {
                f.request_close(1001, "idle timeout");
            }
        });
        let out = frames_of(&c.out);
        assert_eq!(out.len(), 3, "text, binary, close; then nothing: {out:?}");
        assert_eq!(out[1].0, Opcode::Binary);
        assert_eq!(out[2].0, Opcode::Close);
        assert_eq!(&out[2].1[..2], &1001u16.to_be_bytes());
        assert_eq!(&out[2].1[2..], b"idle timeout");
        assert!(out[2].2, "masked");
        assert!(f.close_written && f.closed);
        assert!(ev.contains(&"proxy Close Some(1001)".to_string()));
        // The swallowed last frame is still observed.
        assert!(ev.contains(&"peer Text 4".to_string()));
    }

    #[test]
    fn ping_is_injected_between_frames() {
        let s = stream();
        let mut f = Flow::new(Capture::default(), Policy::default(), 0);
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &s, &[10], |read, f| {
            if read == 20 {
                f.request_ping(b"ngx-ws-1".to_vec());
            }
        });
        let out = frames_of(&c.out);
        let ops: Vec<Opcode> = out.iter().map(|o| o.0).collect();
        assert_eq!(
            ops,
            [Opcode::Text, Opcode::Ping, Opcode::Binary, Opcode::Text]
        );
        assert_eq!(out[1].1, b"ngx-ws-1");
    }

    #[test]
    fn own_pong_is_consumed_other_pongs_pass() {
        let mut s = build_frame(true, Opcode::Pong, Some([3, 3, 3, 3]), b"other", false);
        s.extend(build_frame(
            true,
            Opcode::Pong,
            Some([4, 4, 4, 4]),
            b"ngx-ws-7",
            false,
        ));
        s.extend(build_frame(
            true,
            Opcode::Text,
            Some([5, 5, 5, 5]),
            b"after",
            false,
        ));
        for reads in [vec![1], vec![3], vec![100]] {
            let mut f = Flow::new(Capture::default(), Policy::default(), 0);
            f.watch_pong(b"ngx-ws-7".to_vec());
            let mut c = Conn::new(vec![2, 0, 50]);
            let ev = drive(&mut f, &mut c, &s, &reads, |_, _| {});
            let out = frames_of(&c.out);
            assert_eq!(out.len(), 2, "{reads:?}: {out:?}");
            assert_eq!(out[0].1, b"other");
            assert_eq!(out[1].1, b"after");
            assert!(ev.contains(&"pong consumed".to_string()));
            assert!(!f.watching_pong());
            assert_eq!(f.obs.frames, 3);
            if reads == [100] {
                let held = f.own.as_ref().map_or(0, |o| o.held.capacity());
                assert_eq!(held, 0, "whole frames are judged without holding");
            }
        }
    }

    fn policy_flow(policy: Policy) -> Flow {
        Flow::new(Capture::default(), policy, 0)
    }

    #[test]
    fn oversized_frame_is_not_forwarded() {
        let policy = Policy {
            max_frame: 300,
            expect_masked: true,
            ..Policy::default()
        };
        // 300-byte text passes, the 1000-byte binary is refused before any byte of it.
        for reads in [vec![1], vec![5], vec![2000]] {
            let s = stream();
            let mut f = policy_flow(policy);
            let mut c = Conn::new(vec![3, 0, 1000]);
            drive(&mut f, &mut c, &s, &reads, |_, _| {});
            let out = frames_of(&c.out);
            let ops: Vec<Opcode> = out.iter().map(|o| o.0).collect();
            assert_eq!(ops, [Opcode::Text, Opcode::Close], "{reads:?}");
            assert_eq!(&out[1].1[..2], &1001u16.to_be_bytes());
            assert_eq!(f.violation, Some(Violation::TooBig));
            // The refused frame and what follows are swallowed, still observed.
            assert_eq!(f.obs.frames, 3);
        }
    }

    #[test]
    fn message_limit_counts_fragments() {
        let m = Some([1, 2, 3, 4]);
        let mut s = build_frame(false, Opcode::Text, m, &[b'a'; 60], false);
        s.extend(build_frame(true, Opcode::Ping, m, b"p", false));
        s.extend(build_frame(
            false,
            Opcode::Continuation,
            m,
            &[b'b'; 40],
            false,
        ));
        let fits = s.clone();
        s.extend(build_frame(
            true,
            Opcode::Continuation,
            m,
            &[b'c'; 1],
            false,
        ));
        let limit = |max| Policy {
            max_message: max,
            ..Policy::default()
        };
        // 101 bytes in three fragments: over a 100-byte limit at the last fragment.
        let mut f = policy_flow(limit(100));
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &s, &[7], |_, _| {});
        assert_eq!(f.violation, Some(Violation::TooBig));
        assert_eq!(&c.out[..fits.len()], &fits[..]);
        assert_eq!(frames_of(&c.out).last().map(|o| o.0), Some(Opcode::Close));
        // At exactly the limit it passes.
        let mut f = policy_flow(limit(101));
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &s, &[7], |_, _| {});
        assert_eq!(f.violation, None);
        assert_eq!(c.out, s);
    }

    #[test]
    fn message_limit_holds_for_broken_framing() {
        // With ws_protocol_check off a lenient receiver may take any framing: none of it walks
        // around a 100-byte message limit.
        use Opcode::{Binary, Continuation as Cont, Text};
        let m = Some([1, 2, 3, 4]);
        let fr = |fin, op, n| build_frame(fin, op, m, &vec![b'a'; n], false);
        let cases: Vec<(&str, Vec<Vec<u8>>, bool)> = vec![
            (
                "text interrupting an unfinished text",
                vec![fr(false, Text, 60), fr(true, Text, 60)],
                true,
            ),
            (
                "binary interrupting a fragmented text",
                vec![
                    fr(false, Text, 30),
                    fr(false, Cont, 30),
                    fr(true, Binary, 41),
                ],
                true,
            ),
            (
                "orphan continuations",
                vec![fr(false, Cont, 60), fr(true, Cont, 60)],
                true,
            ),
            (
                "continuation after a finished message",
                vec![fr(true, Text, 60), fr(true, Cont, 60)],
                true,
            ),
            (
                "finished messages, each within the limit",
                vec![
                    fr(true, Text, 100),
                    fr(true, Binary, 100),
                    fr(false, Text, 50),
                    fr(true, Cont, 50),
                ],
                false,
            ),
            (
                "a message after an orphan continuation counts from 0",
                vec![fr(true, Cont, 60), fr(true, Text, 100)],
                false,
            ),
        ];
        for (name, frames, refused) in cases {
            let s = frames.concat();
            for reads in [vec![1], vec![s.len()]] {
                let mut f = policy_flow(Policy {
                    max_message: 100,
                    expect_masked: true,
                    ..Policy::default()
                });
                let mut c = Conn::new(vec![]);
                drive(&mut f, &mut c, &s, &reads, |_, _| {});
                if refused {
                    assert_eq!(f.violation, Some(Violation::TooBig), "{name}");
                    let fits = frames[..frames.len() - 1].concat();
                    assert_eq!(&c.out[..fits.len()], &fits[..], "{name}");
                    let out = frames_of(&c.out[fits.len()..]);
                    assert_eq!(out.len(), 1, "{name}: only the Close follows");
                    assert_eq!(out[0].0, Opcode::Close, "{name}");
                } else {
                    assert_eq!((f.violation, &c.out), (None, &s), "{name}");
                }
            }
        }
    }

    #[test]
    fn protocol_violations() {
        let check = Policy {
            protocol_check: true,
            expect_masked: true,
            rsv_allowed: 0,
            ..Policy::default()
        };
        let m = Some([1, 1, 1, 1]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "rsv1 without extension",
                build_frame(true, Opcode::Text, m, b"x", true),
            ),
            (
                "reserved opcode",
                build_frame(true, Opcode::Reserved(3), m, b"x", false),
            ),
            (
                "reserved control opcode",
                build_frame(true, Opcode::Reserved(0xb), m, b"", false),
            ),
            (
                "long ping",
                build_frame(true, Opcode::Ping, m, &[0; 126], false),
            ),
            (
                "fragmented ping",
                build_frame(false, Opcode::Ping, m, b"x", false),
            ),
            (
                "orphan continuation",
                build_frame(true, Opcode::Continuation, m, b"x", false),
            ),
            (
                "unmasked client frame",
                build_frame(true, Opcode::Text, None, b"x", false),
            ),
            (
                "one-byte close",
                build_frame(true, Opcode::Close, m, b"x", false),
            ),
            ("new message inside a message", {
                let mut v = build_frame(false, Opcode::Text, m, b"x", false);
                v.extend(build_frame(true, Opcode::Text, m, b"y", false));
                v
            }),
            ("16-bit length for 5 bytes", {
                let mut v = header_with_ext(true, Opcode::Text, m, 5, 2);
                v.extend_from_slice(b"hello");
                v
            }),
            ("64-bit length for 200 bytes", {
                let mut v = header_with_ext(true, Opcode::Binary, m, 200, 8);
                v.extend_from_slice(&[0; 200]);
                v
            }),
            (
                "64-bit length with the top bit set",
                header_with_ext(true, Opcode::Binary, m, 1 << 63, 8),
            ),
        ];
        for (name, s) in cases {
            let mut f = policy_flow(check);
            let mut c = Conn::new(vec![]);
            drive(&mut f, &mut c, &s, &[3], |_, _| {});
            let rule = match name {
                "rsv1 without extension" => Rule::ReservedBits,
                "reserved opcode" | "reserved control opcode" => Rule::ReservedOpcode,
                "long ping" => Rule::ControlTooLong,
                "fragmented ping" => Rule::ControlFragmented,
                "orphan continuation" => Rule::OrphanContinuation,
                "unmasked client frame" => Rule::Masking,
                "one-byte close" => Rule::CloseOneByte,
                "new message inside a message" => Rule::InterruptedMessage,
                _ => Rule::LengthEncoding,
            };
            assert_eq!(f.violation, Some(Violation::Protocol(rule)), "{name}");
            let out = frames_of(&c.out);
            assert_eq!(out.last().map(|o| o.0), Some(Opcode::Close), "{name}");
        }
        // Without the check, a lenient peer's non-minimal length passes.
        let lenient = header_with_ext(true, Opcode::Text, m, 5, 8)
            .into_iter()
            .chain(*b"hello")
            .collect::<Vec<u8>>();
        let mut f = policy_flow(Policy {
            max_frame: 5,
            ..Policy::default()
        });
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &lenient, &[3], |_, _| {});
        assert_eq!((f.violation, c.out), (None, lenient));
        // Negotiated permessage-deflate allows RSV1 on a message's first frame only.
        let deflate = Policy {
            rsv_allowed: 4,
            ..check
        };
        let ok = build_frame(true, Opcode::Text, m, b"x", true);
        let mut f = policy_flow(deflate);
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &ok, &[3], |_, _| {});
        assert_eq!((f.violation, c.out), (None, ok));
        // Server frames must not be masked.
        let server = Policy {
            expect_masked: false,
            ..check
        };
        let mut f = policy_flow(server);
        let mut c = Conn::new(vec![]);
        drive(
            &mut f,
            &mut c,
            &build_frame(true, Opcode::Text, m, b"x", false),
            &[9],
            |_, _| {},
        );
        assert_eq!(f.violation, Some(Violation::Protocol(Rule::Masking)));
    }

    #[test]
    fn frames_after_a_blocked_write_are_still_judged() {
        // One nginx buffer of 2000 bytes: a small frame, then an oversized one. The write of the
        // small frame returns "again"; the retry must not carry the oversized frame out unjudged.
        for masked in [true, false] {
            let m = masked.then_some([1, 2, 3, 4]);
            let mut s = build_frame(true, Opcode::Text, m, &[b'a'; 100], false);
            let big = 2000 - s.len() - if masked { 8 } else { 4 };
            s.extend(build_frame(true, Opcode::Binary, m, &vec![7u8; big], false));
            assert_eq!(s.len(), 2000);
            let mut f = policy_flow(Policy {
                max_frame: 500,
                expect_masked: masked,
                ..Policy::default()
            });
            let mut c = Conn::new(vec![0, 1000]);
            drive(&mut f, &mut c, &s, &[s.len()], |_, _| {});
            let ops: Vec<Opcode> = frames_of(&c.out).iter().map(|o| o.0).collect();
            assert_eq!(ops, [Opcode::Text, Opcode::Close], "masked {masked}");
            assert_eq!(f.violation, Some(Violation::TooBig));
        }
    }

    #[test]
    fn frames_in_one_buffer_are_judged_one_by_one() {
        // Two fragmented messages arriving in one buffer, written by a connection that takes
        // everything: the second message's last fragment still crosses the limit.
        let m = Some([1, 2, 3, 4]);
        let mut s = Vec::new();
        let parts = [
            (Opcode::Text, false, 400),
            (Opcode::Continuation, false, 400),
            (Opcode::Continuation, true, 200),
            (Opcode::Text, false, 400),
            (Opcode::Continuation, false, 400),
            (Opcode::Continuation, true, 201),
        ];
        for (op, fin, n) in parts {
            s.extend(build_frame(fin, op, m, &vec![b'a'; n], false));
        }
        let mut f = policy_flow(Policy {
            max_message: 1000,
            expect_masked: true,
            ..Policy::default()
        });
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &s, &[s.len()], |_, _| {});
        assert_eq!(f.violation, Some(Violation::TooBig));
        assert_eq!(frames_of(&c.out).len(), 6, "five fragments and the Close");
    }

    /// A generated peer frame, as the model sees it (not parsed back from its bytes).
    #[derive(Debug, Clone)]
    struct Spec {
        fin: bool,
        rsv1: bool,
        op: Opcode,
        masked: bool,
        /// Length written in more bytes than needed.
        long_len: bool,
        payload: Vec<u8>,
    }

    impl Spec {
        fn bytes(&self) -> Vec<u8> {
            let len = self.payload.len();
            let ext = match (len, self.long_len) {
                (0..=125, false) => 0,
                (0..=125, true) | (126..=65535, false) => 2,
                _ => 8,
            };
            let mask = self.masked.then_some([9, 8, 7, 6]);
            let mut out = header_with_ext(self.fin, self.op, mask, len as u64, ext);
            out[0] |= u8::from(self.rsv1) << 6;
            let mut p = self.payload.clone();
            if let Some(m) = mask {
                unmask(&mut p, m, 0);
            }
            out.extend(p);
            out
        }
    }

    const PONG: &[u8] = b"ngx-ws-7";

    /// Peer frames of any kind, mostly data frames with any FIN/opcode order, mostly masked as
    /// the direction wants; payloads are lowercase letters, so no peer frame looks like one the
    /// proxy injects.
    fn arb_specs(masked: bool) -> impl Strategy<Value = Vec<Spec>> {
        let op = prop_oneof![
            4 => Just(Opcode::Text),
            2 => Just(Opcode::Binary),
            5 => Just(Opcode::Continuation),
            1 => Just(Opcode::Ping),
            2 => Just(Opcode::Pong),
            1 => Just(Opcode::Close),
            1 => Just(Opcode::Reserved(3)),
        ];
        let spec = (
            (any::<bool>(), 0u8..20, op, 0u8..10, 0u8..10),
            (b'a'..=b'z', 0usize..300, any::<bool>()),
        )
            .prop_map(
                move |((fin, rsv, op, wrong_mask, long), (c, len, own_pong))| {
                    let pong = op == Opcode::Pong && own_pong;
                    Spec {
                        fin: fin || pong,
                        rsv1: rsv == 0,
                        op,
                        masked: masked != (wrong_mask == 0),
                        long_len: long == 0,
                        payload: if pong { PONG.to_vec() } else { vec![c; len] },
                    }
                },
            );
        proptest::collection::vec(spec, 1..12)
    }

    /// What the flow must forward of `frames`, written from RFC 6455 and the policy's
    /// documented rules rather than from the flow's code: the frames before the first one the
    /// policy refuses (minus the first Pong answering the proxy's Ping), and the refusal.
    /// A violation without its rule.
    fn kind(v: Violation) -> u8 {
        match v {
            Violation::TooBig => 0,
            Violation::Protocol(_) => 1,
            Violation::Invalid => 2,
            Violation::RateLimited => 3,
        }
    }

    fn model(frames: &[Spec], p: &Policy, mut watch: bool) -> (Vec<Spec>, Option<Violation>) {
        let mut out = Vec::new();
        // An unfinished message (the last data frame had no FIN), and the size counted for
        // the message limit.
        let (mut unfinished, mut counted) = (false, 0u64);
        for f in frames {
            let len = f.payload.len() as u64;
            let data = f.op.is_data();
            let starts = matches!(f.op, Opcode::Text | Opcode::Binary);
            let base = if starts && !unfinished { 0 } else { counted };
            let protocol = p.protocol_check
                && ((f.rsv1 && !(starts && p.rsv_allowed & 4 != 0))
                    || matches!(f.op, Opcode::Reserved(_))
                    || (f.op.is_control() && (len > 125 || !f.fin))
                    || (f.op == Opcode::Continuation && !unfinished)
                    || (starts && unfinished)
                    || (f.op == Opcode::Close && len == 1)
                    || f.long_len
                    || f.masked != p.expect_masked);
            let too_big = (p.max_frame > 0 && len > p.max_frame)
                || (p.max_message > 0 && data && base + len > p.max_message);
            if protocol {
                // The model knows that a rule broke, not which: compared by kind.
                return (out, Some(Violation::Protocol(Rule::Masking)));
            }
            if too_big {
                return (out, Some(Violation::TooBig));
            }
            if data {
                (unfinished, counted) = (!f.fin, base + len);
            }
            if watch && f.op == Opcode::Pong && f.fin && f.payload == PONG {
                watch = false;
                continue;
            }
            out.push(f.clone());
        }
        (out, None)
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            prop_oneof![Just(0u64), 1u64..400],
            prop_oneof![Just(0u64), 1u64..900],
            any::<bool>(),
            prop_oneof![Just(0u8), Just(4u8)],
        )
            .prop_map(
                |(max_frame, max_message, protocol_check, rsv_allowed)| Policy {
                    max_frame,
                    max_message,
                    protocol_check,
                    rsv_allowed,
                    expect_masked: false,
                    max_inflated: 0,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any peer frames, in both directions, under any policy, read split and write pattern
        /// (including writes that return "again"), with the proxy's Pong watch, Ping and Close
        /// requests at any moment: the output is exactly the model's frames in order, the
        /// proxy's Ping anywhere between them, and ends with the proxy's Close when the policy
        /// refused a frame (the Close right after the frames before it) or a Close was
        /// requested (after a prefix of them). No frame the policy refuses, and nothing after
        /// it, ever reaches the connection.
        #[test]
        fn policy_holds_under_any_split(
            client in any::<bool>(),
            (specs, policy) in any::<bool>().prop_flat_map(|masked| (arb_specs(masked), arb_policy())),
            watch in any::<bool>(),
            reads in proptest::collection::vec(1usize..800, 1..6),
            caps in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..700], 1..6),
            close_at in 0usize..6000,
            ping_at in 0usize..6000,
        ) {
            // The generated masking follows `client` only most of the time either way.
            let policy = Policy { expect_masked: client, ..policy };
            let s: Vec<u8> = specs.iter().flat_map(Spec::bytes).collect();
            let mut caps = caps;
            if caps.iter().all(|&c| c == 0) { caps.push(1); }
            let mut f = Flow::new(Capture::default(), policy, if client { 7 } else { 0 });
            if watch {
                f.watch_pong(PONG.to_vec());
            }
            let mut c = Conn::new(caps);
            drive(&mut f, &mut c, &s, &reads, |read, f| {
                if read >= ping_at && read < ping_at + 800 { f.request_ping(b"proxy-ping".to_vec()); }
                if read >= close_at { f.request_close(4000, "x"); }
            });
            let (want, refused) = model(&specs, &policy, watch);
            let want: Vec<(Opcode, Vec<u8>, bool)> =
                want.into_iter().map(|f| (f.op, f.payload, f.masked)).collect();
            let mut out = frames_of(&c.out);
            out.retain(|o| !(o.0 == Opcode::Ping && o.1 == b"proxy-ping"));
            prop_assert!(out.iter().all(|o| o.2 == client || o.1 != b"proxy-ping"));
            let close = match out.last() {
                Some((Opcode::Close, p, m)) if p.starts_with(&4000u16.to_be_bytes())
                    || p.starts_with(&1001u16.to_be_bytes()) => {
                    prop_assert_eq!(*m, client, "the proxy masks toward the upstream only");
                    out.pop().map(|c| c.1)
                }
                _ => None,
            };
            prop_assert!(out.len() <= want.len(), "more frames out than the model allows");
            prop_assert_eq!(&out[..], &want[..out.len()]);
            match close.as_deref().map(|p| &p[..2]) {
                Some(code) if code == 1001u16.to_be_bytes() => {
                    prop_assert!(refused.is_some());
                    prop_assert_eq!(f.violation.map(kind), refused.map(kind));
                    prop_assert_eq!(out.len(), want.len(), "all frames before the refused one");
                }
                Some(_) => {
                    prop_assert!(close_at <= s.len(), "a Close nobody asked for");
                    prop_assert_eq!(f.violation, None);
                }
                None => {
                    prop_assert!(refused.is_none() && close_at > s.len(), "no Close");
                    prop_assert_eq!(out.len(), want.len());
                }
            }
        }

        /// With a frame limit, no read split or write pattern (writes returning "again"
        /// included) lets a byte of the oversized frame through.
        #[test]
        fn limits_hold_under_any_split(
            reads in proptest::collection::vec(1usize..2000, 1..6),
            caps in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..2000], 1..6),
        ) {
            let s = stream();
            let mut f = policy_flow(Policy { max_frame: 500, expect_masked: true, ..Policy::default() });
            let mut caps = caps;
            if caps.iter().all(|&c| c == 0) { caps.push(1); }
            let mut c = Conn::new(caps);
            drive(&mut f, &mut c, &s, &reads, |_, _| {});
            let out = frames_of(&c.out);
            let ops: Vec<Opcode> = out.iter().map(|o| o.0).collect();
            prop_assert_eq!(ops, vec![Opcode::Text, Opcode::Close]);
        }

        /// Any read split, any partial-write pattern, an injection at any moment: the output is
        /// whole frames, the peer's frames before the Close are exactly the input's, in order.
        #[test]
        fn shaping_is_split_independent(
            reads in proptest::collection::vec(1usize..400, 1..6),
            caps in proptest::collection::vec(0usize..300, 1..6),
            close_at in 0usize..2000,
            ping_at in 0usize..2000,
        ) {
            let s = stream();
            let mut caps = caps;
            if caps.iter().all(|&c| c == 0) { caps.push(1); }
            let mut f = Flow::new(Capture::default(), Policy::default(), 0);
            let mut c = Conn::new(caps);
            drive(&mut f, &mut c, &s, &reads, |read, f| {
                if read >= ping_at && read < ping_at + 400 { f.request_ping(b"p".to_vec()); }
                if read >= close_at { f.request_close(1001, "x"); }
            });
            let out = frames_of(&c.out);
            let input = frames_of(&s);
            let peer: Vec<_> = out.iter().filter(|o| o.0 != Opcode::Ping && o.0 != Opcode::Close).cloned().collect();
            prop_assert_eq!(&peer[..], &input[..peer.len()]);
            if close_at < s.len() {
                prop_assert_eq!(out.last().map(|o| o.0), Some(Opcode::Close));
            }
        }
    }

    /// Incompressible bytes.
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn deflate_flow(limit: u64, protocol_check: bool) -> Flow {
        use crate::inflate::Stream;
        use crate::observe::Inflate;
        let capture = Capture {
            payload: 32,
            deflate: true,
            inflate: Inflate::On {
                stream: Stream::default(),
                limit,
            },
            unread: Default::default(),
        };
        let policy = Policy {
            protocol_check,
            expect_masked: true,
            rsv_allowed: 4,
            ..Policy::default()
        };
        Flow::new(capture, policy, 0)
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_any_byte_of_it() {
        use crate::inflate::tests::Sender;
        use crate::inflate::Stream;
        use crate::observe::tests::compressed_frames;
        let m = Some([5, 6, 7, 8]);
        let mut tx = Sender::new(Stream::default());
        let ok = b"fine ".repeat(100);
        let mut s = compressed_frames(&mut tx, &ok, Opcode::Text, 1, m);
        let bomb = compressed_frames(&mut tx, &vec![0u8; 1 << 20], Opcode::Binary, 1, m);
        assert!(bomb.len() < 1200, "{}", bomb.len());
        s.extend(&bomb);
        for reads in [vec![1], vec![7], vec![100_000]] {
            let mut f = deflate_flow(64 << 10, false);
            let mut c = Conn::new(vec![]);
            drive(&mut f, &mut c, &s, &reads, |_, _| {});
            let out = frames_of(&c.out);
            let ops: Vec<Opcode> = out.iter().map(|o| o.0).collect();
            assert_eq!(ops, [Opcode::Text, Opcode::Close], "{reads:?}");
            assert_eq!(&out[1].1[..2], &1001u16.to_be_bytes());
            assert_eq!(f.violation, Some(Violation::TooBig));
        }
    }

    #[test]
    fn compressed_messages_pass_intact_under_a_limit() {
        use crate::inflate::tests::Sender;
        use crate::inflate::Stream;
        use crate::observe::tests::compressed_frames;
        let m = Some([1, 1, 2, 3]);
        let mut tx = Sender::new(Stream::default());
        let mut s = Vec::new();
        for i in 0..6 {
            let t = format!("{i} lorem ipsum ").repeat(1 + i * 40).into_bytes();
            s.extend(compressed_frames(&mut tx, &t, Opcode::Text, 1 + i % 3, m));
        }
        // A large frame (over the hold size) passes as it comes.
        s.extend(compressed_frames(
            &mut tx,
            &noise(40_000),
            Opcode::Binary,
            1,
            m,
        ));
        for reads in [vec![1], vec![3, 1000], vec![100_000]] {
            let mut f = deflate_flow(1 << 20, true);
            let mut c = Conn::new(vec![5, 0, 4096]);
            let ev = drive(&mut f, &mut c, &s, &reads, |_, _| {});
            assert_eq!(c.out, s, "{reads:?}");
            assert_eq!(f.violation, None);
            assert_eq!(ev.iter().filter(|e| e.starts_with("message")).count(), 7);
        }
    }

    #[test]
    fn invalid_compressed_data_gets_1007_under_protocol_check() {
        let m = Some([1, 2, 3, 4]);
        let bad = build_frame(true, Opcode::Text, m, &[0xff, 0xff, 0xff, 0xff], true);
        for check in [true, false] {
            let mut f = deflate_flow(0, check);
            let mut c = Conn::new(vec![]);
            drive(&mut f, &mut c, &bad, &[2], |_, _| {});
            if check {
                // Not forwarded; the receiver gets 1001, the tunnel tells the sender 1007.
                let out = frames_of(&c.out);
                assert_eq!(out.len(), 1);
                assert_eq!(&out[0].1[..2], &1001u16.to_be_bytes());
                assert_eq!(f.violation, Some(Violation::Invalid));
                assert_eq!(Violation::Invalid.sender_close().0, 1007);
            } else {
                assert_eq!(c.out, bad, "without ws_protocol_check it passes untouched");
                assert_eq!(f.violation, None);
            }
        }
    }

    #[test]
    fn a_bomb_larger_than_the_hold_stops_inside_its_frame() {
        use crate::inflate::tests::Sender;
        use crate::inflate::Stream;
        use crate::observe::tests::compressed_frames;
        let mut tx = Sender::new(Stream::default());
        // Incompressible start (over the hold size on the wire), then a long run of zeros.
        let mut big = noise(30_000);
        big.extend(vec![0u8; 4 << 20]);
        let s = compressed_frames(&mut tx, &big, Opcode::Binary, 1, Some([3, 3, 3, 3]));
        assert!(s.len() as u64 > INFLATE_HOLD_MAX);
        let mut f = deflate_flow(256 << 10, false);
        let mut c = Conn::new(vec![]);
        drive(&mut f, &mut c, &s, &[4096], |_, _| {});
        assert_eq!(f.violation, Some(Violation::TooBig));
        assert!(f.closed);
        assert!(
            c.out.len() < s.len(),
            "the rest of the frame was not forwarded"
        );
    }
    /// Admits data messages from a script (Pass once the script runs out), counting the asks.
    struct Script {
        verdicts: Vec<Admission>,
        asked: usize,
    }

    impl Admit for Script {
        fn admit(&mut self) -> Admission {
            let a = self
                .verdicts
                .get(self.asked)
                .copied()
                .unwrap_or(Admission::Pass);
            self.asked += 1;
            a
        }
    }

    /// Text, a Ping, a fragmented Binary with a Pong inside, Text, Text: four messages.
    fn messages() -> Vec<u8> {
        let m = Some([1, 2, 3, 4]);
        let mut s = build_frame(true, Opcode::Text, m, b"one", false);
        s.extend(build_frame(true, Opcode::Ping, m, b"p", false));
        s.extend(build_frame(false, Opcode::Binary, m, &[2; 200], false));
        s.extend(build_frame(true, Opcode::Pong, m, b"q", false));
        s.extend(build_frame(true, Opcode::Continuation, m, &[3; 100], false));
        s.extend(build_frame(true, Opcode::Text, m, b"three", false));
        s.extend(build_frame(true, Opcode::Text, m, b"four", false));
        s
    }

    fn limited_flow() -> Flow {
        let mut f = Flow::new(Capture::default(), Policy::default(), 0);
        f.limit_messages();
        f
    }

    /// Drives a limited flow like nginx and the module's timer: when the flow stops at a held
    /// message, the clock jumps to its time and the message is released.
    fn drive_limited(
        flow: &mut Flow,
        conn: &mut Conn,
        input: &[u8],
        reads: &[usize],
        admit: &mut Script,
    ) -> Vec<Msec> {
        // Fixed memory, as nginx's buffer: a retried write sees the same address.
        let mut buf: Vec<u8> = Vec::with_capacity(input.len());
        let (mut pos, mut read, mut r, mut spins) = (0, 0, 0, 0);
        let mut released = Vec::new();
        while read < input.len() || pos < buf.len() || flow.has_pending() {
            if read < input.len() {
                let n = reads
                    .get(r % reads.len().max(1))
                    .copied()
                    .unwrap_or(7)
                    .max(1);
                r += 1;
                let n = n.min(input.len() - read);
                buf.extend_from_slice(&input[read..read + n]);
                read += n;
            }
            match flow.send_limited(&buf[pos..], conn, &mut |_| {}, admit) {
                Sent::Consumed(n) => pos += n,
                Sent::Again => {}
                Sent::Error => panic!("error"),
            }
            if let Some(t) = flow.held_until() {
                if flow.stopped() {
                    assert!(flow.release(t));
                    released.push(t);
                }
            }
            spins += 1;
            assert!(spins < 1_000_000, "no progress");
        }
        released
    }

    #[test]
    fn messages_are_admitted_at_their_first_frame_only() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![],
            asked: 0,
        };
        drive_limited(&mut f, &mut c, &s, &[3], &mut admit);
        assert_eq!(c.out, s);
        assert_eq!(
            admit.asked, 4,
            "control frames and continuations are never counted"
        );
    }

    #[test]
    fn a_held_message_stops_the_direction_until_released() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![Admission::Pass, Admission::Hold(50)],
            asked: 0,
        };
        let sent = f.send_limited(&s, &mut c, &mut |_| {}, &mut admit);
        // "one" and the Ping went; the fragmented Binary waits at its first frame.
        let first = build_frame(true, Opcode::Text, Some([1, 2, 3, 4]), b"one", false).len();
        let ping = build_frame(true, Opcode::Ping, Some([1, 2, 3, 4]), b"p", false).len();
        assert_eq!(sent, Sent::Consumed(first + ping));
        assert!(f.stopped());
        assert_eq!(f.held_until(), Some(50));
        let rest = &s[first + ping..];
        assert_eq!(
            f.send_limited(rest, &mut c, &mut |_| {}, &mut admit),
            Sent::Again
        );
        assert_eq!(admit.asked, 2, "a held message is asked about once");
        assert!(!f.release(49));
        assert!(f.release(50));
        assert_eq!(
            f.send_limited(rest, &mut c, &mut |_| {}, &mut admit),
            Sent::Consumed(rest.len())
        );
        assert_eq!(c.out, s);
        assert_eq!(admit.asked, 4);
    }

    #[test]
    fn a_refused_message_is_not_forwarded_and_the_direction_closes() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![Admission::Pass, Admission::Pass, Admission::Refuse],
            asked: 0,
        };
        drive_limited(&mut f, &mut c, &s, &[1000], &mut admit);
        let out = frames_of(&c.out);
        let ops: Vec<Opcode> = out.iter().map(|o| o.0).collect();
        use Opcode::*;
        assert_eq!(ops, vec![Text, Ping, Binary, Pong, Continuation, Close]);
        assert_eq!(&out[5].1[..2], &1001u16.to_be_bytes());
        assert_eq!(&out[5].1[2..], b"rate limit");
        assert_eq!(f.violation, Some(Violation::RateLimited));
        assert_eq!(Violation::RateLimited.sender_close(), (1008, "rate limit"));
    }

    #[test]
    fn a_close_or_ping_still_goes_out_while_held() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![Admission::Hold(1000)],
            asked: 0,
        };
        assert_eq!(
            f.send_limited(&s, &mut c, &mut |_| {}, &mut admit),
            Sent::Again
        );
        assert!(c.out.is_empty());
        f.request_ping(b"x".to_vec());
        assert_eq!(f.send(&[], &mut c, &mut |_| {}), Sent::Consumed(0));
        f.request_close(1001, "max lifetime");
        assert_eq!(f.send(&[], &mut c, &mut |_| {}), Sent::Consumed(0));
        let ops: Vec<Opcode> = frames_of(&c.out).iter().map(|o| o.0).collect();
        assert_eq!(ops, vec![Opcode::Ping, Opcode::Close]);
        // The held message and the rest are swallowed once the direction is closed.
        assert_eq!(
            f.send_limited(&s, &mut c, &mut |_| {}, &mut admit),
            Sent::Consumed(s.len())
        );
        assert_eq!(frames_of(&c.out).len(), 2);
    }

    #[test]
    fn lifting_the_limits_lets_everything_through() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![Admission::Hold(1000), Admission::Refuse],
            asked: 0,
        };
        assert_eq!(
            f.send_limited(&s, &mut c, &mut |_| {}, &mut admit),
            Sent::Again
        );
        assert!(f.lift_limits());
        assert!(!f.limited());
        assert_eq!(
            f.send_limited(&s, &mut c, &mut |_| {}, &mut admit),
            Sent::Consumed(s.len())
        );
        assert_eq!(c.out, s);
        assert_eq!(admit.asked, 1);
    }

    /// Several messages in one buffer go in one write when all pass: a limit that never
    /// triggers costs no extra system calls.
    #[test]
    fn admitted_messages_share_a_write() {
        let s = messages();
        let mut f = limited_flow();
        let mut c = Conn::new(vec![]);
        let mut admit = Script {
            verdicts: vec![],
            asked: 0,
        };
        assert_eq!(
            f.send_limited(&s, &mut c, &mut |_| {}, &mut admit),
            Sent::Consumed(s.len())
        );
        assert_eq!(c.i, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any read split, any partial-write pattern, any holds: every message is asked about
        /// exactly once, in order, and the output is the input, whole.
        #[test]
        fn holds_are_split_independent(
            reads in proptest::collection::vec(1usize..400, 1..6),
            caps in proptest::collection::vec(0usize..300, 1..6),
            holds in proptest::collection::vec(any::<bool>(), 0..6),
            policy: bool,
        ) {
            let s = messages();
            let mut caps = caps;
            if caps.iter().all(|&c| c == 0) { caps.push(1); }
            let p = Policy { max_frame: if policy { 1000 } else { 0 }, ..Policy::default() };
            let mut f = Flow::new(Capture::default(), p, 0);
            f.limit_messages();
            let mut c = Conn::new(caps);
            let verdicts: Vec<Admission> = holds.iter().enumerate()
                .map(|(i, &h)| if h { Admission::Hold(i as Msec * 10) } else { Admission::Pass })
                .collect();
            let held = verdicts.iter().filter(|v| **v != Admission::Pass).count().min(4);
            let mut admit = Script { verdicts, asked: 0 };
            let released = drive_limited(&mut f, &mut c, &s, &reads, &mut admit);
            prop_assert_eq!(&c.out, &s);
            prop_assert_eq!(admit.asked, 4);
            prop_assert!(released.len() <= held);
        }

        /// A refusal anywhere: the frames before the refused message pass whole, nothing of it
        /// or after it does, and the direction ends with the proxy's Close.
        #[test]
        fn a_refusal_is_split_independent(
            reads in proptest::collection::vec(1usize..400, 1..6),
            caps in proptest::collection::vec(0usize..300, 1..6),
            at in 0usize..4,
        ) {
            let s = messages();
            let mut caps = caps;
            if caps.iter().all(|&c| c == 0) { caps.push(1); }
            let mut f = limited_flow();
            let mut c = Conn::new(caps);
            let mut verdicts = vec![Admission::Pass; at];
            verdicts.push(Admission::Refuse);
            let mut admit = Script { verdicts, asked: 0 };
            drive_limited(&mut f, &mut c, &s, &reads, &mut admit);
            let out = frames_of(&c.out);
            let input = frames_of(&s);
            // Frames before message `at`: where its first frame is in the input.
            let starts: Vec<usize> = input.iter().enumerate()
                .filter(|(_, o)| matches!(o.0, Opcode::Text | Opcode::Binary))
                .map(|(i, _)| i).collect();
            let before = starts[at];
            prop_assert_eq!(&out[..out.len() - 1], &input[..before]);
            prop_assert_eq!(out.last().map(|o| o.0), Some(Opcode::Close));
            prop_assert_eq!(f.violation, Some(Violation::RateLimited));
        }
    }
}
