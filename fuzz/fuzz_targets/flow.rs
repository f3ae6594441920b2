//! The flow shaper under any input, read split, write pattern (writes that return "again"
//! included), policy and injection moment: no panic, the output is whole frames, the peer
//! frames in it are exactly the input's first frames, none of them at or after the first frame
//! the policy refuses, and a retry after "again" always repeats the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::flow::{Event as FlowEvent, Sent};
use nginx_ws_fuzz::support::{first_refused, flow_from, frames, match_input, peer_frames, Conn};

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, input) = data.split_at(12);
    let (mut flow, policy) = flow_from(head[..7].try_into().expect("seven bytes"));
    let read = usize::from(head[7]).max(1);
    let close_at = usize::from(head[8]) * 8;
    let ping_at = usize::from(head[9]) * 8;
    let mut conn = Conn::new(&head[10..12]);
    let written = conn.written.clone();
    // Where each frame the proxy injected ended in the output.
    let mut proxy_ends = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(input.len());
    let (mut pos, mut got) = (0, 0);
    let mut spins = 0;
    while got < input.len() || pos < buf.len() || flow.has_pending() {
        if got < input.len() {
            let n = read.min(input.len() - got);
            buf.extend_from_slice(&input[got..got + n]);
            got += n;
            if got >= ping_at && got < ping_at + read {
                flow.request_ping(b"ngx-ws-ping-2".to_vec());
            }
            if got >= close_at && head[8] != 0 {
                flow.request_close(1001, "idle timeout");
            }
        }
        let mut on = |e: FlowEvent<'_>| {
            if let FlowEvent::Proxy { .. } = e {
                proxy_ends.push(written.get());
            }
        };
        match flow.send(&buf[pos..], &mut conn, &mut on) {
            Sent::Consumed(n) => pos += n,
            Sent::Again => {}
            Sent::Error => unreachable!(),
        }
        spins += 1;
        if spins > 100_000 {
            panic!("no progress");
        }
    }
    let (out, whole, _) = frames(&conn.out);
    let (inp, input_whole, headers) = frames(input);
    let refused = first_refused(&headers, &policy);
    // Input that ends inside a frame may leave the output inside that frame; whole frames in
    // give whole frames out.
    assert!(whole || !input_whole, "output ends inside a frame");
    // Peer frames in the output are the input's frames in order, minus consumed pongs.
    let peer = peer_frames(&out, &proxy_ends);
    match_input(&inp, &peer, refused, b"ngx-ws-ping-1");
});
