//! nginx glue of the metrics: the `ws_status_zone` shared zone and its init callback, the
//! `ws_status` directive and content handler, and the counting entry points the rest of the
//! module calls.

use core::ffi::c_void;
use core::ptr::{self, NonNull};

use ngx::core::SlabPool;
use ngx::ffi::{
    ngx_chain_t, ngx_create_temp_buf, ngx_http_arg, ngx_http_discard_request_body,
    ngx_http_output_filter, ngx_http_request_t, ngx_http_send_header, ngx_int_t, ngx_log_t,
    ngx_pagesize, ngx_shared_memory_add, ngx_shm_zone_t, ngx_slab_alloc, ngx_slab_pool_t,
    ngx_str_t, NGX_ERROR, NGX_HTTP_BAD_REQUEST, NGX_HTTP_GET, NGX_HTTP_HEAD,
    NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED, NGX_HTTP_OK, NGX_LOG_EMERG, NGX_LOG_ERR,
    NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};
use ngx::{ngx_log_error, ngx_string};

pub use ws_core::status::{Reject, Slot};

use crate::conf::{
    directive_handler, parse_size, text, ConfError, Directive, Format, LocConf, MainConf,
    StatusConf,
};
use ws_core::status::{render, Found, Incompatible, Key, Layout, Table, OTHER_LABEL};

/// The entry of a label set, inserted under the zone mutex the first time.
fn slot(st: &StatusConf, route: &str, upstream: &str, log: *mut ngx_log_t) -> Option<Slot> {
    let table = st.table?;
    // SAFETY: the zone was initialized (its table is set) and is mapped in every worker.
    let pool = unsafe { SlabPool::from_shm_zone(&*st.zone) }?;
    let (slot, found) = table.slot(Key::new(route, upstream), || pool.lock());
    if found == (Found::Other { first: true }) {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "ws: ws_status_zone \"{}\" is full ({} label sets), further label sets are \
             counted as \"{}\"",
            st.name,
            table.capacity() - 1,
            OTHER_LABEL
        );
    }
    Some(slot)
}

fn min_zone_size() -> usize {
    // SAFETY: set by ngx_os_init before the configuration is read.
    8 * unsafe { ngx_pagesize }
}

directive_handler!(
    /// `ws_status_zone name size;`
    ngx_http_ws_set_status_zone: MainConf => parse_status_zone
);
directive_handler!(
    /// `ws_status [json | prometheus];`
    ngx_http_ws_set_status: LocConf => parse_status
);

fn parse_status_zone(d: &Directive<'_>, mcf: &mut MainConf) -> Result<(), ConfError> {
    if mcf.status.enabled() {
        return Err(d.duplicate());
    }
    let a = d.args;
    let name = text(&a[0]);
    if name.is_empty() {
        return Err(d.invalid(&a[0]));
    }
    let size = parse_size(&a[1]).ok_or_else(|| d.invalid(&a[1]))?;
    if size < min_zone_size() {
        return Err(ConfError::ZoneTooSmall {
            name,
            min_k: min_zone_size() / 1024,
        });
    }
    let mut zname = a[0];
    // SAFETY: cf is valid during parsing; the tag identifies our module's zones.
    let zone = unsafe {
        ngx_shared_memory_add(
            d.cf,
            &mut zname,
            size,
            ptr::from_ref(crate::module()).cast_mut().cast(),
        )
    };
    // nginx has said why (a zone of that name for another use, or with another size).
    let z = NonNull::new(zone).ok_or(ConfError::Reported)?;
    // SAFETY: nginx returned a zone entry of the cycle being configured.
    unsafe {
        let z = &mut *z.as_ptr();
        z.init = Some(ngx_http_ws_status_init_zone);
        z.data = ptr::from_mut(mcf).cast();
    }
    mcf.status.zone = zone;
    mcf.status.name = name;
    Ok(())
}

fn parse_status(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.status.is_some() {
        return Err(d.duplicate());
    }
    let format = match d.args.first() {
        None => Format::Json,
        Some(v) => Format::parse(v.as_bytes()).ok_or_else(|| d.invalid(v))?,
    };
    lcf.status = Some(format);
    // SAFETY: cf is inside a location; nginx's core location conf exists there.
    let clcf = unsafe { NgxHttpCoreModule::location_conf_mut(&*d.cf) }
        .ok_or(ConfError::NoMainConf("ws_status"))?;
    clcf.handler = Some(ngx_http_ws_status_handler);
    d.main_conf()?.status.handler_used = true;
    Ok(())
}

/// The zone's init callback, in the master: a fresh zone gets an empty table; a zone kept
/// across a reload (`data` is the previous configuration's) keeps its table and counters.
unsafe extern "C" fn ngx_http_ws_status_init_zone(
    shm_zone: *mut ngx_shm_zone_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: nginx passes the zone we added, its data our MainConf in the config pool.
    let zone = unsafe { &mut *shm_zone };
    // SAFETY: as above; nothing else refers to the configuration while nginx sets zones up.
    let mcf = unsafe { &mut *zone.data.cast::<MainConf>() };
    let table = attach_or_init(zone, data, &mcf.status.name);
    if let Some(t) = table {
        mcf.status.table = Some(t);
        // The ws_log files count the records they drop in the zone.
        for lf in &mcf.logs {
            // SAFETY: LogFiles live in the same configuration pool.
            unsafe { (*lf.as_ptr()).count_drops_in(t) };
        }
    }
    if table.is_some() {
        NGX_OK as ngx_int_t
    } else {
        NGX_ERROR as ngx_int_t
    }
}

/// The zone's table: the one a kept zone already has, or a new one.
fn attach_or_init(zone: &mut ngx_shm_zone_t, data: *mut c_void, name: &str) -> Option<Table> {
    let log = zone.shm.log;
    let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    // SAFETY: ngx_init_zone_pool made the zone start with a slab pool.
    let sp = unsafe { &mut *pool };

    if !data.is_null() || zone.shm.exists != 0 {
        // SAFETY: a reused zone's pool data is the table we laid out, or null.
        match unsafe { Table::attach(sp.data.cast()) } {
            Ok(t) => return Some(t),
            Err(e) => {
                let why = match e {
                    Incompatible::Missing => "has no table",
                    Incompatible::Layout => "was laid out by another version of the module",
                };
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "ws_status_zone \"{}\" {}: give the zone another name or size",
                    name,
                    why
                );
                return None;
            }
        }
    }

    // The table takes every free page; a failed try must not log "no memory".
    sp.set_log_nomem(0);
    // SAFETY: set by ngx_os_init.
    let page = unsafe { ngx_pagesize };
    let mut bytes = sp.pfree * page;
    while let Some(layout) = Layout::fitting(bytes) {
        // SAFETY: the pool is initialized; ngx_slab_alloc takes its mutex itself.
        let mem = unsafe { ngx_slab_alloc(pool, layout.bytes) };
        if let Some(mem) = NonNull::new(mem.cast::<u8>()) {
            // SAFETY: a fresh page-aligned block of `layout.bytes`, ours alone.
            let t = unsafe { Table::init(mem, layout) };
            sp.data = mem.as_ptr().cast();
            return Some(t);
        }
        bytes = bytes.saturating_sub(page);
    }
    ngx_log_error!(
        NGX_LOG_EMERG,
        log,
        "ws_status_zone \"{}\" is too small for its table",
        name
    );
    None
}

/// The `ws_status` content handler.
unsafe extern "C" fn ngx_http_ws_status_handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx calls content handlers with a live request.
    let req = unsafe { &mut *r };
    if req.method & (NGX_HTTP_GET | NGX_HTTP_HEAD) as usize == 0 {
        return NGX_HTTP_NOT_ALLOWED as ngx_int_t;
    }
    // SAFETY: as above.
    let rc = unsafe { ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let Some(lcf) = crate::conf::loc_conf(crate::http::request(req)) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let mut format = lcf.status.unwrap_or(Format::Json);
    let mut arg = ngx_str_t::default();
    let mut key = *b"format";
    // SAFETY: ngx_http_arg reads the request's args and points `arg` into them.
    if unsafe { ngx_http_arg(r, key.as_mut_ptr(), key.len(), &mut arg) } == NGX_OK as ngx_int_t {
        match Format::parse(arg.as_bytes()) {
            Some(f) => format = f,
            None => return NGX_HTTP_BAD_REQUEST as ngx_int_t,
        }
    }
    let Some(mcf) = crate::conf::main_conf_of(crate::http::request(req)) else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let st = &mcf.status;
    let Some(table) = st.table else {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    };
    let snap = table.snapshot();
    // SAFETY: the zone outlives the configuration that added it.
    let size = unsafe { (*st.zone).shm.size };
    let (body, ctype) = match format {
        Format::Json => {
            let mut b = render::json(&st.name, size, &snap).to_string().into_bytes();
            b.push(b'\n');
            (b, ngx_string!("application/json"))
        }
        Format::Prometheus => (
            render::prometheus(&st.name, &snap).into_bytes(),
            ngx_string!("text/plain; version=0.0.4; charset=utf-8"),
        ),
    };

    req.headers_out.status = NGX_HTTP_OK as usize;
    req.headers_out.content_type = ctype;
    req.headers_out.content_type_len = ctype.len;
    req.headers_out.content_length_n = body.len() as _;
    // SAFETY: live request, headers set.
    let rc = unsafe { ngx_http_send_header(r) };
    if rc == NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || req.header_only() != 0 {
        return rc;
    }
    // SAFETY: the request pool is live; the buffer gets `body.len()` bytes.
    let b = unsafe { ngx_create_temp_buf(req.pool, body.len().max(1)) };
    // SAFETY: null checked; the buffer has room for the body.
    let Some(b) = (unsafe { b.as_mut() }) else {
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: as above.
    unsafe {
        ptr::copy_nonoverlapping(body.as_ptr(), b.pos, body.len());
        b.last = b.pos.add(body.len());
    }
    b.set_last_buf(u32::from(ptr::eq(r, req.main)));
    b.set_last_in_chain(1);
    let mut out = ngx_chain_t {
        buf: b,
        next: ptr::null_mut(),
    };
    // SAFETY: live request; the chain link lives through the call, the buffer in the pool.
    unsafe { ngx_http_output_filter(r, &mut out) }
}

/// The counters of a tunnel's label set, or `None` without a zone.
pub fn slot_for(mcf: &MainConf, route: &str, upstream: &str, log: *mut ngx_log_t) -> Option<Slot> {
    slot(&mcf.status, route, upstream, log)
}

/// Counts a handshake the module refused. A no-op without a `ws_status_zone`.
///
/// `route` and `upstream` are the label values of the request (`""` when there are none).
pub fn count_reject(route: &str, upstream: &str, reason: Reject) {
    // SAFETY: nginx's thread, in a running worker.
    let Some(mcf) = (unsafe { crate::conf::cycle_main_conf() }) else {
        return;
    };
    let log = ngx::log::ngx_cycle_log().as_ptr();
    if let Some(s) = slot(&mcf.status, route, upstream, log) {
        s.entry().reject(reason);
    }
}
