//! The request gate: `ws_handshake`, `ws_allow_origin` and `ws_route` applied to requests, the
//! `$ws_route`/`$ws_upstream` variables, the check of an upstream's 101 under
//! `ws_handshake strict`, and `reject` records.
//!
//! The decisions themselves are pure (`route.rs`); this is the nginx glue around them.
//!
//! Where the routing decision lives: in nginx's own variable cache, not in a module context
//! (the module context belongs to the tunnel, attached at the 101). `$ws_route` and
//! `$ws_upstream` are cacheable variables: the preaccess handler computes the decision once and
//! stores both values in `r->variables`, where `proxy_pass http://$ws_upstream`, `access_log`
//! and the tunnel's `open` record read them. A request that never reaches the preaccess phase
//! (a `return` in the rewrite phase, a subrequest) gets the values computed on demand by the
//! variables' get handler. The values point into configuration memory: nothing is allocated.

use core::ptr;

use ngx::core::Status;
use ngx::ffi::{
    ngx_array_push, ngx_conf_t, ngx_http_clean_header, ngx_http_handler_pt,
    ngx_http_phases_NGX_HTTP_PREACCESS_PHASE, ngx_http_request_t, ngx_int_t, ngx_list_push,
    ngx_str_t, ngx_table_elt_t, ngx_uint_t, ngx_variable_value_t, NGX_DECLINED,
    NGX_HTTP_BAD_GATEWAY, NGX_HTTP_BAD_REQUEST, NGX_HTTP_FORBIDDEN, NGX_HTTP_GET,
    NGX_HTTP_NOT_FOUND, NGX_HTTP_SWITCHING_PROTOCOLS, NGX_HTTP_VERSION_11, NGX_HTTP_VERSION_20,
    NGX_LOG_ERR, NGX_LOG_INFO,
};
use ngx::http::{HttpModuleMainConf, NgxHttpCoreModule};
use ngx::ngx_log_error;

use crate::conf::{events, LocConf, MainConf};
use crate::http::{self, header_values};
use crate::record::RejectRecord;
use crate::route::{self, Chosen, Handshake, RequestError, Upgrade, UpgradeRequest};
use crate::status::Reject;

/// `426 Upgrade Required`: nginx has no status line of its own for it.
pub const NGX_HTTP_UPGRADE_REQUIRED: ngx_int_t = 426;

/// Installs the preaccess handler (postconfiguration), only when some scope uses the gate: with
/// no `ws_route`, `ws_allow_origin` or `ws_handshake strict` anywhere, requests never meet it.
///
/// # Safety
/// `cf` must be the http{} configuration at postconfiguration time.
pub unsafe fn install(cf: *mut ngx_conf_t, mcf: &MainConf) -> Status {
    if !mcf.gate_used {
        return Status::NGX_OK;
    }
    // SAFETY: cf is inside http{}; the core module's main conf exists.
    let Some(cmcf) = NgxHttpCoreModule::main_conf_mut(unsafe { &*cf }) else {
        return Status::NGX_ERROR;
    };
    let handlers = &mut cmcf.phases[ngx_http_phases_NGX_HTTP_PREACCESS_PHASE as usize].handlers;
    // SAFETY: the phase's handlers array was created by ngx_http_init_phases.
    let h = unsafe { ngx_array_push(handlers) }.cast::<ngx_http_handler_pt>();
    if h.is_null() {
        return Status::NGX_ERROR;
    }
    // SAFETY: h is a fresh slot of the array.
    unsafe { *h = Some(ngx_http_ws_gate_handler) };
    Status::NGX_OK
}

/// Adds a response header.
fn add_header_out(r: &mut ngx_http_request_t, key: &'static str, value: &'static str) -> bool {
    // SAFETY: headers_out.headers is the request's list of ngx_table_elt_t.
    let h = unsafe { ngx_list_push(&mut r.headers_out.headers) }.cast::<ngx_table_elt_t>();
    if h.is_null() {
        return false;
    }
    // SAFETY: h is a fresh element; all-zero is a valid empty entry (no `next`, no lowcase);
    // nginx only reads the static key and value.
    unsafe {
        ptr::write_bytes(h, 0, 1);
        (*h).hash = 1;
        (*h).key = ngx_str_t {
            len: key.len(),
            data: key.as_ptr().cast_mut(),
        };
        (*h).value = ngx_str_t {
            len: value.len(),
            data: value.as_ptr().cast_mut(),
        };
    }
    true
}

/// Whether the request is an upgrade attempt (any `Upgrade` field): every check of the gate
/// applies to it as to a WebSocket upgrade, since nginx tunnels it once the upstream says 101.
fn is_ws_upgrade(r: &ngx_http_request_t) -> bool {
    http::upgrade_offer(r) != Upgrade::None
}

/// The routing decision for a request in a location with `ws_route`.
fn decide<'a>(r: &ngx_http_request_t, lcf: &'a LocConf) -> Option<Chosen<'a>> {
    let routes = lcf.routes.as_ref()?;
    let upgrade = is_ws_upgrade(r);
    let offered = header_values(&r.headers_in.headers, b"sec-websocket-protocol");
    routes.choose(r.uri.as_bytes(), upgrade, &route::tokens(&offered))
}

/// Fills a variable value with static configuration text, or marks it not found.
fn fill(v: &mut ngx_variable_value_t, s: Option<&'static str>) {
    match s {
        Some(s) => {
            v.data = s.as_ptr().cast_mut();
            v.set_len(s.len() as u32);
            v.set_valid(1);
            v.set_not_found(0);
        }
        None => {
            v.set_len(0);
            v.set_valid(0);
            v.set_not_found(1);
        }
    }
    v.set_no_cacheable(0);
    v.set_escape(0);
}

/// Stores (or, with `None`, forgets) the decision in the request's variable cache.
///
/// # Safety
/// `r` must be a live request of the cycle whose main conf is `mcf`.
unsafe fn store(r: &mut ngx_http_request_t, mcf: &MainConf, c: Option<Option<Chosen<'static>>>) {
    for (idx, which) in [(mcf.route_index, 0), (mcf.upstream_index, 1)] {
        let Ok(idx) = usize::try_from(idx) else {
            continue;
        };
        // SAFETY: r->variables has one slot per indexed variable; idx is one of them.
        let v = unsafe { &mut *r.variables.add(idx) };
        match c {
            Some(c) => fill(v, c.map(|c| if which == 0 { c.route } else { c.upstream })),
            // Not computed here: the get handler decides when asked.
            None => {
                v.set_valid(0);
                v.set_not_found(0);
            }
        }
    }
}

/// Get handler of `$ws_route` (`data` 0) and `$ws_upstream` (1), when the preaccess handler
/// did not already store them.
///
/// # Safety
/// Called by nginx with a live request and a value slot.
pub unsafe extern "C" fn ngx_http_ws_route_variable(
    r: *mut ngx_http_request_t,
    v: *mut ngx_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live request and a value slot to fill.
    let (req, v) = unsafe { (&*r, &mut *v) };
    let c = crate::conf::loc_conf(http::request(req)).and_then(|lcf| decide(req, lcf));
    fill(v, c.map(|c| if data == 0 { c.route } else { c.upstream }));
    Status::NGX_OK.into()
}

/// The preaccess handler: strict handshake, then origin, then route.
unsafe extern "C" fn ngx_http_ws_gate_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a live request.
    let req = unsafe { &mut *r };
    let declined = NGX_DECLINED as ngx_int_t;
    if !ptr::eq(r, req.main) {
        return declined;
    }
    let Some(lcf) = crate::conf::loc_conf(http::request(req)) else {
        return declined;
    };
    // SAFETY: in nginx's thread.
    let Some(mcf) = (unsafe { crate::conf::cycle_main_conf() }) else {
        return declined;
    };
    if lcf.routes.is_none() {
        // An internal redirect may have left another location's decision in the cache.
        // SAFETY: live request of this cycle.
        unsafe { store(req, mcf, None) };
    }
    if !lcf.gate_active() {
        return declined;
    }
    let upgrade = is_ws_upgrade(req);
    let h = &req.headers_in.headers;

    if upgrade && lcf.strict() {
        let connection = header_values(h, b"connection");
        let key = header_values(h, b"sec-websocket-key");
        let version = header_values(h, b"sec-websocket-version");
        let check = route::check_request(&UpgradeRequest {
            get: req.method == NGX_HTTP_GET as ngx_uint_t,
            http11: req.http_version >= NGX_HTTP_VERSION_11 as ngx_uint_t,
            http2: req.http_version >= NGX_HTTP_VERSION_20 as ngx_uint_t,
            upgrade: http::upgrade_offer(req),
            connection: &connection,
            key: &key,
            version: &version,
        });
        match check {
            Ok(()) => {}
            Err(RequestError::Bad(why)) => {
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log_of(req),
                    "ws: bad upgrade request: {}",
                    why
                );
                return reject(
                    req,
                    lcf,
                    NGX_HTTP_BAD_REQUEST as ngx_int_t,
                    Reject::Handshake,
                );
            }
            Err(RequestError::Version) => {
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log_of(req),
                    "ws: unsupported \"Sec-WebSocket-Version\""
                );
                if !add_header_out(req, "Sec-WebSocket-Version", "13") {
                    return ngx::ffi::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
                }
                return reject(req, lcf, NGX_HTTP_UPGRADE_REQUIRED, Reject::Handshake);
            }
        }
    }

    if upgrade {
        if let Some(origins) = &lcf.origins {
            let origin = header_values(h, b"origin");
            if !origins.allows(&origin) {
                let shown = origin
                    .first()
                    .map(|o| String::from_utf8_lossy(o).into_owned())
                    .unwrap_or_default();
                ngx_log_error!(
                    NGX_LOG_INFO,
                    log_of(req),
                    "ws: origin \"{}\" not allowed",
                    shown
                );
                return reject(req, lcf, NGX_HTTP_FORBIDDEN as ngx_int_t, Reject::Origin);
            }
        }
    }

    if lcf.routes.is_some() {
        let c = decide(req, lcf);
        // SAFETY: live request of this cycle.
        unsafe { store(req, mcf, Some(c)) };
        if c.is_none() {
            if upgrade {
                return reject(req, lcf, NGX_HTTP_NOT_FOUND as ngx_int_t, Reject::NoRoute);
            }
            if !add_header_out(req, "Upgrade", "websocket") {
                return ngx::ffi::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
            }
            return reject(req, lcf, NGX_HTTP_UPGRADE_REQUIRED, Reject::NotUpgrade);
        }
    }
    declined
}

/// Under `ws_handshake strict`, checks an upstream's 101 for a WebSocket upgrade before it goes
/// to the client (header filter). A wrong `Sec-WebSocket-Accept`, or a subprotocol or extension
/// the client did not offer, turns the response into a 502: the headers are cleared and 502 is
/// returned, so the upstream module finalizes the request with a 502 special response and
/// never starts the tunnel.
///
/// # Safety
/// `r` must be a live request in a header filter.
pub unsafe fn check_upstream_101(r: *mut ngx_http_request_t) -> Option<ngx_int_t> {
    // SAFETY: per the contract.
    let req = unsafe { &mut *r };
    if req.headers_out.status != NGX_HTTP_SWITCHING_PROTOCOLS as ngx_uint_t
        || req.upstream.is_null()
        || !ptr::eq(r, req.main)
    {
        return None;
    }
    let lcf = crate::conf::loc_conf(http::request(req))?;
    // SAFETY: checked non-null; the upstream lives as long as the request.
    if !lcf.strict() || unsafe { (*req.upstream).upgrade() } == 0 || !http::is_websocket_101(req) {
        return None;
    }
    let hin = &req.headers_in.headers;
    let hout = &req.headers_out.headers;
    let key = header_values(hin, b"sec-websocket-key");
    let offered_protocols = header_values(hin, b"sec-websocket-protocol");
    let offered_extensions = header_values(hin, b"sec-websocket-extensions");
    let accept = header_values(hout, b"sec-websocket-accept");
    let protocol = header_values(hout, b"sec-websocket-protocol");
    let extensions = header_values(hout, b"sec-websocket-extensions");
    let check = route::check_response(&Handshake {
        key: &key,
        offered_protocols: &offered_protocols,
        offered_extensions: &offered_extensions,
        accept: &accept,
        protocol: &protocol,
        extensions: &extensions,
    });
    let why = check.err()?;
    ngx_log_error!(
        NGX_LOG_ERR,
        log_of(req),
        "ws: upstream sent an invalid WebSocket handshake: {}",
        why
    );
    reject(
        req,
        lcf,
        NGX_HTTP_BAD_GATEWAY as ngx_int_t,
        Reject::Handshake,
    );
    // SAFETY: nothing has been sent yet (this filter runs before nginx's header filter); the
    // upstream's headers must not reach the client with the 502.
    unsafe { ngx_http_clean_header(req) };
    Some(NGX_HTTP_BAD_GATEWAY as ngx_int_t)
}

/// Refuses a request: writes the `reject` record and returns `status` for nginx to answer with.
///
/// Every refusal of the module passes here, so this is also where a metrics counter of
/// rejections by reason is to be incremented.
pub fn reject(
    r: &mut ngx_http_request_t,
    lcf: &LocConf,
    status: ngx_int_t,
    reason: Reject,
) -> ngx_int_t {
    // Rejections are counted before any route is chosen: under the empty label set.
    crate::status::count_reject("", "", reason);
    if lcf.events() & events::REJECT != 0 {
        if let Some(mut lf) = lcf.log_file() {
            // SAFETY: LogFiles live in the configuration pool, which outlives requests.
            let lf = unsafe { lf.as_mut() };
            let time = lf.now_text();
            // SAFETY: the live request; the record is written before it ends.
            let request_id = unsafe { crate::conf::cycle_main_conf() }
                // SAFETY: as above, with this cycle's index.
                .and_then(|mcf| unsafe {
                    http::request_id(ptr::from_mut(r), mcf.request_id_index)
                });
            let uri = String::from_utf8_lossy(r.uri.as_bytes());
            let rec = RejectRecord {
                time: time.as_str(),
                event: "reject",
                // SAFETY: a live request's connection.
                conn: unsafe { (*r.connection).number } as _,
                request_id,
                uri: &uri,
                status: status as u16,
                reason: reason.as_str(),
            };
            lf.write(&rec);
        }
    }
    status
}

/// The request's connection log, for error lines.
fn log_of(r: &ngx_http_request_t) -> *mut ngx::ffi::ngx_log_t {
    // SAFETY: a live request's connection is live.
    unsafe { (*r.connection).log }
}
