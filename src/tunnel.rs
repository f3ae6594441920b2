//! Per-tunnel state and the nginx glue around it: the `send` wrappers that observe the bytes
//! really written in each direction, the records they produce, and the teardown hook.
//!
//! The state lives in the request pool and is the request's module context. The original
//! `send` pointers and upstream finalizer are kept here, never in globals: connections are
//! recycled, and the wrappers find their tunnel through `c->data`, which nginx sets to the
//! request on both connections.

use core::ptr::{self, NonNull};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use ngx::core::Pool;
use ngx::ffi::{
    ngx_connection_t, ngx_current_msec, ngx_http_get_indexed_variable, ngx_http_request_t,
    ngx_int_t, ngx_msec_t, ngx_send_pt, ngx_str_t, ngx_table_elt_t, sockaddr, socklen_t, NGX_ERROR,
    NGX_HTTP_GATEWAY_TIME_OUT, NGX_HTTP_REQUEST_TIME_OUT, NGX_HTTP_SWITCHING_PROTOCOLS,
    NGX_HTTP_UPSTREAM_CREATE, NGX_HTTP_VERSION_20,
};
use ngx::http::Request;
use ngx::ngx_log_debug_http;

use crate::conf::{events, LocConf};
use crate::frame::Opcode;
use crate::log::LogFile;
use crate::observe::{Capture, Direction, Observed};
use crate::record::{
    format_time, CloseRecord, End, FrameRecord, From, MessageRecord, OpcodeField, OpenRecord,
    PayloadField, SideRecord,
};

type SendFn = unsafe extern "C" fn(*mut ngx_connection_t, *mut u8, usize) -> isize;
type FinalizeFn = Option<unsafe extern "C" fn(*mut ngx_http_request_t, ngx_int_t)>;

/// How a finished tunnel ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub closed_by: From,
    pub duration_ms: u64,
}

/// One tracked WebSocket tunnel.
pub struct Tunnel {
    client_conn: *mut ngx_connection_t,
    upstream_conn: *mut ngx_connection_t,
    client_send: ngx_send_pt,
    upstream_send: ngx_send_pt,
    finalize: FinalizeFn,
    /// Frames the client sent (observed on the upstream connection's `send`).
    pub client: Direction,
    /// Frames the upstream sent (observed on the client connection's `send`).
    pub upstream: Direction,
    log: Option<NonNull<LogFile>>,
    events: u32,
    capture: Capture,
    conn: u64,
    request_id: Option<String>,
    start: ngx_msec_t,
    first_close: Option<From>,
    pub subprotocol: Option<String>,
    pub outcome: Option<Outcome>,
}

/// Quick test, before the header goes on: could this response become a tracked tunnel?
///
/// # Safety
/// `r` must be a live request in a header filter.
pub unsafe fn wants_tunnel(r: *mut ngx_http_request_t) -> bool {
    // SAFETY: per the contract.
    let req = unsafe { &*r };
    if req.headers_out.status != NGX_HTTP_SWITCHING_PROTOCOLS as usize
        || req.upstream.is_null()
        || !ptr::eq(r, req.main)
    {
        return false;
    }
    // SAFETY: a live request is a valid ngx::http::Request.
    let request = unsafe { Request::from_ngx_http_request(r) };
    crate::loc_conf(request).is_some_and(LocConf::tracks_tunnels)
}

/// Starts tracking a tunnel at its 101, when every condition of the spec holds.
///
/// # Safety
/// `r` must be a live request whose 101 header was just passed down the filter chain.
pub unsafe fn attach(r: *mut ngx_http_request_t) {
    // SAFETY: per the contract.
    let request = unsafe { Request::from_ngx_http_request(r) };
    // SAFETY: per the contract.
    let req = unsafe { &mut *r };
    // SAFETY: checked non-null by wants_tunnel; the upstream lives as long as the request.
    let u = unsafe { &mut *req.upstream };
    if u.upgrade() == 0
        || req.http_version >= NGX_HTTP_VERSION_20 as usize
        || u.peer.connection.is_null()
        // SAFETY: header entries live in the request pool.
        || !unsafe { header_has_token(req.headers_in.upgrade, b"websocket") }
    {
        return;
    }
    let Some(lcf) = crate::loc_conf(request) else {
        return;
    };
    let log = lcf.log_file();
    // SAFETY: a request in the http module always has our main conf.
    let mcf = unsafe { crate::cycle_main_conf() };

    let extensions = find_header(&req.headers_out.headers, b"sec-websocket-extensions");
    let subprotocol = find_header(&req.headers_out.headers, b"sec-websocket-protocol");
    let capture = Capture {
        payload: lcf.payload,
        deflate: extensions.as_deref().is_some_and(|e| !e.trim().is_empty()),
    };
    let request_id = mcf.and_then(|m| {
        // SAFETY: the index was obtained at configuration time for this cycle.
        let v = unsafe { ngx_http_get_indexed_variable(r, m.request_id_index as _) };
        // SAFETY: nginx returns null or a valid value in the request pool.
        let v = unsafe { v.as_ref()? };
        if v.not_found() != 0 {
            return None;
        }
        // SAFETY: a found value has `len` bytes at `data`.
        let b = unsafe { core::slice::from_raw_parts(v.data, v.len() as usize) };
        Some(String::from_utf8_lossy(b).into_owned())
    });

    let client_conn = req.connection;
    let upstream_conn = u.peer.connection;
    // SAFETY: both connections are live for the request's lifetime.
    let (conn, client_send, upstream_send) = unsafe {
        (
            (*client_conn).number as _,
            (*client_conn).send,
            (*upstream_conn).send,
        )
    };

    let tunnel = Tunnel {
        client_conn,
        upstream_conn,
        client_send,
        upstream_send,
        finalize: u.finalize_request,
        client: Direction::new(),
        upstream: Direction::new(),
        log,
        events: lcf.events,
        capture,
        conn,
        request_id,
        start: ngx_current_msec_now(),
        first_close: None,
        subprotocol: subprotocol.clone(),
        outcome: None,
    };
    let pool: Pool = request.pool();
    let t = pool.allocate(tunnel);
    if t.is_null() {
        return;
    }
    request.set_module_ctx(t.cast(), crate::module());

    // SAFETY: the connections and upstream are live; the originals are kept in the tunnel,
    // which outlives both wrappers (they are restored in `finish`).
    unsafe {
        (*client_conn).send = Some(ngx_http_ws_send_client);
        (*upstream_conn).send = Some(ngx_http_ws_send_upstream);
        u.finalize_request = Some(ngx_http_ws_finalize);
    }
    ngx_log_debug_http!(request, "ws: tracking tunnel");

    // SAFETY: just allocated, owned by the request pool.
    let t = unsafe { &mut *t };
    if t.events & events::OPEN != 0 {
        let uri = String::from_utf8_lossy(req.uri.as_bytes()).into_owned();
        let host = non_empty(&req.headers_in.server);
        // SAFETY: the connection's address fields are set for accepted connections.
        let client = unsafe { addr_text((*client_conn).sockaddr, (*client_conn).socklen) };
        let upstream = if u.peer.sockaddr.is_null() {
            // SAFETY: peer.name points to a string in configuration or request memory.
            unsafe { u.peer.name.as_ref() }.and_then(non_empty)
        } else {
            addr_text(u.peer.sockaddr, u.peer.socklen)
        };
        // SAFETY: u->upstream is the upstream{} configuration, when there is one.
        let upstream_name = unsafe { u.upstream.as_ref() }
            .filter(|us| us.flags & NGX_HTTP_UPSTREAM_CREATE as usize != 0)
            .and_then(|us| non_empty(&us.host));
        let time = now_text();
        let rec = OpenRecord {
            time: &time,
            event: "open",
            conn: t.conn,
            request_id: t.request_id.as_deref(),
            uri: &uri,
            host: host.as_deref(),
            client: client.as_deref(),
            upstream: upstream.as_deref(),
            route: None,
            upstream_name: upstream_name.as_deref(),
            subprotocol: subprotocol.as_deref(),
            extensions: extensions.as_deref(),
        };
        if let Some(mut lf) = t.log {
            // SAFETY: LogFiles live in the configuration pool, which outlives requests.
            unsafe { lf.as_mut() }.write(&rec);
        }
    }
}

fn ngx_current_msec_now() -> ngx_msec_t {
    // SAFETY: nginx's cached clock, updated by the event loop in this thread.
    unsafe { ngx_current_msec }
}

fn now_text() -> String {
    let tp = ngx::ffi::ngx_timeofday();
    format_time(tp.sec, tp.msec as u32)
}

fn non_empty(s: &ngx_str_t) -> Option<String> {
    if s.len == 0 || s.data.is_null() {
        None
    } else {
        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
    }
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
///
/// # Safety
/// `h` must be null or a valid header entry.
unsafe fn header_has_token(h: *mut ngx_table_elt_t, token: &[u8]) -> bool {
    // SAFETY: per the contract.
    let Some(h) = (unsafe { h.as_ref() }) else {
        return false;
    };
    h.value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The value of the first header called `name` (lowercase) in a headers list.
fn find_header(list: &ngx::ffi::ngx_list_t, name: &[u8]) -> Option<String> {
    // SAFETY: the list is a request's headers list, of ngx_table_elt_t in the request pool.
    for (key, value) in unsafe { ngx::http::list_iterator(list) } {
        if key.as_bytes().eq_ignore_ascii_case(name) {
            return Some(String::from_utf8_lossy(value.as_bytes()).into_owned());
        }
    }
    None
}

/// `address:port` of a socket address (`[v6]:port` for IPv6).
fn addr_text(sa: *mut sockaddr, len: socklen_t) -> Option<String> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: nginx's sockaddr pointers are valid for `len` bytes; the family says which type.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
                let s = &*sa.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(s.sin_port))).to_string())
            }
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
                let s = &*sa.cast::<libc::sockaddr_in6>();
                let ip = Ipv6Addr::from(s.sin6_addr.s6_addr);
                let a = SocketAddrV6::new(ip, u16::from_be(s.sin6_port), 0, s.sin6_scope_id);
                Some(SocketAddr::V6(a).to_string())
            }
            libc::AF_UNIX => Some("unix:".to_string()),
            _ => None,
        }
    }
}

/// The tunnel a tunnel connection belongs to.
///
/// # Safety
/// `c` must be one of a tracked tunnel's two connections (its `data` is the request).
unsafe fn tunnel_of<'a>(c: *mut ngx_connection_t) -> Option<&'a mut Tunnel> {
    // SAFETY: per the contract, c->data is the request; its main request holds our context.
    unsafe {
        let r = (*c).data.cast::<ngx_http_request_t>().as_ref()?;
        let main = r.main.as_ref()?;
        let ctx = *main.ctx.add(crate::module().ctx_index);
        ctx.cast::<Tunnel>().as_mut()
    }
}

/// `send` of the client connection: upstream -> client bytes.
unsafe extern "C" fn ngx_http_ws_send_client(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's client connection.
    let Some(t) = (unsafe { tunnel_of(c) }) else {
        return NGX_ERROR as isize;
    };
    let Some(send) = t.client_send else {
        return NGX_ERROR as isize;
    };
    // SAFETY: nginx's own send with nginx's arguments.
    let n = unsafe { send(c, buf, size) };
    if n > 0 {
        // SAFETY: the original send wrote the first n bytes of buf.
        let written = unsafe { core::slice::from_raw_parts(buf, n as usize) };
        t.observe(From::Upstream, written);
    }
    n
}

/// `send` of the upstream connection: client -> upstream bytes.
unsafe extern "C" fn ngx_http_ws_send_upstream(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's upstream connection.
    let Some(t) = (unsafe { tunnel_of(c) }) else {
        return NGX_ERROR as isize;
    };
    let Some(send) = t.upstream_send else {
        return NGX_ERROR as isize;
    };
    // SAFETY: nginx's own send with nginx's arguments.
    let n = unsafe { send(c, buf, size) };
    if n > 0 {
        // SAFETY: the original send wrote the first n bytes of buf.
        let written = unsafe { core::slice::from_raw_parts(buf, n as usize) };
        t.observe(From::Client, written);
    }
    n
}

/// Replaces the upstream module's `finalize_request`: the tunnel is over.
unsafe extern "C" fn ngx_http_ws_finalize(r: *mut ngx_http_request_t, rc: ngx_int_t) {
    // SAFETY: installed only on tracked requests; nginx passes the live main request.
    let t = unsafe {
        let ctx = *(*r).ctx.add(crate::module().ctx_index);
        ctx.cast::<Tunnel>().as_mut()
    };
    let Some(t) = t else { return };
    let finalize = t.finalize;
    // SAFETY: called by ngx_http_upstream_finalize_request before the upstream connection is
    // closed, so both connections are still live.
    unsafe { t.finish(r, rc) };
    if let Some(f) = finalize {
        // SAFETY: the upstream module's own finalizer with nginx's arguments.
        unsafe { f(r, rc) };
    }
}

impl Tunnel {
    /// Feeds bytes one side sent and the proxy really wrote to the other.
    fn observe(&mut self, from: From, data: &[u8]) {
        let want = self.events & (events::FRAME | events::MESSAGE);
        let Tunnel {
            client,
            upstream,
            log,
            capture,
            conn,
            request_id,
            first_close,
            ..
        } = self;
        let dir = match from {
            From::Upstream => upstream,
            _ => client,
        };
        let had_close = dir.close_sent;
        let lf = if want != 0 { *log } else { None };
        let mut time: Option<String> = None;
        dir.feed(data, *capture, |obs| {
            let Some(mut lf) = lf else { return };
            // SAFETY: LogFiles live in the configuration pool, which outlives requests.
            let lf = unsafe { lf.as_mut() };
            let time = time.get_or_insert_with(now_text);
            match obs {
                Observed::Frame(f) if want & events::FRAME != 0 => {
                    let h = f.header;
                    let payload = f.payload.map(|bytes| PayloadField {
                        text: f.message_kind == Some(Opcode::Text),
                        bytes,
                        truncated: f.truncated,
                    });
                    lf.write(&FrameRecord {
                        time,
                        event: "frame",
                        conn: *conn,
                        request_id: request_id.as_deref(),
                        from,
                        opcode: OpcodeField(h.opcode),
                        fin: h.fin,
                        rsv1: h.rsv1,
                        rsv2: h.rsv2,
                        rsv3: h.rsv3,
                        masked: h.mask.is_some(),
                        len: h.len,
                        payload,
                        payload_truncated: payload.map(|p| p.truncated),
                        code: f.close_code,
                        reason: f.close_reason.as_deref(),
                    });
                }
                Observed::Message(m) if want & events::MESSAGE != 0 => {
                    let captured = capture.payload > 0 && !m.compressed;
                    let payload = captured.then_some(PayloadField {
                        text: m.kind == Opcode::Text,
                        bytes: &m.payload,
                        truncated: m.truncated,
                    });
                    lf.write(&MessageRecord {
                        time,
                        event: "message",
                        conn: *conn,
                        request_id: request_id.as_deref(),
                        from,
                        kind: if m.kind == Opcode::Text {
                            "text"
                        } else {
                            "binary"
                        },
                        len: m.len,
                        frames: m.frames,
                        compressed: m.compressed,
                        payload,
                        payload_truncated: payload.map(|p| p.truncated),
                    });
                }
                _ => {}
            }
        });
        if !had_close && dir.close_sent && first_close.is_none() {
            *first_close = Some(from);
        }
    }

    /// The tunnel ends: decide why, restore nginx's pointers, write the close record.
    ///
    /// # Safety
    /// Both connections must still be live (called from the upstream finalizer).
    unsafe fn finish(&mut self, r: *mut ngx_http_request_t, rc: ngx_int_t) {
        if self.outcome.is_some() {
            return;
        }
        // SAFETY: per the contract.
        let (cc, uc) = unsafe { (&mut *self.client_conn, self.upstream_conn.as_mut()) };
        // SAFETY: connection events are live with their connections.
        let (c_read, c_write) = unsafe { (&*cc.read, &*cc.write) };
        let client_gone = c_read.eof() != 0 || c_read.error() != 0 || c_write.error() != 0;
        let (upstream_gone, upstream_timedout) = match uc.as_deref() {
            // SAFETY: as above.
            Some(u) => unsafe {
                let (ur, uw) = (&*u.read, &*u.write);
                (
                    ur.eof() != 0 || ur.error() != 0 || uw.error() != 0,
                    ur.timedout() != 0 || uw.timedout() != 0,
                )
            },
            None => (false, false),
        };
        let (end, closed_by) = if let Some(first) = self.first_close {
            (End::Normal, first)
        } else if rc == NGX_HTTP_GATEWAY_TIME_OUT as ngx_int_t || upstream_timedout {
            (End::UpstreamTimeout, From::Proxy)
        } else if rc == NGX_HTTP_REQUEST_TIME_OUT as ngx_int_t {
            (End::Error, From::Proxy)
        } else if upstream_gone {
            (End::UpstreamAbort, From::Upstream)
        } else if client_gone {
            (End::ClientAbort, From::Client)
        } else {
            (End::Error, From::Proxy)
        };
        let duration_ms = ngx_current_msec_now().wrapping_sub(self.start) as u64;
        self.outcome = Some(Outcome {
            end,
            closed_by,
            duration_ms,
        });

        // Give nginx its pointers back; a recycled connection must never reach a wrapper.
        if cc
            .send
            .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_send_client as SendFn))
        {
            cc.send = self.client_send;
        }
        if let Some(u) = uc {
            if u.send
                .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_send_upstream as SendFn))
            {
                u.send = self.upstream_send;
            }
        }

        if self.events & events::CLOSE != 0 {
            let time = now_text();
            let rec = CloseRecord {
                time: &time,
                event: "close",
                conn: self.conn,
                request_id: self.request_id.as_deref(),
                duration_ms,
                client: side(&self.client),
                upstream: side(&self.upstream),
                closed_by,
                end,
            };
            if let Some(mut lf) = self.log {
                // SAFETY: LogFiles live in the configuration pool.
                unsafe { lf.as_mut() }.write(&rec);
            }
        }
        if let Some(mut lf) = self.log {
            // SAFETY: as above.
            unsafe { lf.as_mut() }.flush_buffer();
        }
        let _ = r;
    }

    /// The close code and reason that ended the tunnel: the closing side's.
    pub fn close_code_reason(&self) -> (Option<u16>, Option<&str>) {
        let d = match self.outcome.map(|o| o.closed_by) {
            Some(From::Client) => &self.client,
            Some(From::Upstream) => &self.upstream,
            _ => return (None, None),
        };
        (d.close_code, d.close_reason.as_deref())
    }
}

fn side(d: &Direction) -> SideRecord<'_> {
    SideRecord {
        frames: d.frames,
        messages: d.messages,
        bytes: d.bytes,
        close_code: d.close_code,
        close_reason: d.close_reason.as_deref(),
    }
}

/// The tunnel of a request, if it was one.
pub fn of_request(r: &Request) -> Option<&Tunnel> {
    r.get_module_ctx::<Tunnel>(crate::module())
}
