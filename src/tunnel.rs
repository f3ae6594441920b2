//! Per-tunnel state and the nginx glue around it: the `send` wrappers that shape and observe the
//! bytes really written in each direction, the records they produce, the frame-aware timers,
//! and teardown.
//!
//! The state lives in the request pool and is the request's module context. The original
//! `send` pointers and upstream finalizer are kept here, never in globals: connections are
//! recycled, and the wrappers find their tunnel through `c->data`, which nginx sets to the
//! request on both connections.

use core::ffi::c_void;
use core::mem::{align_of, size_of};
use core::ptr::{self, NonNull};

use ngx::ffi::{
    ngx_add_timer, ngx_connection_t, ngx_current_msec, ngx_del_timer, ngx_delete_posted_event,
    ngx_event_t, ngx_http_request_t, ngx_int_t, ngx_msec_t, ngx_pmemalign, ngx_pool_cleanup_t,
    ngx_pool_t, ngx_post_event, ngx_posted_events, ngx_random, ngx_recv_pt, ngx_send_pt, NGX_AGAIN,
    NGX_ERROR, NGX_HTTP_GATEWAY_TIME_OUT, NGX_HTTP_REQUEST_TIME_OUT, NGX_HTTP_SWITCHING_PROTOCOLS,
    NGX_HTTP_UPSTREAM_CREATE, NGX_HTTP_VERSION_20, NGX_LOG_INFO,
};
use ngx::http::Request;

use ngx::{ngx_log_debug_http, ngx_log_error};

use crate::conf::{events, LocConf};
use crate::flow::{Admission, Admit, Event, Flow, Policy, Sent, Sink, Violation, Write};
use crate::frame::Opcode;
use crate::http::{addr_text, find_header, non_empty};
use crate::inflate::{self, Extensions, InflateError};
use crate::lifecycle::{CloseOrder, EndFacts, Handshake, Lifecycle, Msec, Tick, Timers};
use crate::limit::Limiter;
use crate::observe::{Capture, Direction, Inflate, Observed, Unread, Whole};
use crate::record::{
    brief_frame_line, frame_line, CloseRecord, End, FrameRecord, From, Ident, MessageRecord,
    OpcodeField, OpenRecord, PayloadField, SideRecord,
};
use crate::sink::LogSet;
use crate::status::{self, Slot};

type SendFn = unsafe extern "C" fn(*mut ngx_connection_t, *mut u8, usize) -> isize;
type RecvFn = SendFn;
type FinalizeFn = Option<unsafe extern "C" fn(*mut ngx_http_request_t, ngx_int_t)>;

/// How a finished tunnel ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub closed_by: From,
    pub duration_ms: u64,
}

/// Where records go and what they carry in common.
struct Recorder {
    /// The `ws_log`s whose `if=` passed when the tunnel opened.
    logs: LogSet<'static>,
    events: u32,
    conn: u64,
    /// `$request_id`, in the request pool: read when the tunnel opens only if a record written
    /// then needs it (`open`, or the `ident` of frame and message records); otherwise read
    /// when the close record is written (still `None` then), so that nginx allocates its text
    /// in the request pool when the tunnel ends, not for the tunnel's whole life.
    request_id: Option<&'static str>,
    /// `conn` and `request_id` rendered for frame and message records, when they are logged.
    ident: Option<Ident>,
    /// `ws_log_payload`.
    payload: usize,
    /// The tunnel's counters in the `ws_status_zone`.
    stats: Option<Slot>,
}

/// What [`Recorder::on`] makes of the frames of a passive tunnel.
enum Mode {
    /// Nothing: they are counted only.
    Count,
    /// Only the frame record.
    Brief,
    /// Metrics or message records: frames and messages are reported one by one.
    Events,
}

/// One tracked WebSocket tunnel.
pub struct Tunnel {
    r: *mut ngx_http_request_t,
    client_conn: *mut ngx_connection_t,
    upstream_conn: *mut ngx_connection_t,
    client_send: ngx_send_pt,
    upstream_send: ngx_send_pt,
    /// The original `recv`s, wrapped only where the proxy may close the tunnel itself.
    client_recv: ngx_recv_pt,
    upstream_recv: ngx_recv_pt,
    finalize: FinalizeFn,
    /// Client -> upstream: the client's frames, the proxy's frames to the upstream.
    pub to_upstream: Flow,
    /// Upstream -> client: the upstream's frames, the proxy's frames to the client.
    pub to_client: Flow,
    rec: Recorder,
    /// Deadlines, the proxy's close handshake, end causes (pure: ws_core::lifecycle).
    life: Lifecycle,
    pub subprotocol: Option<String>,
    pub outcome: Option<Outcome>,
    drain_index: Option<usize>,
    tick: TickEvent,
    ending: bool,
    /// The proxy never writes in this tunnel (no time directive, size limit or protocol
    /// check): nginx's writes pass straight through and are observed, without the shaping of
    /// [`Flow::send`]; frames one by one only when records or metrics read them.
    passive: bool,
    /// `ws_limit`s in force (most tunnels have none).
    limiter: Option<Box<Limiter>>,
}

/// A `ws_limit`ed direction's [`Admit`]: asks the tunnel's limiter, counts holds.
struct LimitAdmit<'a> {
    limiter: &'a mut Limiter,
    from: From,
    now: Msec,
    holds: &'a mut u32,
}

impl Admit for LimitAdmit<'_> {
    fn admit(&mut self) -> Admission {
        let a = self.limiter.admit(self.from, self.now);
        if matches!(a, Admission::Hold(_)) {
            *self.holds += 1;
        }
        a
    }
}

/// The tunnel's timer and posted event, allocated on first use: most tunnels never set a
/// timer (no time directive) and never post (only the proxy's own close handshake does).
#[derive(Default)]
struct TickEvent(Option<Box<ngx_event_t>>);

impl TickEvent {
    /// The event, created on first use for tunnel `t`, logging to `log`.
    fn event(&mut self, t: *mut Tunnel, log: *mut ngx::ffi::ngx_log_t) -> &mut ngx_event_t {
        self.0.get_or_insert_with(|| {
            // SAFETY: ngx_event_t is a plain C struct; all-zero is its initial state.
            let mut ev: Box<ngx_event_t> = Box::new(unsafe { core::mem::zeroed() });
            ev.handler = Some(ngx_http_ws_tick);
            ev.data = t.cast();
            ev.log = log;
            ev.set_cancelable(1);
            ev
        })
    }

    fn posted(&self) -> bool {
        self.0.as_ref().is_some_and(|ev| ev.posted() != 0)
    }

    /// Takes the event out of nginx's timer tree and posted queue.
    fn cancel(&mut self) {
        let Some(ev) = self.0.as_deref_mut() else {
            return;
        };
        if ev.timer_set() != 0 {
            // SAFETY: the event is in nginx's timer tree.
            unsafe { ngx_del_timer(ev) };
        }
        if ev.posted() != 0 {
            // SAFETY: the event is in the posted queue.
            unsafe { ngx_delete_posted_event(ev) };
        }
    }
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
    let request = crate::http::request(req);
    crate::conf::loc_conf(request).is_some_and(LocConf::tracks_tunnels)
        || crate::conf::main_conf_of(request).is_some_and(|m| m.status.enabled())
}

/// Starts tracking a tunnel at its 101, when every condition of the spec holds.
///
/// # Safety
/// `r` must be a live request whose 101 header was just passed down the filter chain.
pub unsafe fn attach(r: *mut ngx_http_request_t) {
    // SAFETY: per the contract. Only read through this reference; what attach writes it
    // writes into the upstream and the connections, never into the request itself.
    let req = unsafe { &*r };
    let request = crate::http::request(req);
    // SAFETY: checked non-null by wants_tunnel; the upstream lives as long as the request and
    // nothing else refers to it while the header filter runs.
    let u = unsafe { &mut *req.upstream };
    if u.upgrade() == 0
        || req.http_version >= NGX_HTTP_VERSION_20 as usize
        || u.peer.connection.is_null()
        || !crate::http::is_websocket_101(req)
    {
        return;
    }
    let Some(lcf) = crate::conf::loc_conf(request) else {
        return;
    };
    // SAFETY: a request in the http module always has our main conf.
    let mcf = unsafe { crate::conf::cycle_main_conf() };

    let extensions = find_header(&req.headers_out.headers, b"sec-websocket-extensions");
    let subprotocol = find_header(&req.headers_out.headers, b"sec-websocket-protocol");
    let logs = LogSet::select(request, lcf.logs());
    // What the chosen logs and the metrics read of the frames: the rest is not captured.
    let logged = |kind: u32| !logs.is_empty() && lcf.events() & kind != 0;
    let metrics = mcf.is_some_and(|m| m.status.enabled());
    let capture = Capture {
        payload: lcf.payload(),
        deflate: extensions.as_deref().is_some_and(|e| !e.trim().is_empty()),
        inflate: Inflate::Off,
        unread: Unread {
            frame_payload: !logged(events::FRAME),
            message_payload: !logged(events::MESSAGE),
            messages: !logged(events::MESSAGE) && !metrics,
        },
    };
    let (client_inflate, upstream_inflate) = inflation(lcf, &req.headers_out.headers);
    // `$request_id` is read now only for records written while the tunnel runs; nginx keeps
    // its text in the request pool (see `Recorder::request_id`).
    let request_id_now = !lcf.logs().is_empty()
        && lcf.events() & (events::OPEN | events::FRAME | events::MESSAGE) != 0;
    // SAFETY: the live request, with this cycle's variable index; the tunnel is dropped by a
    // cleanup of its pool, before the pool's memory (which holds the value) is freed.
    let request_id = mcf
        .filter(|_| request_id_now)
        .and_then(|m| unsafe { crate::http::request_id(r, m.request_id_index) });
    let client_conn = req.connection;
    let upstream_conn = u.peer.connection;
    // SAFETY: both connections are live for the request's lifetime.
    let (conn, client_send, upstream_send, log) = unsafe {
        (
            (*client_conn).number as _,
            (*client_conn).send,
            (*upstream_conn).send,
            (*client_conn).log,
        )
    };
    // SAFETY: as above.
    let (client_recv, upstream_recv) = unsafe { ((*client_conn).recv, (*upstream_conn).recv) };
    let policy = Policy {
        max_frame: lcf.max_frame() as u64,
        max_message: lcf.max_message() as u64,
        protocol_check: lcf.protocol_check(),
        expect_masked: true,
        rsv_allowed: rsv_allowed(extensions.as_deref()),
        max_inflated: lcf.max_inflated() as u64,
    };
    let now = now_msec();
    let timers = Timers {
        idle: lcf.idle_timeout() as Msec,
        lifetime: lcf.max_lifetime() as Msec,
        ping: lcf.ping_interval() as Msec,
        pong: lcf.pong_timeout() as Msec,
        close: lcf.close_timeout() as Msec,
        drain: lcf.drain() as Msec,
    };
    let tunnel_timed =
        timers.idle > 0 || timers.lifetime > 0 || timers.ping > 0 || timers.drain > 0;
    // SAFETY: the live request, in its header filter.
    let limiter = unsafe { Limiter::new(r, lcf, now as Msec) }.map(Box::new);
    let limit_refuses = limiter.as_deref().is_some_and(Limiter::may_refuse);

    let tunnel = Tunnel {
        r,
        client_conn,
        upstream_conn,
        client_send,
        upstream_send,
        client_recv,
        upstream_recv,
        finalize: u.finalize_request,
        to_upstream: Flow::new(
            Capture {
                inflate: client_inflate,
                ..capture
            },
            policy,
            (ngx_random() as u32) | 1,
        ),
        to_client: Flow::new(
            Capture {
                inflate: upstream_inflate,
                ..capture
            },
            Policy {
                expect_masked: false,
                ..policy
            },
            0,
        ),
        rec: Recorder {
            logs,
            events: lcf.events(),
            conn,
            request_id,
            ident: (!lcf.logs().is_empty()
                && lcf.events() & (events::FRAME | events::MESSAGE) != 0)
                .then(|| Ident::new(conn, request_id)),
            payload: lcf.payload(),
            stats: None,
        },
        life: Lifecycle::new(timers, now as Msec),
        subprotocol: subprotocol.clone(),
        outcome: None,
        drain_index: None,
        tick: TickEvent::default(),
        ending: false,
        passive: false,
        limiter,
    };
    let t = allocate_tunnel(req.pool, tunnel);
    let Some(tp) = NonNull::new(t) else {
        return;
    };
    request.set_module_ctx(t.cast(), crate::module());

    // Only time directives and the policy make the proxy write frames of its own (Pings,
    // Closes); without them it never closes a tunnel itself.
    let proxy_writes = tunnel_timed
        || policy.max_frame > 0
        || policy.max_message > 0
        || policy.protocol_check
        || policy.max_inflated > 0
        || limit_refuses;
    // SAFETY: the connections and upstream are live; the originals are kept in the tunnel,
    // which outlives both wrappers (they are restored in `finish`).
    unsafe {
        (*client_conn).send = Some(ngx_http_ws_send_client);
        (*upstream_conn).send = Some(ngx_http_ws_send_upstream);
        // When the proxy itself closes a tunnel, it waits for both peers' Close replies: a
        // peer's end of stream must not end the tunnel while the other still owes its reply.
        if proxy_writes {
            (*client_conn).recv = Some(ngx_http_ws_recv_client);
            (*upstream_conn).recv = Some(ngx_http_ws_recv_upstream);
        }
        u.finalize_request = Some(ngx_http_ws_finalize);
    }
    ngx_log_debug_http!(request, "ws: tracking tunnel");

    // SAFETY: just allocated, owned by the request pool, at its final address.
    let t = unsafe { &mut *t };
    if let Some(m) = mcf.filter(|m| m.status.enabled()) {
        // Labels come from configuration only, so that clients cannot choose them: the
        // ws_route rule ("" without routing); the ws_route upstream, else the upstream{} (or
        // proxy_pass host) nginx picked, else, for a variable address, a placeholder.
        // SAFETY: the request is live, of this cycle.
        let (route, routed) =
            unsafe { crate::http::chosen(r, m.route_index, m.upstream_index) }.unzip();
        let label = routed
            .or_else(|| upstream_label(u))
            .unwrap_or_else(|| VARIABLE_UPSTREAM.to_string());
        t.rec.stats = status::slot_for(m, route.as_deref().unwrap_or(""), &label, log);
        if let Some(s) = t.rec.stats {
            s.entry().opened();
        }
    }

    if let Some(l) = t.limiter.as_deref() {
        if l.applies(From::Client) {
            t.to_upstream.limit_messages();
        }
        if l.applies(From::Upstream) {
            t.to_client.limit_messages();
        }
    }
    // A limited direction goes through its flow; the other may still pass straight through.
    t.passive = !proxy_writes;
    if t.life.timers().drain > 0 {
        let (index, started) = crate::drain::join(tp.cast(), Tunnel::schedule_drain);
        t.drain_index = Some(index);
        if started {
            t.drain_soon(now);
        }
    }
    t.arm(now);

    let open_time = (t.rec.events & events::OPEN != 0)
        .then(|| t.rec.logs.now_text())
        .flatten();
    if let Some(time) = open_time {
        let uri = String::from_utf8_lossy(req.uri.as_bytes()).into_owned();
        let host = non_empty(&req.headers_in.server);
        // SAFETY: the connection's address fields are set for accepted connections.
        let client = unsafe { addr_text((*client_conn).sockaddr, (*client_conn).socklen) };
        let (upstream, upstream_name) = upstream_texts(u);
        // SAFETY: the request is live, of this cycle.
        let (route, routed) = mcf
            .and_then(|m| unsafe { crate::http::chosen(r, m.route_index, m.upstream_index) })
            .unzip();
        let upstream_name = routed.or(upstream_name);
        let rec = OpenRecord {
            time: time.as_str(),
            event: "open",
            conn: t.rec.conn,
            request_id: t.rec.request_id,
            uri: &uri,
            host: host.as_deref(),
            client: client.as_deref(),
            upstream: upstream.as_deref(),
            route: route.as_deref(),
            upstream_name: upstream_name.as_deref(),
            subprotocol: subprotocol.as_deref(),
            extensions: extensions.as_deref(),
        };
        t.rec.logs.write(&rec);
    }
}

/// The tunnel's memory: the tunnel and the request pool's cleanup entry that drops it.
#[repr(C)]
struct Owned {
    cleanup: ngx_pool_cleanup_t,
    tunnel: Tunnel,
}

/// Moves the tunnel into memory of its own that is dropped and freed with the request pool,
/// taking as little of the pool itself as nginx allows: 16 bytes.
///
/// The request pool grows by whole blocks (`request_pool_size`, 4 KiB by default), and by the
/// 101 a request has usually filled its first block and part of its second. Whatever the
/// module takes from the pool's blocks brings the next block sooner: 72 bytes (the tunnel's
/// cleanup entry, `ngx_pmemalign`'s record and `$request_id`) were enough to make nginx's own
/// flush buffer of the upgrade take a third block for every compressed tunnel of the benchmark
/// (a 101 with `Sec-WebSocket-Extensions` is longer): +4 KiB per tunnel. So: `ngx_pmemalign`
/// takes the memory from the heap (its 16-byte record of the allocation is the only part in
/// the pool's blocks), the cleanup entry lives in that memory instead of being allocated by
/// `ngx_pool_cleanup_add`, and `$request_id` is read late (`Recorder::request_id`).
///
/// `ngx_destroy_pool` runs the cleanups (the drop) and reads each entry's `next` before it
/// frees the heap allocations, so the entry is still there when nginx walks past it.
/// Null on failure.
fn allocate_tunnel(pool: *mut ngx_pool_t, tunnel: Tunnel) -> *mut Tunnel {
    // SAFETY: the request's live pool; size and alignment are those of `Owned`.
    let p = unsafe { ngx_pmemalign(pool, size_of::<Owned>(), align_of::<Owned>()) };
    let p = p.cast::<Owned>();
    if p.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: fresh memory, sized and aligned for an `Owned`; the pool is live and this
    // thread's; the entry is linked in as `ngx_pool_cleanup_add` links its own.
    unsafe {
        let t = &raw mut (*p).tunnel;
        ptr::write(t, tunnel);
        ptr::write(
            &raw mut (*p).cleanup,
            ngx_pool_cleanup_t {
                handler: Some(drop_tunnel),
                data: t.cast(),
                next: (*pool).cleanup,
            },
        );
        (*pool).cleanup = &raw mut (*p).cleanup;
        t
    }
}

/// Pool cleanup: drops the tunnel in place (its memory goes with the pool).
unsafe extern "C" fn drop_tunnel(data: *mut c_void) {
    // SAFETY: `data` is the tunnel written by `allocate_tunnel`, dropped only here, once.
    unsafe { ptr::drop_in_place(data.cast::<Tunnel>()) };
}

/// The upstream peer's `address:port`, and the upstream{} block's name when there is one.
fn upstream_texts(u: &ngx::ffi::ngx_http_upstream_t) -> (Option<String>, Option<String>) {
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
    (upstream, upstream_name)
}

/// The `upstream` label of a tunnel when `proxy_pass` names an address held in variables that
/// matches no `upstream {}` block: a client could otherwise choose label values.
const VARIABLE_UPSTREAM: &str = "(variable)";

/// The metrics label for the upstream nginx picked, from configuration only: the
/// `upstream {}` block's name, or the `proxy_pass` host (with its port) for an address written
/// in the configuration. `None` when the address came from variables and matched no block.
fn upstream_label(u: &ngx::ffi::ngx_http_upstream_t) -> Option<String> {
    // SAFETY: u->upstream is null or the upstream configuration nginx chose.
    let us = unsafe { u.upstream.as_ref() }?;
    let host = non_empty(&us.host)?;
    if us.flags & NGX_HTTP_UPSTREAM_CREATE as usize != 0 || us.port == 0 {
        Some(host)
    } else if host.contains(':') && !host.starts_with('[') {
        Some(format!("[{host}]:{}", us.port))
    } else {
        Some(format!("{host}:{}", us.port))
    }
}

fn now_msec() -> ngx_msec_t {
    // SAFETY: nginx's cached clock, updated by the event loop in this thread.
    unsafe { ngx_current_msec }
}

/// How the client's and the upstream's compressed messages are inflated: only where something
/// needs their bytes (payload capture in `message` records, or `ws_max_inflated_size`), and
/// only when the 101 negotiated permessage-deflate alone.
fn inflation(lcf: &LocConf, headers_out: &ngx::ffi::ngx_list_t) -> (Inflate, Inflate) {
    let capture =
        lcf.payload() > 0 && lcf.events() & events::MESSAGE != 0 && !lcf.logs().is_empty();
    if !capture && lcf.max_inflated() == 0 {
        return (Inflate::Off, Inflate::Off);
    }
    let values = crate::http::header_values(headers_out, b"sec-websocket-extensions");
    let joined = values
        .iter()
        .map(|v| String::from_utf8_lossy(v))
        .collect::<Vec<_>>()
        .join(",");
    let limit = lcf.max_inflated() as u64;
    match inflate::negotiated(&joined) {
        Extensions::None => (Inflate::Off, Inflate::Off),
        Extensions::Deflate { client, server } => (
            Inflate::On {
                stream: client,
                limit,
            },
            Inflate::On {
                stream: server,
                limit,
            },
        ),
        Extensions::Unsupported => (Inflate::Unsupported, Inflate::Unsupported),
    }
}

/// RSV bits the extensions negotiated in the 101 may use: permessage-deflate uses RSV1; for
/// any other extension the proxy cannot know, so all are allowed.
fn rsv_allowed(extensions: Option<&str>) -> u8 {
    let Some(e) = extensions else { return 0 };
    let names: Vec<&str> = e
        .split(',')
        .filter_map(|x| x.split(';').next())
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect();
    if names.is_empty() {
        0
    } else if names
        .iter()
        .all(|n| n.eq_ignore_ascii_case("permessage-deflate"))
    {
        4
    } else {
        7
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

/// A connection's original `send`, as a [`Sink`].
struct ConnSink {
    c: *mut ngx_connection_t,
    send: ngx_send_pt,
}

impl Sink for ConnSink {
    fn write(&mut self, data: &[u8]) -> Write {
        let Some(send) = self.send else {
            return Write::Error;
        };
        if data.is_empty() {
            return Write::Done(0);
        }
        // SAFETY: nginx's own send on its live connection; `data` stays valid and unchanged
        // until the write completes (our buffers, or nginx's at the same position on retry).
        let n = unsafe { send(self.c, data.as_ptr().cast_mut(), data.len()) };
        match n {
            n if n > 0 => Write::Done(n as usize),
            n if n == NGX_AGAIN as isize || n == 0 => Write::Again,
            _ => Write::Error,
        }
    }
}

/// `send` of the client connection: upstream -> client bytes.
unsafe extern "C" fn ngx_http_ws_send_client(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's client connection, called by nginx.
    unsafe { send_through(c, buf, size, From::Upstream) }
}

/// `send` of the upstream connection: client -> upstream bytes.
unsafe extern "C" fn ngx_http_ws_send_upstream(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's upstream connection, called by nginx.
    unsafe { send_through(c, buf, size, From::Client) }
}

/// # Safety
/// `c` is one of a tracked tunnel's connections; `buf` has `size` readable bytes.
unsafe fn send_through(c: *mut ngx_connection_t, buf: *mut u8, size: usize, from: From) -> isize {
    // SAFETY: per the contract.
    let Some(t) = (unsafe { tunnel_of(c) }) else {
        return NGX_ERROR as isize;
    };
    // SAFETY: per the contract.
    let data = unsafe { core::slice::from_raw_parts(buf, size) };
    t.send(from, data)
}

/// `recv` of the client connection.
unsafe extern "C" fn ngx_http_ws_recv_client(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's client connection, called by nginx.
    unsafe { recv_through(c, buf, size, From::Client) }
}

/// `recv` of the upstream connection.
unsafe extern "C" fn ngx_http_ws_recv_upstream(
    c: *mut ngx_connection_t,
    buf: *mut u8,
    size: usize,
) -> isize {
    // SAFETY: installed only on a tracked tunnel's upstream connection, called by nginx.
    unsafe { recv_through(c, buf, size, From::Upstream) }
}

/// nginx's `recv`, except that while the proxy waits for the other peer's Close reply, an end
/// of stream from `from` is held back (reported as "again"), so that nginx does not end the
/// tunnel before that reply; the tunnel's timer ends it when the reply came or after
/// `ws_close_timeout`.
///
/// # Safety
/// `c` is one of a tracked tunnel's connections; `buf` has room for `size` bytes.
unsafe fn recv_through(c: *mut ngx_connection_t, buf: *mut u8, size: usize, from: From) -> isize {
    // SAFETY: per the contract.
    let Some(t) = (unsafe { tunnel_of(c) }) else {
        return NGX_ERROR as isize;
    };
    let recv = if from == From::Client {
        t.client_recv
    } else {
        t.upstream_recv
    };
    let Some(recv) = recv else {
        return NGX_ERROR as isize;
    };
    // SAFETY: nginx's own recv with nginx's arguments.
    let n = unsafe { recv(c, buf, size) };
    if n == 0 && t.hold_eof(from) {
        ngx_log_debug_http!(
            t.request(),
            "ws: end of stream from the {} held until the close reply",
            from.as_str()
        );
        // SAFETY: the read event of a live connection; as after EAGAIN, nothing is ready.
        unsafe {
            let rev = &mut *(*c).read;
            rev.set_eof(0);
            rev.set_ready(0);
        }
        return NGX_AGAIN as isize;
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
    unsafe { t.finish(rc) };
    if let Some(f) = finalize {
        // SAFETY: the upstream module's own finalizer with nginx's arguments.
        unsafe { f(r, rc) };
    }
}

/// The tunnel's timer: idle, lifetime, ping, drain, close handshake.
unsafe extern "C" fn ngx_http_ws_tick(ev: *mut ngx_event_t) {
    // SAFETY: data was set to the tunnel, which deletes this event before it is freed.
    let t = unsafe { (*ev).data.cast::<Tunnel>() };
    // SAFETY: the tunnel is live (above); no other reference to it exists while a timer
    // handler runs, and this one ends with the call, before the tunnel may be freed.
    if unsafe { (*t).on_tick() } {
        // SAFETY: the tunnel is live and not borrowed.
        unsafe { end_tunnel(t) };
    }
}

/// Ends a tunnel from its timer, the way nginx's own shutdown timer ends a connection
/// (`ngx_shutdown_timer_handler`): the client connection is marked to close and its read
/// handler, `ngx_http_request_handler`, terminates the request. Termination runs the request's
/// cleanups (the upstream's, which calls our finalizer: `finish` writes the close record) and
/// closes it, with the access log written while the module context is intact. Finalizing
/// with `NGX_ERROR` instead would first run `post_action`, whose internal redirect wipes the
/// module context while the wrappers are installed: no close record, empty `$ws_*`.
///
/// # Safety
/// `t` must be a live tunnel that nothing borrows; it may be freed when this returns.
unsafe fn end_tunnel(t: *mut Tunnel) {
    // SAFETY: per the contract; the request is live while its tunnel (its context) is.
    let c = unsafe {
        if (*t).ending {
            return;
        }
        (*t).ending = true;
        (*(*t).r).connection
    };
    // SAFETY: the live client connection of the request; its read event handler is nginx's
    // request handler, which checks `close` first.
    unsafe {
        (*c).set_close(1);
        if let Some(handler) = (*(*c).read).handler {
            handler((*c).read);
        }
    }
}

impl Recorder {
    /// Whether `on` does anything with frame and message events.
    fn wants_events(&self) -> bool {
        self.stats.is_some()
            || (!self.logs.is_empty() && self.events & (events::FRAME | events::MESSAGE) != 0)
    }

    /// What a passive tunnel does with a whole frame taken the short way
    /// ([`Flow::observe_whole`]).
    #[inline(always)]
    fn mode(&self) -> Mode {
        if self.stats.is_some() {
            return Mode::Events;
        }
        if self.logs.is_empty() {
            return Mode::Count;
        }
        match self.events & (events::FRAME | events::MESSAGE) {
            0 => Mode::Count,
            events::FRAME if self.ident.is_some() => Mode::Brief,
            _ => Mode::Events,
        }
    }

    /// The frame record of a whole frame taken the short way.
    #[inline(always)]
    fn brief_frame(&self, from: From, w: Whole<'_>) {
        if let Some(head) = self.ident.as_ref().and_then(|i| i.frame_head(from)) {
            // Two lines, so that the usual one, without a payload, has no branch for it.
            let Some((bytes, truncated)) = w.payload else {
                self.logs
                    .write_with(|time, out| brief_frame_line(out, time, head, w.brief, None));
                return;
            };
            let payload = PayloadField {
                text: w.brief.first & 0x0f == Opcode::Text.as_u8(),
                bytes,
                truncated,
            };
            self.logs
                .write_with(|time, out| brief_frame_line(out, time, head, w.brief, Some(payload)));
        }
    }

    /// Writes the record for something a flow did. Inlined into the send wrappers' closures,
    /// so that the frame event need not be built in memory to be read back here.
    #[inline(always)]
    fn on(&mut self, from: From, e: &Event<'_>) {
        if let Some(s) = self.stats {
            s.entry().on_event(from, e);
        }
        let want = self.events & (events::FRAME | events::MESSAGE);
        if want == 0 {
            return;
        }
        let wanted = match e {
            Event::Peer(Observed::Frame(_)) | Event::Proxy { .. } => want & events::FRAME != 0,
            Event::Peer(Observed::Message(_)) => want & events::MESSAGE != 0,
            Event::PongConsumed => false,
        };
        if !wanted {
            return;
        }
        match e {
            Event::Peer(Observed::Frame(f)) => {
                let h = f.header;
                let payload = f.payload.map(|bytes| PayloadField {
                    text: f.message_kind == Some(Opcode::Text),
                    bytes,
                    truncated: f.truncated,
                });
                if let (Some(ident), None, None) = (&self.ident, f.close_code, &f.close_reason) {
                    // Nearly every frame: its line straight from the header.
                    self.logs.write_timed_with(|time, out| {
                        frame_line(out, time, ident, from, &h, payload)
                    });
                    return;
                }
                self.logs.write_timed(|time| FrameRecord {
                    time,
                    event: "frame",
                    conn: self.conn,
                    request_id: self.request_id,
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
                    ident: self.ident.as_ref(),
                });
            }
            Event::Peer(Observed::Message(m)) => {
                let captured = self.payload > 0 && (!m.compressed || m.inflated);
                let payload = captured.then_some(PayloadField {
                    text: m.kind == Opcode::Text,
                    bytes: &m.payload,
                    truncated: m.truncated,
                });
                self.logs.write_timed(|time| MessageRecord {
                    time,
                    event: "message",
                    conn: self.conn,
                    request_id: self.request_id,
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
                    inflated_len: m.inflated_len,
                    inflate_error: m.inflate_error.map(InflateError::as_str),
                    ident: self.ident.as_ref(),
                });
            }
            Event::Proxy {
                opcode,
                len,
                masked,
                code,
                reason,
            } => {
                self.logs.write_timed(|time| FrameRecord {
                    time,
                    event: "frame",
                    conn: self.conn,
                    request_id: self.request_id,
                    from: From::Proxy,
                    opcode: OpcodeField(*opcode),
                    fin: true,
                    rsv1: false,
                    rsv2: false,
                    rsv3: false,
                    masked: *masked,
                    len: *len,
                    payload: None,
                    payload_truncated: None,
                    code: *code,
                    reason: *reason,
                    ident: self.ident.as_ref(),
                });
            }
            _ => {}
        }
    }
}

impl Tunnel {
    /// The client's frames (what the client sent).
    pub fn client(&self) -> &Direction {
        &self.to_upstream.obs
    }

    /// The upstream's frames.
    pub fn upstream(&self) -> &Direction {
        &self.to_client.obs
    }

    /// A `send` call from nginx for one direction; returns what nginx's `send` returns.
    #[inline(always)]
    fn send(&mut self, from: From, data: &[u8]) -> isize {
        if self.passive && !self.flow_of(from).limited() {
            return self.pass(from, data);
        }
        self.shape(from, data)
    }

    /// [`Tunnel::send`] where the proxy may write or hold (out of line: the usual passive
    /// tunnel's path stays short).
    #[inline(never)]
    fn shape(&mut self, from: From, data: &[u8]) -> isize {
        let now = now_msec();
        let (flow, mut sink) = match from {
            From::Upstream => (
                &mut self.to_client,
                ConnSink {
                    c: self.client_conn,
                    send: self.client_send,
                },
            ),
            _ => (
                &mut self.to_upstream,
                ConnSink {
                    c: self.upstream_conn,
                    send: self.upstream_send,
                },
            ),
        };
        let had_close = flow.obs.close_sent;
        let data_frames = flow.obs.data_frames;
        let was_held = flow.held_until().is_some();
        let rec = &mut self.rec;
        let mut pong = false;
        let mut holds = 0;
        // Without metrics or frame/message records nothing needs the events one by one: the
        // quiet path lets the compiler drop their construction from the parser's loop.
        let sent = if let Some(limiter) = self.limiter.as_deref_mut().filter(|_| flow.limited()) {
            let mut admit = LimitAdmit {
                limiter,
                from,
                now: now as Msec,
                holds: &mut holds,
            };
            // Two closures, as below: the quiet one lets the compiler drop the events.
            if rec.wants_events() {
                let mut on = |e: Event<'_>| {
                    if let Event::PongConsumed = e {
                        pong = true;
                    }
                    rec.on(from, &e);
                };
                flow.send_limited(data, &mut sink, &mut on, &mut admit)
            } else {
                let mut on = |e: Event<'_>| {
                    if let Event::PongConsumed = e {
                        pong = true;
                    }
                };
                flow.send_limited(data, &mut sink, &mut on, &mut admit)
            }
        } else if rec.wants_events() {
            flow.send(data, &mut sink, &mut |e| {
                if let Event::PongConsumed = e {
                    pong = true;
                }
                rec.on(from, &e);
            })
        } else {
            flow.send(data, &mut sink, &mut |e| {
                if let Event::PongConsumed = e {
                    pong = true;
                }
            })
        };
        let data_frame = flow.obs.data_frames != data_frames;
        let closed_now = !had_close && flow.obs.close_sent;
        let held = flow.held_until().is_some();
        let mid_data = flow.obs.in_data_frame();
        let violation = flow.violation.take();
        let now = now as Msec;
        if let Sent::Consumed(n) = sent {
            if n > 0 && from == From::Client {
                self.life.client_bytes(now);
            }
        }
        if data_frame || mid_data {
            self.life.data(now);
        }
        if pong {
            self.life.pong();
        }
        if holds > 0 {
            if let Some(s) = self.rec.stats {
                s.entry().delayed(from);
            }
        }
        if held && !was_held {
            ngx_log_debug_http!(self.request(), "ws: {} held back", from.as_str());
            self.life.holding(from, true, now);
            self.arm(now as ngx_msec_t);
        }
        if closed_now {
            ngx_log_debug_http!(self.request(), "ws: close from the {}", from.as_str());
            self.life.peer_closed(from);
            // The peer is closing: what is on its way to it is no longer limited, so that its
            // close handshake completes without waiting for the bucket.
            let toward = if from == From::Client {
                From::Upstream
            } else {
                From::Client
            };
            self.lift_limits(toward, now);
        }
        if let Some(v) = violation {
            self.refused(now, from, v);
        }
        if self.life.closing().is_some() && self.handshake().done() {
            // Never finalize inside send: nginx's copy loop still uses the request.
            self.post_tick();
        }
        match sent {
            Sent::Consumed(0) | Sent::Again => NGX_AGAIN as isize,
            Sent::Consumed(n) => n as isize,
            Sent::Error => NGX_ERROR as isize,
        }
    }

    /// A passive tunnel's `send`: nginx's own, then the bytes it wrote are observed (counted
    /// only, when nothing reads the frames one by one).
    #[inline(always)]
    fn pass(&mut self, from: From, data: &[u8]) -> isize {
        let (flow, c, send) = match from {
            From::Upstream => (&mut self.to_client, self.client_conn, self.client_send),
            _ => (
                &mut self.to_upstream,
                self.upstream_conn,
                self.upstream_send,
            ),
        };
        let Some(send) = send else {
            return NGX_ERROR as isize;
        };
        // SAFETY: nginx's own send on its live connection, with the arguments nginx gave.
        let n = unsafe { send(c, data.as_ptr().cast_mut(), data.len()) };
        if n > 0 {
            let sent = &data[..(n as usize).min(data.len())];
            // Nearly every write: one whole data message of one frame, counted and its record
            // (if any) written straight from the frame's first bytes.
            match self.rec.mode() {
                Mode::Count => {
                    if flow.observe_whole(sent, false).is_some() {
                        return n;
                    }
                }
                Mode::Brief => {
                    if let Some(w) = flow.observe_whole(sent, true) {
                        self.rec.brief_frame(from, w);
                        return n;
                    }
                }
                Mode::Events => {}
            }
            self.observe_sent(from, sent);
        }
        n
    }

    /// What a passive tunnel's `send` wrote, the general way: frame by frame, Close frames
    /// included. Inlined: out of line, it cost the frame-by-frame configurations (message
    /// records, compressed traffic) about 20 instructions per message, for 6 on the short way.
    #[inline(always)]
    fn observe_sent(&mut self, from: From, sent: &[u8]) {
        let flow = match from {
            From::Upstream => &mut self.to_client,
            _ => &mut self.to_upstream,
        };
        let had_close = flow.obs.close_sent;
        if self.rec.wants_events() {
            let rec = &mut self.rec;
            flow.observe_sent(sent, |e| rec.on(from, &e));
        } else {
            flow.obs.count(sent);
        }
        if !had_close && flow.obs.close_sent {
            self.life.peer_closed(from);
            // What travels toward a closing peer is no longer limited (see send).
            let toward = if from == From::Client {
                From::Upstream
            } else {
                From::Client
            };
            self.lift_limits(toward, now_msec() as Msec);
        }
    }

    fn post_tick(&mut self) {
        if !self.tick.posted() {
            let ev = self.tick_event();
            // SAFETY: the event lives as long as the tunnel, which removes it from the queue
            // in finish and drop.
            unsafe { ngx_post_event(ev, ptr::addr_of_mut!(ngx_posted_events)) };
        }
    }

    /// The tick event, created on first use.
    fn tick_event(&mut self) -> &mut ngx_event_t {
        let t: *mut Tunnel = self;
        // SAFETY: the client connection is live while the tunnel is.
        let log = unsafe { (*self.client_conn).log };
        self.tick.event(t, log)
    }

    /// Whether an end of stream from `from` must wait: the proxy is closing and the other
    /// peer, which is still connected, has not answered its Close yet.
    fn hold_eof(&self, from: From) -> bool {
        !self.ending && self.life.hold_eof(from, &self.handshake())
    }

    /// Where the close frames stand in the two directions.
    fn handshake(&self) -> Handshake {
        Handshake {
            to_client_written: self.to_client.close_written,
            to_upstream_written: self.to_upstream.close_written,
            client_closed: self.to_upstream.obs.close_sent,
            upstream_closed: self.to_client.obs.close_sent,
            pending: self.to_client.has_pending() || self.to_upstream.has_pending(),
        }
    }

    fn drain_soon(&mut self, now: ngx_msec_t) {
        if self.life.drain_soon(now as Msec, ngx_random() as u64) {
            ngx_log_debug_http!(self.request(), "ws: drain scheduled");
            self.arm(now);
        }
    }

    /// The flow carrying what `from` sends.
    fn flow_of(&mut self, from: From) -> &mut Flow {
        if from == From::Client {
            &mut self.to_upstream
        } else {
            &mut self.to_client
        }
    }

    /// Re-drives nginx's tunnel for what `from` sends: its `send` said "again" while the
    /// destination was writable, so no write event will come by itself (edge-triggered).
    fn wake(&mut self, from: From) {
        let dst = if from == From::Client {
            self.upstream_conn
        } else {
            self.client_conn
        };
        // SAFETY: both connections are live while the tunnel is; nginx removes a connection's
        // posted events when it closes it.
        unsafe {
            let wev = (*dst).write;
            if (*wev).posted() == 0 {
                ngx_post_event(wev, ptr::addr_of_mut!(ngx_posted_events));
            }
        }
    }

    /// No more limits on what `from` sends; a held message goes now.
    fn lift_limits(&mut self, from: From, now: Msec) {
        if self.flow_of(from).lift_limits() {
            self.life.holding(from, false, now);
            self.wake(from);
        }
    }

    /// Releases held messages whose time has come.
    fn release_due(&mut self, now: Msec) {
        for from in [From::Client, From::Upstream] {
            if self.flow_of(from).release(now) {
                ngx_log_debug_http!(self.request(), "ws: {} released", from.as_str());
                self.life.holding(from, false, now);
                self.wake(from);
            }
        }
    }

    /// `$ws_limit_status`, when a `ws_limit` applied.
    pub fn limit_status(&self) -> Option<&'static str> {
        Some(self.limiter.as_deref()?.status?.as_str())
    }

    /// Sets the tick timer to the nearest deadline.
    fn arm(&mut self, now: ngx_msec_t) {
        if self.ending || self.outcome.is_some() {
            return;
        }
        let held = [self.to_client.held_until(), self.to_upstream.held_until()];
        let deadline = held
            .into_iter()
            .chain([self.life.next_deadline(now as Msec, &self.handshake())])
            .flatten()
            .min();
        let Some(deadline) = deadline else {
            return;
        };
        let delay = (deadline as ngx_msec_t).saturating_sub(now).max(1);
        let ev = self.tick_event();
        // SAFETY: the event lives as long as the tunnel; ngx_add_timer re-arms an armed event.
        unsafe { ngx_add_timer(ev, delay) };
    }

    /// The timer fired: acts on what is due. Returns whether the tunnel must end now (the
    /// caller ends it once this borrow is over: ending may free the tunnel).
    fn on_tick(&mut self) -> bool {
        if self.ending || self.outcome.is_some() {
            return false;
        }
        let now = now_msec();
        self.release_due(now as Msec);
        match self.life.on_tick(now as Msec, &self.handshake()) {
            Tick::End { answered } => {
                if !answered {
                    self.log_unanswered();
                }
                ngx_log_debug_http!(self.request(), "ws: timer ends the tunnel");
                return true;
            }
            Tick::Flush => self.flush_own(),
            Tick::Close(order) => self.close(now, order),
            Tick::Ping(payload) => {
                ngx_log_debug_http!(self.request(), "ws: ping to the client");
                self.to_upstream.watch_pong(payload.clone());
                self.to_client.request_ping(payload);
                self.flush_own();
            }
            Tick::Wait => {}
        }
        self.arm(now);
        false
    }

    /// A peer sent a frame the policy refused: the sender gets 1009/1002, the other peer 1001.
    fn refused(&mut self, now: Msec, from: From, v: Violation) {
        // SAFETY: the client connection is live while the tunnel is.
        let log = unsafe { (*self.client_conn).log };
        match v {
            Violation::TooBig => {
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log,
                    "ws: {} sent a frame over a size limit, closing with {}",
                    from.as_str(),
                    v.sender_close().0
                );
            }
            Violation::Protocol(rule) => {
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log,
                    "ws: {} sent a frame refused by ws_protocol_check: {}, closing with {}",
                    from.as_str(),
                    rule.describe(),
                    v.sender_close().0
                );
                if let Some(s) = self.rec.stats {
                    s.entry().violation(from, rule);
                }
            }
            Violation::Invalid => {
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log,
                    "ws: {} sent compressed data that does not inflate (ws_protocol_check), \
                     closing with {}",
                    from.as_str(),
                    v.sender_close().0
                );
            }
            // The limit logged it when it refused the message, at ws_limit_log_level.
            Violation::RateLimited => {}
        }
        if let Some(order) = self.life.refused(now, from, v) {
            self.close(now as ngx_msec_t, order);
        }
    }

    /// The proxy closes the tunnel: Close to both peers at their next frame boundary.
    fn close(&mut self, now: ngx_msec_t, order: CloseOrder) {
        ngx_log_debug_http!(
            self.request(),
            "ws: closing, {} to the client, {} to the upstream",
            order.to_client.0,
            order.to_upstream.0
        );
        self.to_client
            .request_close(order.to_client.0, order.to_client.1);
        self.to_upstream
            .request_close(order.to_upstream.0, order.to_upstream.1);
        // The Closes go out at the held boundaries; what was held back is swallowed when
        // nginx offers it again.
        self.lift_limits(From::Client, now as Msec);
        self.lift_limits(From::Upstream, now as Msec);
        self.flush_own();
        if self.handshake().done() {
            self.post_tick();
        }
        self.arm(now);
    }

    /// The request, for debug lines.
    fn request(&self) -> &Request {
        // SAFETY: the request is live while its tunnel (its context) is; only read.
        crate::http::request(unsafe { &*self.r })
    }

    /// Writes what the proxy has pending in each direction, unless a write there must first be
    /// retried by nginx with its own bytes.
    fn flush_own(&mut self) {
        let Tunnel {
            to_client,
            to_upstream,
            rec,
            client_conn,
            upstream_conn,
            client_send,
            upstream_send,
            ..
        } = self;
        for (flow, c, send, from) in [
            (to_client, *client_conn, *client_send, From::Upstream),
            (to_upstream, *upstream_conn, *upstream_send, From::Client),
        ] {
            if flow.awaiting_retry() && !flow.has_pending() {
                continue;
            }
            let mut sink = ConnSink { c, send };
            let _ = flow.send(&[], &mut sink, &mut |e| rec.on(from, &e));
        }
    }

    /// Says in the error log why the closing handshake did not complete.
    fn log_unanswered(&self) {
        // (flow, the peer it delivers to, the peer it carries frames from)
        let why = |f: &Flow, to: &str, from: &str| {
            if f.close_written {
                if f.obs.close_sent {
                    String::new()
                } else {
                    format!("{to} did not answer the close frame; ")
                }
            } else if f.at_boundary() {
                format!("{to} did not take the close frame; ")
            } else {
                format!("{from} stalled inside a frame, no close frame sent to the {to}; ")
            }
        };
        // The reply to the Close sent to the client comes back in the other flow.
        let mut text = why(&self.to_client, "client", "upstream");
        text += &why(&self.to_upstream, "upstream", "client");
        // SAFETY: the client connection is live while the tunnel is.
        let log = unsafe { (*self.client_conn).log };
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "ws: closing connections after ws_close_timeout: {}",
            text.trim_end_matches("; ")
        );
    }

    /// The tunnel ends: decide why, restore nginx's pointers, write the close record.
    ///
    /// # Safety
    /// Both connections must still be live (called from the upstream finalizer).
    unsafe fn finish(&mut self, rc: ngx_int_t) {
        if self.outcome.is_some() {
            return;
        }
        self.tick.cancel();
        self.unregister_drain();
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
        let (end, closed_by) = self.life.end(EndFacts {
            upstream_timeout: rc == NGX_HTTP_GATEWAY_TIME_OUT as ngx_int_t || upstream_timedout,
            client_timeout: rc == NGX_HTTP_REQUEST_TIME_OUT as ngx_int_t,
            upstream_gone,
            client_gone,
        });
        ngx_log_debug_http!(self.request(), "ws: tunnel ends: {}", end.as_str());
        let duration_ms = self.duration_ms();
        self.outcome = Some(Outcome {
            end,
            closed_by,
            duration_ms,
        });
        self.count_closed(end, duration_ms);

        // Give nginx its pointers back; a recycled connection must never reach a wrapper.
        if cc
            .send
            .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_send_client as SendFn))
        {
            cc.send = self.client_send;
        }
        if cc
            .recv
            .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_recv_client as RecvFn))
        {
            cc.recv = self.client_recv;
        }
        if let Some(u) = uc {
            if u.send
                .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_send_upstream as SendFn))
            {
                u.send = self.upstream_send;
            }
            if u.recv
                .is_some_and(|f| ptr::fn_addr_eq(f, ngx_http_ws_recv_upstream as RecvFn))
            {
                u.recv = self.upstream_recv;
            }
        }

        let close_time = (self.rec.events & events::CLOSE != 0)
            .then(|| self.rec.logs.now_text())
            .flatten();
        if let Some(time) = close_time {
            if self.rec.request_id.is_none() {
                // Not read when the tunnel opened (or not found then: nginx keeps that answer).
                // SAFETY: the live request (finalizing), of this cycle, with its variable
                // index; the text stays in its pool, which outlives the tunnel.
                self.rec.request_id = unsafe { crate::conf::cycle_main_conf() }
                    .and_then(|m| unsafe { crate::http::request_id(self.r, m.request_id_index) });
            }
            let rec = CloseRecord {
                time: time.as_str(),
                event: "close",
                conn: self.rec.conn,
                request_id: self.rec.request_id,
                duration_ms,
                client: side(self.client()),
                upstream: side(self.upstream()),
                closed_by,
                end,
                limit: self.limit_status(),
            };
            self.rec.logs.write(&rec);
        }
        self.rec.logs.flush();
    }

    /// The tunnel's end in the `ws_status_zone`: each side's first Close code, the proxy's
    /// when it wrote one.
    fn count_closed(&mut self, end: End, duration_ms: u64) {
        let Some(s) = self.rec.stats.take() else {
            return;
        };
        let sent = |d: &Direction| d.close_sent.then_some(d.close_code);
        let proxy = self
            .life
            .closing()
            .filter(|_| self.to_client.close_written || self.to_upstream.close_written)
            .map(|c| Some(c.code));
        let codes = [sent(self.client()), sent(self.upstream()), proxy];
        s.entry().closed(end, codes, duration_ms);
    }

    fn duration_ms(&self) -> u64 {
        (now_msec() as Msec).wrapping_sub(self.life.start())
    }

    /// The worker begins to shut down: schedules the tunnel's drain (`crate::drain`).
    ///
    /// # Safety
    /// `t` must be a live tunnel that nothing borrows.
    unsafe fn schedule_drain(t: *mut c_void, now: ngx_msec_t) {
        // SAFETY: per the contract: the drain list's members are tunnels.
        unsafe { (*t.cast::<Tunnel>()).drain_soon(now) };
    }

    fn unregister_drain(&mut self) {
        let Some(i) = self.drain_index.take() else {
            return;
        };
        if let Some(moved) = crate::drain::leave(i, ptr::from_ref(self).cast()) {
            // SAFETY: tunnels in the list are live, and another tunnel than this one.
            unsafe { (*moved.cast::<Tunnel>().as_ptr()).drain_index = Some(i) };
        }
    }

    /// The close code and reason that ended the tunnel: the closing side's (the proxy's own
    /// when it closed).
    pub fn close_code_reason(&self) -> (Option<u16>, Option<&str>) {
        if let Some(c) = self.life.closing() {
            return (Some(c.code), Some(c.reason));
        }
        let d = match self.outcome.map(|o| o.closed_by) {
            Some(From::Client) => self.client(),
            Some(From::Upstream) => self.upstream(),
            _ => return (None, None),
        };
        (d.close_code, d.close_reason())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // The request pool is going away: no timer or posted event may point here.
        self.tick.cancel();
        self.unregister_drain();
        // Never left counted as active, even if nginx did not finalize through us.
        let duration_ms = self.duration_ms();
        self.count_closed(End::Error, duration_ms);
    }
}

fn side(d: &Direction) -> SideRecord<'_> {
    SideRecord {
        frames: d.frames,
        messages: d.messages,
        bytes: d.bytes,
        close_code: d.close_code,
        close_reason: d.close_reason(),
    }
}

/// The tunnel of a request, if it was one.
pub fn of_request(r: &Request) -> Option<&Tunnel> {
    r.get_module_ctx::<Tunnel>(crate::module())
}
