//! nginx-ws: an nginx module that follows proxied WebSocket tunnels frame by frame.
//!
//! nginx keeps the handshake and the byte tunnel; this module attaches in a header filter at the
//! `101 Switching Protocols` and wraps the two connections' `send` to observe what passes.

#![deny(unsafe_op_in_unsafe_fn)]

// The pure core, under the names the glue has always used.
pub(crate) use ws_core::{flow, frame, inflate, lifecycle, observe, record, route};

pub mod conf;
mod drain;
mod error;
pub mod gate;
mod http;
mod limit;
pub mod log;
mod sink;
pub mod status;
mod syslog;
pub mod tunnel;
pub mod variables;
pub use glue::{module, ngx_http_ws_module};

/// Module statics, the HttpModule implementation and the header filter.
mod glue {
    use core::ffi::{c_char, c_void};
    use core::mem::offset_of;
    use core::ptr;

    use ngx::core::{Status, NGX_CONF_ERROR};
    use ngx::ffi::{
        ngx_command_t, ngx_conf_set_flag_slot, ngx_conf_t, ngx_cycle_t, ngx_http_module_t,
        ngx_http_output_header_filter_pt, ngx_http_request_t, ngx_http_top_header_filter,
        ngx_int_t, ngx_module_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_2MORE,
        NGX_CONF_FLAG, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE1234, NGX_CONF_TAKE2,
        NGX_CONF_TAKE3, NGX_ERROR, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF,
        NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG,
    };
    use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};
    use ngx::{ngx_conf_log_error, ngx_string};

    use crate::conf::{self, LocConf, MainConf};
    use crate::{drain, gate, limit, status, tunnel, variables};

    struct Module;

    impl HttpModule for Module {
        fn module() -> &'static ngx_module_t {
            module()
        }

        unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
            // SAFETY: nginx passes the http{} configuration being parsed.
            unsafe { variables::add(cf) }.into()
        }

        unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
            // SAFETY: nginx builds the filter chain single-threaded during configuration; each
            // module keeps the next filter and puts itself on top, as nginx's own filters do.
            unsafe {
                NEXT_HEADER_FILTER = ngx_http_top_header_filter;
                ngx_http_top_header_filter = Some(ngx_http_ws_header_filter);
            }
            // SAFETY: cf is the http{} configuration.
            let Some(mcf) = (unsafe { conf::main_conf(cf) }) else {
                return Status::NGX_ERROR.into();
            };
            // SAFETY: postconfiguration, with the phase arrays initialized.
            unsafe { gate::install(cf, mcf) }.into()
        }

        unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
            // SAFETY: nginx passes our main configuration.
            let mcf = unsafe { &mut *conf.cast::<MainConf>() };
            // SAFETY: cf is the http{} configuration.
            if unsafe { conf::init_request_id(cf, mcf) }.is_err() {
                return NGX_CONF_ERROR;
            }
            // SAFETY: cf is the http{} configuration, fully parsed.
            if unsafe { conf::init_routes(cf, mcf) }.is_err() {
                return NGX_CONF_ERROR;
            }
            for lf in &mcf.logs {
                // SAFETY: LogFiles live in the configuration pool.
                let lf = unsafe { lf.as_ref() };
                if !lf.still_ours() {
                    let e = conf::ConfError::LogShared(lf.name());
                    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
                    return NGX_CONF_ERROR;
                }
            }
            // SAFETY: cf is the http{} configuration, fully parsed.
            if unsafe { limit::check_zones(cf, mcf) }.is_err() {
                return NGX_CONF_ERROR;
            }
            if mcf.status.handler_used && !mcf.status.enabled() {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", conf::ConfError::StatusNeedsZone);
                return NGX_CONF_ERROR;
            }
            ptr::null_mut()
        }
    }

    // SAFETY: our main conf is a MainConf, created by Module::create_main_conf.
    unsafe impl HttpModuleMainConf for Module {
        type MainConf = MainConf;
    }

    // SAFETY: our location conf is a LocConf, created by Module::create_loc_conf.
    unsafe impl HttpModuleLocationConf for Module {
        type LocationConf = LocConf;
    }

    static mut NEXT_HEADER_FILTER: ngx_http_output_header_filter_pt = None;

    /// Runs for every response header; attaches to WebSocket tunnels at the 101.
    unsafe extern "C" fn ngx_http_ws_header_filter(r: *mut ngx_http_request_t) -> ngx_int_t {
        // SAFETY: set once in postconfiguration, before any request.
        let next = unsafe { NEXT_HEADER_FILTER };
        let Some(next) = next else {
            return NGX_ERROR as ngx_int_t;
        };
        // SAFETY: nginx calls header filters with a live request.
        if let Some(rc) = unsafe { gate::check_upstream_101(r) } {
            return rc;
        }
        // SAFETY: as above. nginx has no reason phrase for 426, which the gate answers with.
        unsafe {
            let out = &mut (*r).headers_out;
            if out.status == gate::NGX_HTTP_UPGRADE_REQUIRED as usize && out.status_line.len == 0 {
                out.status_line = ngx::ngx_string!("426 Upgrade Required");
            }
        }
        // SAFETY: nginx calls header filters with a live request.
        let wanted = unsafe { tunnel::wants_tunnel(r) };
        // SAFETY: as above.
        let rc = unsafe { next(r) };
        if wanted && rc != NGX_ERROR as ngx_int_t {
            // SAFETY: the request is live and its 101 header has been passed on.
            unsafe { tunnel::attach(r) };
        }
        rc
    }

    const LOC_ANY: ngx_uint_t = (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF) as _;
    const SRV_LOC: ngx_uint_t = (NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF) as _;
    const LOC: ngx_uint_t = NGX_HTTP_LOC_CONF_OFFSET as _;

    type Handler =
        unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

    /// A directive of the location configuration; `offset` names its field where the handler
    /// sets the field at `cmd->offset` (0 where the handler knows its fields).
    const fn command(
        name: ngx_str_t,
        type_: ngx_uint_t,
        set: Handler,
        offset: usize,
    ) -> ngx_command_t {
        ngx_command_t {
            name,
            type_,
            set: Some(set),
            conf: LOC,
            offset,
            post: ptr::null_mut(),
        }
    }

    /// The module's directives. Configuration owns them all (crate::conf), but for the two of
    /// the metrics, whose handlers install the zone's init callback and the content handler
    /// (crate::status).
    static mut NGX_HTTP_WS_COMMANDS: [ngx_command_t; 23] = [
        command(
            ngx_string!("ws_log"),
            LOC_ANY | NGX_CONF_1MORE as ngx_uint_t,
            conf::ngx_http_ws_set_log,
            0,
        ),
        command(
            ngx_string!("ws_log_events"),
            LOC_ANY | NGX_CONF_1MORE as ngx_uint_t,
            conf::ngx_http_ws_set_log_events,
            0,
        ),
        command(
            ngx_string!("ws_log_payload"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_log_payload,
            0,
        ),
        command(
            ngx_string!("ws_idle_timeout"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_msec_or_off,
            offset_of!(LocConf, idle_timeout),
        ),
        command(
            ngx_string!("ws_max_lifetime"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_msec_or_off,
            offset_of!(LocConf, max_lifetime),
        ),
        command(
            ngx_string!("ws_ping_interval"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_msec_or_off,
            offset_of!(LocConf, ping_interval),
        ),
        command(
            ngx_string!("ws_pong_timeout"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_msec,
            offset_of!(LocConf, pong_timeout),
        ),
        command(
            ngx_string!("ws_close_timeout"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_msec,
            offset_of!(LocConf, close_timeout),
        ),
        command(
            ngx_string!("ws_drain"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_drain,
            offset_of!(LocConf, drain),
        ),
        command(
            ngx_string!("ws_route"),
            SRV_LOC | NGX_CONF_2MORE as ngx_uint_t,
            conf::ngx_http_ws_set_route,
            0,
        ),
        command(
            ngx_string!("ws_allow_origin"),
            LOC_ANY | NGX_CONF_1MORE as ngx_uint_t,
            conf::ngx_http_ws_set_allow_origin,
            0,
        ),
        command(
            ngx_string!("ws_handshake"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_handshake,
            0,
        ),
        command(
            ngx_string!("ws_max_frame_size"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_size_or_off,
            offset_of!(LocConf, max_frame),
        ),
        command(
            ngx_string!("ws_max_message_size"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_size_or_off,
            offset_of!(LocConf, max_message),
        ),
        command(
            ngx_string!("ws_max_inflated_size"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            conf::ngx_http_ws_set_size_or_off,
            offset_of!(LocConf, max_inflated),
        ),
        // nginx's own on|off setter, on an ngx_flag_t.
        command(
            ngx_string!("ws_protocol_check"),
            LOC_ANY | NGX_CONF_FLAG as ngx_uint_t,
            ngx_conf_set_flag_slot,
            offset_of!(LocConf, protocol_check),
        ),
        ngx_command_t {
            name: ngx_string!("ws_status_zone"),
            type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2) as ngx_uint_t,
            set: Some(status::ngx_http_ws_set_status_zone),
            conf: NGX_HTTP_MAIN_CONF_OFFSET as _,
            offset: 0,
            post: ptr::null_mut(),
        },
        command(
            ngx_string!("ws_status"),
            (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
            status::ngx_http_ws_set_status,
            0,
        ),
        ngx_command_t {
            name: ngx_string!("ws_limit_zone"),
            type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE3) as ngx_uint_t,
            set: Some(limit::ngx_http_ws_set_limit_zone),
            conf: NGX_HTTP_MAIN_CONF_OFFSET as _,
            offset: 0,
            post: ptr::null_mut(),
        },
        command(
            ngx_string!("ws_limit"),
            LOC_ANY | NGX_CONF_TAKE1234 as ngx_uint_t,
            limit::ngx_http_ws_set_limit,
            0,
        ),
        command(
            ngx_string!("ws_limit_dry_run"),
            LOC_ANY | NGX_CONF_FLAG as ngx_uint_t,
            ngx_conf_set_flag_slot,
            offset_of!(LocConf, limit_dry_run),
        ),
        command(
            ngx_string!("ws_limit_log_level"),
            LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
            limit::ngx_http_ws_set_limit_log_level,
            0,
        ),
        ngx_command_t::empty(),
    ];

    static NGX_HTTP_WS_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
        preconfiguration: Some(Module::preconfiguration),
        postconfiguration: Some(Module::postconfiguration),
        create_main_conf: Some(Module::create_main_conf),
        init_main_conf: Some(Module::init_main_conf),
        create_srv_conf: None,
        merge_srv_conf: None,
        create_loc_conf: Some(Module::create_loc_conf),
        merge_loc_conf: Some(Module::merge_loc_conf),
    };

    /// Per-worker start: the drain watcher, when some scope uses `ws_drain`.
    unsafe extern "C" fn ngx_http_ws_init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
        // SAFETY: nginx calls init_process with the worker's cycle.
        if let Some(mcf) = unsafe { conf::cycle_main_conf() } {
            if mcf.drain_used {
                // SAFETY: once per worker, with the cycle's log, which outlives the worker.
                unsafe { drain::start_watch((*cycle).log) };
            }
        }
        Status::NGX_OK.into()
    }

    #[cfg(feature = "export-modules")]
    ngx::ngx_modules!(ngx_http_ws_module);

    #[used]
    #[allow(non_upper_case_globals)]
    #[cfg_attr(not(feature = "export-modules"), unsafe(no_mangle))]
    pub static mut ngx_http_ws_module: ngx_module_t = ngx_module_t {
        ctx: &raw const NGX_HTTP_WS_MODULE_CTX as _,
        // SAFETY: taking the address of the static commands table, which nginx only reads.
        commands: unsafe { &raw mut NGX_HTTP_WS_COMMANDS[0] },
        type_: NGX_HTTP_MODULE as _,
        init_process: Some(ngx_http_ws_init_process),
        ..ngx_module_t::default()
    };

    /// The module, as nginx numbered it at load time.
    pub fn module() -> &'static ngx_module_t {
        // SAFETY: nginx writes the indices while loading, before any use; afterwards it is read-only.
        unsafe { &*ptr::addr_of!(ngx_http_ws_module) }
    }
}
