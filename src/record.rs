//! JSON log records (one object per line), built with serde from borrowed data.
//!
//! Pure Rust: the tunnel glue fills these structs and `log.rs` writes the bytes. Fields that do
//! not apply are `null`, never left out, except `rsv1`..`rsv3`, which appear only when set.

use base64::Engine as _;
use serde::{Serialize, Serializer};

use crate::frame::Opcode;

/// The fields every record starts with.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    /// RFC 3339 UTC with milliseconds, see [`format_time`].
    pub time: &'a str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
}

/// Which peer sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum From {
    Client,
    Upstream,
    Proxy,
}

impl From {
    pub fn as_str(self) -> &'static str {
        match self {
            From::Client => "client",
            From::Upstream => "upstream",
            From::Proxy => "proxy",
        }
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    Normal,
    IdleTimeout,
    MaxLifetime,
    PingTimeout,
    Drain,
    TooBig,
    ProtocolError,
    ClientAbort,
    UpstreamAbort,
    UpstreamTimeout,
    Error,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Normal => "normal",
            End::IdleTimeout => "idle_timeout",
            End::MaxLifetime => "max_lifetime",
            End::PingTimeout => "ping_timeout",
            End::Drain => "drain",
            End::TooBig => "too_big",
            End::ProtocolError => "protocol_error",
            End::ClientAbort => "client_abort",
            End::UpstreamAbort => "upstream_abort",
            End::UpstreamTimeout => "upstream_timeout",
            End::Error => "error",
        }
    }
}

/// An opcode as logged: its name, or the number for reserved ones.
#[derive(Debug, Clone, Copy)]
pub struct OpcodeField(pub Opcode);

impl Serialize for OpcodeField {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.name() {
            Some(name) => s.serialize_str(name),
            None => s.serialize_u8(self.0.as_u8()),
        }
    }
}

/// A captured payload: text as a JSON string (invalid UTF-8 replaced), binary as base64.
#[derive(Debug, Clone, Copy)]
pub struct PayloadField<'a> {
    pub text: bool,
    pub bytes: &'a [u8],
    /// The capture stopped before the payload's end: a multi-byte character cut in two at the
    /// end is dropped rather than shown as a replacement character.
    pub truncated: bool,
}

impl Serialize for PayloadField<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.text {
            let mut bytes = self.bytes;
            if self.truncated {
                if let Err(e) = std::str::from_utf8(bytes) {
                    if e.error_len().is_none() {
                        bytes = &bytes[..e.valid_up_to()];
                    }
                }
            }
            s.serialize_str(&String::from_utf8_lossy(bytes))
        } else {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.bytes))
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Serialize)]
pub struct OpenRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub uri: &'a str,
    pub host: Option<&'a str>,
    pub client: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub route: Option<&'a str>,
    pub upstream_name: Option<&'a str>,
    pub subprotocol: Option<&'a str>,
    pub extensions: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct FrameRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub from: From,
    pub opcode: OpcodeField,
    pub fin: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv1: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv2: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub rsv3: bool,
    pub masked: bool,
    pub len: u64,
    pub payload: Option<PayloadField<'a>>,
    pub payload_truncated: Option<bool>,
    pub code: Option<u16>,
    pub reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct MessageRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub from: From,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub len: u64,
    pub frames: u64,
    pub compressed: bool,
    pub payload: Option<PayloadField<'a>>,
    pub payload_truncated: Option<bool>,
}

/// Per-side totals in a `close` record.
#[derive(Debug, Serialize)]
pub struct SideRecord<'a> {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    pub close_code: Option<u16>,
    pub close_reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct CloseRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub duration_ms: u64,
    pub client: SideRecord<'a>,
    pub upstream: SideRecord<'a>,
    pub closed_by: From,
    pub end: End,
}

/// A request the module refused (`ws_route`, `ws_allow_origin`, `ws_handshake`).
#[derive(Debug, Serialize)]
pub struct RejectRecord<'a> {
    pub time: &'a str,
    pub event: &'static str,
    pub conn: u64,
    pub request_id: Option<&'a str>,
    pub uri: &'a str,
    pub status: u16,
    pub reason: &'a str,
}

/// Formats seconds and milliseconds since the epoch as `2026-11-23T22:00:00.123Z`.
pub fn format_time(sec: i64, msec: u32) -> String {
    let days = sec.div_euclid(86_400);
    let rem = sec.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        msec.min(999)
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Serializes `record` as one line (with the trailing newline) into `out`.
pub fn write_line<T: Serialize>(out: &mut Vec<u8>, record: &T) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    out.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn time_format() {
        assert_eq!(format_time(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_time(1_795_471_200, 123), "2026-11-23T22:00:00.123Z");
        assert_eq!(format_time(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
    }

    fn frame(payload: Option<PayloadField<'_>>, rsv1: bool) -> Value {
        let r = FrameRecord {
            time: "t",
            event: "frame",
            conn: 7,
            request_id: Some("abc"),
            from: From::Client,
            opcode: OpcodeField(Opcode::Text),
            fin: true,
            rsv1,
            rsv2: false,
            rsv3: false,
            masked: true,
            len: 5,
            payload,
            payload_truncated: payload.map(|p| p.truncated),
            code: None,
            reason: None,
        };
        let mut out = Vec::new();
        write_line(&mut out, &r).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn frame_record_fields() {
        let v = frame(None, false);
        assert_eq!(v["event"], "frame");
        assert_eq!(v["from"], "client");
        assert_eq!(v["opcode"], "text");
        assert!(v.get("rsv1").is_none());
        assert!(v["payload"].is_null());
        assert!(v.as_object().unwrap().contains_key("code"));
        let v = frame(
            Some(PayloadField {
                text: true,
                bytes: b"h\xc3",
                truncated: true,
            }),
            true,
        );
        assert_eq!(v["rsv1"], true);
        assert_eq!(v["payload"], "h");
        assert_eq!(v["payload_truncated"], true);
    }

    #[test]
    fn payload_encodings() {
        let bin = PayloadField {
            text: false,
            bytes: &[0, 255, 1],
            truncated: false,
        };
        assert_eq!(serde_json::to_string(&bin).unwrap(), "\"AP8B\"");
        let bad = PayloadField {
            text: true,
            bytes: b"a\xffb\"",
            truncated: false,
        };
        assert_eq!(serde_json::to_string(&bad).unwrap(), "\"a\u{fffd}b\\\"\"");
        assert_eq!(
            serde_json::to_string(&OpcodeField(Opcode::Reserved(11))).unwrap(),
            "11"
        );
    }

    #[test]
    fn reject_record_shape() {
        let r = RejectRecord {
            time: "t",
            event: "reject",
            conn: 3,
            request_id: None,
            uri: "/chat",
            status: 403,
            reason: "origin",
        };
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "reject");
        assert_eq!(v["status"], 403);
        assert_eq!(v["reason"], "origin");
        assert_eq!(v["uri"], "/chat");
        assert!(v.as_object().unwrap().contains_key("request_id"));
    }

    #[test]
    fn close_record_shape() {
        let r = CloseRecord {
            time: "t",
            event: "close",
            conn: 1,
            request_id: None,
            duration_ms: 1500,
            client: SideRecord {
                frames: 3,
                messages: 2,
                bytes: 10,
                close_code: Some(1000),
                close_reason: Some("bye"),
            },
            upstream: SideRecord {
                frames: 1,
                messages: 0,
                bytes: 2,
                close_code: None,
                close_reason: None,
            },
            closed_by: From::Client,
            end: End::ClientAbort,
        };
        let v: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["end"], "client_abort");
        assert_eq!(v["closed_by"], "client");
        assert_eq!(v["client"]["close_code"], 1000);
        assert!(v["upstream"]["close_reason"].is_null());
        assert!(v["request_id"].is_null());
        assert_eq!(End::UpstreamTimeout.as_str(), "upstream_timeout");
    }
}
