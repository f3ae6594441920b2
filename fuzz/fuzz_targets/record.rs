//! Records built from any payload bytes and flags are valid single-line JSON with the fields
//! the specification lists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nginx_ws_fuzz::frame::Opcode;
use nginx_ws_fuzz::record::{
    serde_line, FrameRecord, From, Ident, Line, MessageRecord, OpcodeField, PayloadField,
    TimeText,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, payload) = data.split_at(4);
    let text = head[0] & 1 == 1;
    let truncated = head[0] & 2 == 2;
    let p = PayloadField {
        text,
        bytes: payload,
        truncated,
    };
    let reason = String::from_utf8_lossy(payload);
    let time = TimeText::new(1_795_471_200, u32::from(head[1]));
    let rec = FrameRecord {
        time,
        event: "frame",
        conn: u64::from(head[1]),
        request_id: None,
        from: From::Client,
        opcode: OpcodeField(Opcode::from_u8(head[2])),
        fin: head[3] & 1 == 1,
        rsv1: head[3] & 2 == 2,
        rsv2: head[3] & 4 == 4,
        rsv3: head[3] & 8 == 8,
        masked: true,
        len: payload.len() as u64,
        payload: Some(p),
        payload_truncated: Some(truncated),
        code: Some(u16::from(head[1])),
        reason: Some(&reason),
        ident: None,
    };
    let mut out = Vec::new();
    rec.write_line(&mut out).unwrap();
    // The hand-written line is byte for byte serde's.
    let mut by_serde = Vec::new();
    serde_line(&mut by_serde, &rec).unwrap();
    assert_eq!(out, by_serde);
    // With the tunnel's pre-rendered conn and request_id, the same line.
    let ident = Ident::new(rec.conn, rec.request_id);
    out.clear();
    FrameRecord { ident: Some(&ident), ..rec }.write_line(&mut out).unwrap();
    assert_eq!(out, by_serde);
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["event"], "frame");
    assert!(v["payload"].is_string());
    if !text {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap())
            .unwrap();
        assert_eq!(b, payload);
    } else if !truncated {
        assert_eq!(
            v["payload"].as_str().unwrap(),
            String::from_utf8_lossy(payload)
        );
    }
    let m = MessageRecord {
        time,
        event: "message",
        conn: 1,
        request_id: Some(&reason),
        from: From::Upstream,
        kind: "text",
        len: payload.len() as u64,
        frames: 1,
        compressed: false,
        payload: Some(p),
        payload_truncated: Some(truncated),
        inflated_len: Some(payload.len() as u64),
        inflate_error: Some(&reason),
        ident: None,
    };
    out.clear();
    m.write_line(&mut out).unwrap();
    by_serde.clear();
    serde_line(&mut by_serde, &m).unwrap();
    assert_eq!(out, by_serde);
    let ident = Ident::new(m.conn, m.request_id);
    out.clear();
    MessageRecord { ident: Some(&ident), ..m }.write_line(&mut out).unwrap();
    assert_eq!(out, by_serde);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["request_id"].as_str().unwrap(), reason);
});
