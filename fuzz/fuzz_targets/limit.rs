//! The flow shaper with message rate limits (`ws_limit`): any input, read split, write pattern,
//! policy, and any sequence of verdicts (pass, hold until a time, refuse), with the receiving
//! peer's Close (which lifts the limits) and the proxy's own Close at any moment. No panic,
//! no stall (a held direction always goes on once its time comes), and:
//! - each data message is asked about once, in order, and only when its first byte is there;
//! - the peer frames out are the input's first frames in order, none refused by the policy;
//! - a held message's first byte is written no earlier than its time, unless the limits were
//!   lifted first;
//! - a refused message ends the direction with the rate-limit Close: neither it nor anything
//!   after it reaches the connection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::flow::{Admission, Admit, Event as FlowEvent, Sent, Violation};
use nginx_ws_fuzz::frame::Opcode;
use nginx_ws_fuzz::support::{first_refused, flow_from, frames, match_input, peer_frames, Conn};

/// Verdicts from a script, one per message asked about, with the clock they were given at.
struct Script<'a> {
    bytes: &'a [u8],
    now: u64,
    asked: Vec<Admission>,
}

impl Admit for Script<'_> {
    fn admit(&mut self) -> Admission {
        let b = self.bytes[self.asked.len() % self.bytes.len()];
        let a = match b & 3 {
            2 => Admission::Hold(self.now + u64::from(b >> 2)),
            3 => Admission::Refuse,
            _ => Admission::Pass,
        };
        self.asked.push(a);
        a
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 18 {
        return;
    }
    let (head, input) = data.split_at(18);
    let (mut flow, policy) = flow_from(head[..7].try_into().expect("seven bytes"));
    flow.limit_messages();
    let read = usize::from(head[7]).max(1);
    // When (input bytes read) the proxy closes, and when the receiving peer's Close lifts the
    // limits; 0: never.
    let close_at = usize::from(head[8]) * 8;
    let lift_at = usize::from(head[9]) * 8;
    let mut conn = Conn::new(&head[10..12]);
    let written = conn.written.clone();
    let clock = conn.now.clone();
    let mut script = Script {
        bytes: &head[12..18],
        now: 0,
        asked: Vec::new(),
    };
    let mut proxy_ends = Vec::new();
    // Where the output was when the limits were lifted.
    let mut lifted: Option<usize> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(input.len());
    let (mut pos, mut got) = (0, 0);
    let mut spins = 0;
    while got < input.len() || pos < buf.len() || flow.has_pending() {
        if got < input.len() {
            let n = read.min(input.len() - got);
            buf.extend_from_slice(&input[got..got + n]);
            got += n;
            if got >= close_at && head[8] != 0 {
                flow.request_close(1001, "idle timeout");
            }
            if got >= lift_at && head[9] != 0 && lifted.is_none() {
                lifted = Some(conn.out.len());
                flow.lift_limits();
            }
        }
        let mut on = |e: FlowEvent<'_>| {
            if let FlowEvent::Proxy { .. } = e {
                proxy_ends.push(written.get());
            }
        };
        script.now = clock.get();
        let sent = flow.send_limited(&buf[pos..], &mut conn, &mut on, &mut script);
        match sent {
            Sent::Consumed(n) => pos += n,
            Sent::Again => {}
            Sent::Error => unreachable!(),
        }
        if let Some(t) = flow.held_until() {
            assert!(
                flow.limited(),
                "a message is held after the limits were lifted"
            );
            if flow.stopped() {
                // The tunnel's timer: wakes the direction when the message's time comes.
                clock.set(clock.get().max(t));
                assert!(
                    flow.release(clock.get()),
                    "a held message not released at its time"
                );
            }
        }
        spins += 1;
        if spins > 100_000 {
            panic!("no progress");
        }
    }
    let (out, whole, _) = frames(&conn.out);
    let (inp, input_whole, headers) = frames(input);
    assert!(whole || !input_whole, "output ends inside a frame");

    // Each message asked about once, in order: never more than the input's messages.
    let starts: Vec<usize> = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| matches!(h.opcode, Opcode::Text | Opcode::Binary))
        .map(|(i, _)| i)
        .collect();
    // A message whose header is not all there yet is asked about at its first byte.
    let end: u64 = headers
        .iter()
        .map(|h| u64::from(h.header_len).saturating_add(h.len))
        .fold(0, u64::saturating_add);
    let partial = usize::try_from(end)
        .ok()
        .and_then(|e| input.get(e))
        .is_some_and(|b| matches!(b & 0x0f, 1 | 2));
    assert!(
        script.asked.len() <= starts.len() + usize::from(partial),
        "asked about more messages than were sent"
    );

    let refused = first_refused(&headers, &policy);
    let peer = peer_frames(&out, &proxy_ends);
    let matched = match_input(&inp, &peer, refused, b"ngx-ws-ping-1");

    // The message number of every input frame that starts a message.
    let message_of = |frame: usize| starts.iter().position(|&s| s == frame);
    for (k, &i) in matched.iter().enumerate() {
        let Some(m) = message_of(i) else { continue };
        let start = peer[k].start;
        if lifted.is_some_and(|at| start >= at) {
            // After the limits were lifted: no more asking, holding or refusing.
            continue;
        }
        assert!(
            m < script.asked.len(),
            "a message passed that was never asked about"
        );
        match script.asked[m] {
            Admission::Hold(t) => {
                assert!(
                    conn.time_of(start) >= t,
                    "a held message went before its time"
                )
            }
            Admission::Refuse => panic!("a refused message reached the connection"),
            _ => {}
        }
    }
    if flow.violation == Some(Violation::RateLimited) {
        // The refused message is the first one asked about with Refuse; nothing from it on.
        let m = script
            .asked
            .iter()
            .position(|a| *a == Admission::Refuse)
            .expect("rate limited without a refusal");
        assert!(
            // (A message whose header never came whole has no frame in the input's list.)
            matched
                .iter()
                .all(|&i| starts.get(m).is_none_or(|&s| i < s)),
            "frames at or after a refused message reached the connection"
        );
        assert!(flow.closed, "a refusal did not close the direction");
    }
});
