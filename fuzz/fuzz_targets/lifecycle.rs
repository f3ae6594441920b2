//! The tunnel lifecycle under any sequence of events and clock steps: a due deadline is always
//! acted on, the proxy orders a close at most once and sends no Ping after it, a closing tunnel
//! ends by `ws_close_timeout`, `next_deadline` never lies in the past of what `on_tick` waits
//! for, and nothing panics (overflowing clocks included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::flow::{Rule, Violation};
use nginx_ws_fuzz::lifecycle::{EndFacts, Handshake, Lifecycle, Tick, Timers};
use nginx_ws_fuzz::record::{End, From};

fn u16_at(data: &[u8], i: usize) -> u64 {
    u64::from(u16::from_le_bytes([
        data.get(i).copied().unwrap_or(0),
        data.get(i + 1).copied().unwrap_or(0),
    ]))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let timers = Timers {
        idle: u16_at(data, 0) % 4000,
        lifetime: u16_at(data, 2) % 8000,
        ping: u16_at(data, 4) % 2000,
        pong: 1 + u16_at(data, 6) % 1000,
        close: 1 + u16_at(data, 8) % 2000,
        drain: u16_at(data, 10) % 3000,
    };
    let mut now: u64 = 1000;
    let mut l = Lifecycle::new(timers, now);
    let mut hs = Handshake::default();
    let mut closes = 0;
    for pair in data[12..].chunks(2) {
        let op = pair[0];
        let arg = u64::from(pair.get(1).copied().unwrap_or(0));
        match op % 12 {
            0 => now += arg * 17,
            1 => l.data(now),
            2 => l.client_bytes(now),
            3 => l.pong(),
            4 => l.peer_closed(if arg % 2 == 0 { From::Client } else { From::Upstream }),
            5 => {
                l.drain_soon(now, arg * 31);
            }
            6 => {
                let v = if arg % 2 == 0 {
                    Violation::TooBig
                } else {
                    Violation::Protocol(Rule::ALL[(arg as usize / 2) % Rule::ALL.len()])
                };
                if l.refused(now, From::Client, v).is_some() {
                    closes += 1;
                }
            }
            7 => hs.to_client_written = true,
            8 => hs.to_upstream_written = true,
            9 => {
                hs.client_closed = true;
                hs.upstream_closed = arg % 2 == 0;
            }
            10 => hs.pending = arg % 2 == 0,
            _ => {
                let was = l.closing();
                match l.on_tick(now, &hs) {
                    Tick::Close(_) => {
                        assert!(was.is_none());
                        closes += 1;
                    }
                    Tick::Ping(p) => {
                        assert!(was.is_none());
                        assert!(p.starts_with(b"ngx-ws-ping-"));
                    }
                    Tick::End { answered } => {
                        let c = was.expect("end without closing");
                        assert!(answered || now - c.since >= timers.close);
                        // The end cause is the proxy's, whatever nginx says.
                        let (end, by) = l.end(EndFacts {
                            upstream_timeout: arg & 1 != 0,
                            client_timeout: arg & 2 != 0,
                            upstream_gone: arg & 4 != 0,
                            client_gone: arg & 8 != 0,
                        });
                        assert_eq!((end, by), (c.end, From::Proxy));
                        assert_ne!(end, End::Normal);
                        return;
                    }
                    Tick::Flush => {
                        let c = was.expect("flush without closing");
                        assert!(now - c.since < timers.close && !hs.done());
                    }
                    Tick::Wait => {
                        if let Some(d) = l.next_deadline(now, &hs) {
                            assert!(d > now, "due at {d}, now {now}, not acted on");
                        }
                    }
                }
            }
        }
        assert!(closes <= 1);
        if let Some(c) = l.closing() {
            let d = l.next_deadline(now, &hs).expect("a closing tunnel has a deadline");
            assert!(d <= c.since + timers.close);
        }
    }
});
