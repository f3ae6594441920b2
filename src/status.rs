//! nginx glue of the metrics: the `ws_status_zone` shared zone and its init callback, the
//! `ws_status` directive and content handler, and the counting entry points the rest of the
//! module calls.

use core::ffi::{c_char, c_void};
use core::ptr::{self, NonNull};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_chain_t, ngx_command_t, ngx_conf_t, ngx_create_temp_buf, ngx_http_arg,
    ngx_http_discard_request_body, ngx_http_output_filter, ngx_http_request_t,
    ngx_http_send_header, ngx_int_t, ngx_log_t, ngx_pagesize, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc, ngx_slab_pool_t, ngx_str_t,
    NGX_ERROR, NGX_HTTP_BAD_REQUEST, NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR,
    NGX_HTTP_NOT_ALLOWED, NGX_HTTP_OK, NGX_LOG_EMERG, NGX_LOG_ERR, NGX_OK,
};
use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule, Request};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};

pub use ws_core::status::{Reject, Slot};

use crate::conf::{ConfError, LocConf, MainConf};
use ws_core::status::{render, Found, Incompatible, Key, Layout, Table, OTHER_LABEL};

/// `ws_status` output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Prometheus,
}

impl Format {
    fn parse(v: &[u8]) -> Option<Format> {
        match v {
            b"json" => Some(Format::Json),
            b"prometheus" => Some(Format::Prometheus),
            _ => None,
        }
    }
}

/// The `ws_status_zone` of one configuration.
#[derive(Debug)]
pub struct StatusConf {
    zone: *mut ngx_shm_zone_t,
    name: String,
    /// Set by the zone's init callback, in the master, before the workers start.
    table: Option<Table>,
    pool: *mut ngx_slab_pool_t,
    /// Some location has `ws_status`.
    pub handler_used: bool,
}

impl Default for StatusConf {
    fn default() -> Self {
        StatusConf {
            zone: ptr::null_mut(),
            name: String::new(),
            table: None,
            pool: ptr::null_mut(),
            handler_used: false,
        }
    }
}

impl StatusConf {
    /// Whether a `ws_status_zone` is configured: every WebSocket tunnel is then counted.
    pub fn enabled(&self) -> bool {
        !self.zone.is_null()
    }

    /// The entry of a label set, inserted under the zone mutex the first time.
    fn slot(&self, route: &str, upstream: &str, log: *mut ngx_log_t) -> Option<Slot> {
        let table = self.table?;
        let pool = self.pool;
        let (slot, found) = table.slot(Key::new(route, upstream), || ZoneLock::new(pool));
        if found == (Found::Other { first: true }) {
            ngx_log_error!(
                NGX_LOG_ERR,
                log,
                "ws: ws_status_zone \"{}\" is full ({} label sets), further label sets are \
                 counted as \"{}\"",
                self.name,
                table.capacity() - 1,
                OTHER_LABEL
            );
        }
        Some(slot)
    }
}

/// The zone's slab mutex, held while inserting a label set.
struct ZoneLock(*mut ngx_slab_pool_t);

impl ZoneLock {
    fn new(pool: *mut ngx_slab_pool_t) -> ZoneLock {
        // SAFETY: the pool heads the zone, mapped in every worker; its mutex was set up by
        // ngx_init_zone_pool.
        unsafe { ngx_shmtx_lock(&mut (*pool).mutex) };
        ZoneLock(pool)
    }
}

impl Drop for ZoneLock {
    fn drop(&mut self) {
        // SAFETY: locked in `new`.
        unsafe { ngx_shmtx_unlock(&mut (*self.0).mutex) };
    }
}

fn min_zone_size() -> usize {
    // SAFETY: set by ngx_os_init before the configuration is read.
    8 * unsafe { ngx_pagesize }
}

/// Arguments of the directive being parsed.
///
/// # Safety
/// `cf` must be the configuration being parsed.
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during directive parsing cf->args is an array of ngx_str_t.
    unsafe { (*(*cf).args).as_slice() }
}

fn text(s: &ngx_str_t) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

fn finish(cf: *mut ngx_conf_t, r: Result<(), ConfError>) -> *mut c_char {
    match r {
        Ok(()) => NGX_CONF_OK,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
            NGX_CONF_ERROR
        }
    }
}

/// `ws_status_zone name size;`
///
/// # Safety
/// Called by nginx while parsing the directive, with our main configuration.
pub unsafe extern "C" fn ngx_http_ws_set_status_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: a main-conf directive: nginx passes our MainConf.
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    let st = &mut mcf.status;
    // SAFETY: called by nginx while parsing this directive.
    let a = unsafe { args(cf) };
    let r = (|| {
        if st.enabled() {
            return Err(ConfError::Duplicate("ws_status_zone"));
        }
        let name = text(&a[1]);
        if name.is_empty() {
            return Err(ConfError::InvalidValue {
                directive: "ws_status_zone",
                value: name,
            });
        }
        let size = crate::conf::parse_size(&a[2]).ok_or(ConfError::InvalidValue {
            directive: "ws_status_zone",
            value: text(&a[2]),
        })?;
        if size < min_zone_size() {
            return Err(ConfError::ZoneTooSmall {
                name,
                min_k: min_zone_size() / 1024,
            });
        }
        Ok((name, size))
    })();
    let (name, size) = match r {
        Ok(v) => v,
        Err(e) => return finish(cf, Err(e)),
    };
    let mut zname = a[1];
    // SAFETY: cf is valid during parsing; the tag identifies our module's zones.
    let zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut zname,
            size,
            ptr::from_ref(crate::module()).cast_mut().cast(),
        )
    };
    // nginx has said why (a zone of that name for another use, or with another size).
    let Some(z) = NonNull::new(zone) else {
        return NGX_CONF_ERROR;
    };
    // SAFETY: nginx returned a zone entry of the cycle being configured.
    unsafe {
        let z = &mut *z.as_ptr();
        z.init = Some(ngx_http_ws_status_init_zone);
        z.data = ptr::from_mut(st).cast();
    }
    st.zone = zone;
    st.name = name;
    NGX_CONF_OK
}

/// The zone's init callback, in the master: a fresh zone gets an empty table; a zone kept
/// across a reload (`data` is the previous configuration's) keeps its table and counters.
unsafe extern "C" fn ngx_http_ws_status_init_zone(
    shm_zone: *mut ngx_shm_zone_t,
    data: *mut c_void,
) -> ngx_int_t {
    // SAFETY: nginx passes the zone we added, its data our StatusConf in the config pool.
    let zone = unsafe { &mut *shm_zone };
    // SAFETY: as above.
    let st = unsafe { &mut *zone.data.cast::<StatusConf>() };
    let log = zone.shm.log;
    let pool = zone.shm.addr.cast::<ngx_slab_pool_t>();
    st.pool = pool;
    // SAFETY: ngx_init_zone_pool made the zone start with a slab pool.
    let sp = unsafe { &mut *pool };

    if !data.is_null() || zone.shm.exists != 0 {
        // SAFETY: a reused zone's pool data is the table we laid out, or null.
        match unsafe { Table::attach(sp.data.cast()) } {
            Ok(t) => {
                st.table = Some(t);
                return NGX_OK as ngx_int_t;
            }
            Err(e) => {
                let why = match e {
                    Incompatible::Missing => "has no table",
                    Incompatible::Layout => "was laid out by another version of the module",
                };
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "ws_status_zone \"{}\" {}: give the zone another name or size",
                    st.name,
                    why
                );
                return NGX_ERROR as ngx_int_t;
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
            st.table = Some(t);
            return NGX_OK as ngx_int_t;
        }
        bytes = bytes.saturating_sub(page);
    }
    ngx_log_error!(
        NGX_LOG_EMERG,
        log,
        "ws_status_zone \"{}\" is too small for its table",
        st.name
    );
    NGX_ERROR as ngx_int_t
}

/// `ws_status [json | prometheus];`
///
/// # Safety
/// Called by nginx while parsing the directive, with our location configuration.
pub unsafe extern "C" fn ngx_http_ws_set_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let a = unsafe { args(cf) };
    let r = (|| {
        if lcf.status.is_some() {
            return Err(ConfError::Duplicate("ws_status"));
        }
        let format = match a.get(1) {
            None => Format::Json,
            Some(v) => Format::parse(v.as_bytes()).ok_or(ConfError::InvalidValue {
                directive: "ws_status",
                value: text(v),
            })?,
        };
        lcf.status = Some(format);
        // SAFETY: cf is inside a location; nginx's core location conf exists there.
        let clcf =
            unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) }.ok_or(ConfError::NoMemory)?;
        clcf.handler = Some(ngx_http_ws_status_handler);
        // SAFETY: inside http{} while parsing.
        if let Some(mcf) = unsafe { crate::conf::main_conf(cf) } {
            mcf.status.handler_used = true;
        }
        Ok(())
    })();
    finish(cf, r)
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
    // SAFETY: as above.
    let request = unsafe { Request::from_ngx_http_request(r) };
    let Some(lcf) = crate::loc_conf(request) else {
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
    let Some(mcf) = crate::main_conf(request) else {
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
    mcf.status.slot(route, upstream, log)
}

/// Counts a handshake the module refused. A no-op without a `ws_status_zone`.
///
/// `route` and `upstream` are the label values of the request (`""` when there are none).
pub fn count_reject(route: &str, upstream: &str, reason: Reject) {
    // SAFETY: nginx's thread, in a running worker.
    let Some(mcf) = (unsafe { crate::cycle_main_conf() }) else {
        return;
    };
    let log = ngx::log::ngx_cycle_log().as_ptr();
    if let Some(s) = mcf.status.slot(route, upstream, log) {
        s.entry().reject(reason);
    }
}

/// Counts `ws_log` records lost to failed writes. A no-op without a `ws_status_zone`.
pub fn count_log_dropped(n: u64) {
    // SAFETY: nginx's thread, in a running worker.
    let Some(mcf) = (unsafe { crate::cycle_main_conf() }) else {
        return;
    };
    if let Some(t) = mcf.status.table {
        t.count_log_dropped(n);
    }
}
