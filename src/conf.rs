//! Directives, typed configuration and configuration errors.

use core::ffi::{c_char, c_void};
use core::mem::size_of;
use core::ptr::{self, NonNull};

use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_open_file, ngx_conf_t, ngx_flag_t, ngx_http_compile_complex_value,
    ngx_http_compile_complex_value_t, ngx_http_complex_value_t, ngx_http_get_variable_index,
    ngx_int_t, ngx_msec_t, ngx_parse_size, ngx_parse_time, ngx_pcalloc, ngx_shm_zone_t, ngx_str_t,
    ngx_uint_t, NGX_ERROR, NGX_LOG_EMERG,
};
use ngx::http::{HttpModuleConfExt, Merge, MergeConfigError, Request};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::log::LogFile;
use crate::route::{self, OriginRule, OriginSpec, Origins, Routes, Rule, RuleSpec};
use crate::sink::{self, Dest, Sink};
use crate::syslog::SyslogLog;
use ws_core::status::Table;

/// nginx's `NGX_CONF_UNSET`.
const NGX_CONF_UNSET: ngx_flag_t = -1;

/// Largest `ws_log_payload`.
pub const MAX_PAYLOAD_CAPTURE: usize = 64 * 1024;

pub use crate::error::ConfError;

/// Which records `ws_log` writes.
pub mod events {
    pub const OPEN: u32 = 1;
    pub const FRAME: u32 = 2;
    pub const MESSAGE: u32 = 4;
    pub const CLOSE: u32 = 8;
    pub const REJECT: u32 = 16;
    pub const DEFAULT: u32 = OPEN | CLOSE;

    pub fn parse(name: &str) -> Option<u32> {
        Some(match name {
            "open" => OPEN,
            "frame" => FRAME,
            "message" => MESSAGE,
            "close" => CLOSE,
            "reject" => REJECT,
            _ => return None,
        })
    }
}

#[derive(Debug)]
pub struct MainConf {
    /// Index of `$request_id`, for the records' `request_id`.
    pub request_id_index: ngx_int_t,
    /// Every `ws_log` file of this configuration, for the flush callback and checks.
    pub logs: Vec<NonNull<LogFile>>,
    /// Every `ws_log syslog:...` of this configuration, to count their losses in the zone.
    pub syslogs: Vec<NonNull<SyslogLog>>,
    /// Some scope has `ws_drain`: workers watch for their graceful shutdown.
    pub drain_used: bool,
    /// `ws_status_zone`.
    pub status: StatusConf,
    /// Some scope has `ws_route`, `ws_allow_origin` or `ws_handshake strict`: the request gate
    /// (a preaccess phase handler) is installed.
    pub gate_used: bool,
    /// Every upstream name `ws_route` refers to, with where, checked once http{} is parsed.
    pub route_upstreams: Vec<UpstreamRef>,
    /// Indices of `$ws_route` and `$ws_upstream` (when `ws_route` is used).
    pub route_index: ngx_int_t,
    pub upstream_index: ngx_int_t,
    /// Every zone a `ws_limit` names, with where, checked once http{} is parsed.
    pub limit_refs: Vec<ZoneRef>,
}

/// A shared zone a `ws_limit` names, and the directive's place in the configuration.
#[derive(Debug)]
pub struct ZoneRef {
    pub zone: NonNull<ngx_shm_zone_t>,
    pub file: String,
    pub line: ngx_uint_t,
}

/// Which peer's messages a `ws_limit` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitFrom {
    Client,
    Upstream,
}

/// One `ws_limit`: the zone (its `data` is the `ws_limit_zone`'s state once defined), burst and
/// mode.
#[derive(Debug, Clone, Copy)]
pub struct LimitRef {
    pub zone: NonNull<ngx_shm_zone_t>,
    pub burst: u64,
    pub nodelay: bool,
    pub from: LimitFrom,
}

/// An upstream name in a `ws_route`, and the directive's place in the configuration.
#[derive(Debug)]
pub struct UpstreamRef {
    pub name: String,
    pub file: String,
    pub line: ngx_uint_t,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf {
            request_id_index: NGX_ERROR as ngx_int_t,
            logs: Vec::new(),
            syslogs: Vec::new(),
            drain_used: false,
            gate_used: false,
            route_upstreams: Vec::new(),
            route_index: NGX_ERROR as ngx_int_t,
            upstream_index: NGX_ERROR as ngx_int_t,
            status: StatusConf::default(),
            limit_refs: Vec::new(),
        }
    }
}

/// `ws_status` output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Prometheus,
}

impl Format {
    pub fn parse(v: &[u8]) -> Option<Format> {
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
    pub zone: *mut ngx_shm_zone_t,
    pub name: String,
    /// Set by the zone's init callback, in the master, before the workers start.
    pub table: Option<Table>,
    /// Some location has `ws_status`.
    pub handler_used: bool,
}

impl Default for StatusConf {
    fn default() -> Self {
        StatusConf {
            zone: ptr::null_mut(),
            name: String::new(),
            table: None,
            handler_used: false,
        }
    }
}

impl StatusConf {
    /// Whether a `ws_status_zone` is configured: every WebSocket tunnel is then counted.
    pub fn enabled(&self) -> bool {
        !self.zone.is_null()
    }
}

/// A regex compiled by nginx's PCRE (`ngx_regex_compile`), in the configuration pool.
#[cfg(ngx_feature = "pcre")]
#[derive(Debug, Clone, Copy)]
pub struct NgxRegex(NonNull<ngx::ffi::ngx_regex_t>);

/// Without PCRE no regex can be configured.
#[cfg(not(ngx_feature = "pcre"))]
#[derive(Debug, Clone, Copy)]
pub struct NgxRegex(core::convert::Infallible);

impl route::Matcher for NgxRegex {
    #[cfg(ngx_feature = "pcre")]
    fn is_match(&self, s: &[u8]) -> bool {
        let mut s = ngx_str_t {
            len: s.len(),
            data: s.as_ptr().cast_mut(),
        };
        // SAFETY: the regex was compiled at configuration time and lives in the configuration
        // pool; ngx_regex_exec only reads `s` and, with no captures requested, writes nothing.
        let rc = unsafe { ngx::ffi::ngx_regex_exec(self.0.as_ptr(), &mut s, ptr::null_mut(), 0) };
        // A match-limit or other PCRE error counts as no match.
        rc >= 0
    }

    #[cfg(not(ngx_feature = "pcre"))]
    fn is_match(&self, _s: &[u8]) -> bool {
        match self.0 {}
    }
}

/// Compiles a regex of `directive` with nginx's PCRE.
///
/// # Safety
/// `cf` must be the configuration being parsed.
#[cfg(ngx_feature = "pcre")]
unsafe fn compile_regex(
    cf: *mut ngx_conf_t,
    directive: &'static str,
    pattern: &str,
    caseless: bool,
) -> Result<NgxRegex, ConfError> {
    use ngx::ffi::{ngx_pnalloc, ngx_regex_compile, ngx_regex_compile_t, NGX_MAX_CONF_ERRSTR};
    // SAFETY: cf->pool is the configuration pool; PCRE1 wants the pattern NUL-terminated.
    let data = unsafe { ngx_pnalloc((*cf).pool, pattern.len() + 1) }.cast::<u8>();
    if data.is_null() {
        return Err(ConfError::NoMemory);
    }
    // SAFETY: data has room for the pattern and the NUL.
    unsafe {
        ptr::copy_nonoverlapping(pattern.as_ptr(), data, pattern.len());
        *data.add(pattern.len()) = 0;
    }
    let mut errstr = [0u8; NGX_MAX_CONF_ERRSTR as usize];
    // SAFETY: a plain C struct for which all-zero is the initial state, as nginx's callers use.
    let mut rc: ngx_regex_compile_t = unsafe { core::mem::zeroed() };
    rc.pattern = ngx_str_t {
        len: pattern.len(),
        data,
    };
    // SAFETY: cf is valid during parsing.
    rc.pool = unsafe { (*cf).pool };
    rc.options = if caseless {
        ngx::ffi::NGX_REGEX_CASELESS as ngx_uint_t
    } else {
        0
    };
    rc.err = ngx_str_t {
        len: errstr.len(),
        data: errstr.as_mut_ptr(),
    };
    // SAFETY: rc is fully set up; nginx writes the error text into errstr.
    if unsafe { ngx_regex_compile(&mut rc) } != ngx::ffi::NGX_OK as ngx_int_t {
        return Err(ConfError::Regex {
            directive,
            err: text(&rc.err),
        });
    }
    NonNull::new(rc.regex)
        .map(NgxRegex)
        .ok_or(ConfError::NoMemory)
}

/// # Safety
/// As the PCRE version.
#[cfg(not(ngx_feature = "pcre"))]
unsafe fn compile_regex(
    _cf: *mut ngx_conf_t,
    directive: &'static str,
    _pattern: &str,
    _caseless: bool,
) -> Result<NgxRegex, ConfError> {
    Err(ConfError::NoPcre(directive))
}

/// The `ws_*` directives of one scope. `None` is "not set here"; after `Merge::merge` every
/// field but `routes`, `origins` and `status` is set (to the scope's own value, the enclosing
/// scope's, or the default), and the accessors read them.
#[derive(Debug)]
pub struct LocConf {
    /// The scope's `ws_log`s, in configuration order; empty is `ws_log off`. A scope with any
    /// `ws_log` uses only its own, as with `access_log`.
    pub log: Option<Vec<Sink>>,
    /// Bit set of [`events`].
    pub events: Option<u32>,
    pub payload: Option<usize>,
    /// Times in milliseconds; `Some(0)` is `off`. Set through `cmd->offset`.
    pub idle_timeout: Option<ngx_msec_t>,
    pub max_lifetime: Option<ngx_msec_t>,
    pub ping_interval: Option<ngx_msec_t>,
    pub pong_timeout: Option<ngx_msec_t>,
    pub close_timeout: Option<ngx_msec_t>,
    pub drain: Option<ngx_msec_t>,
    /// Size limits in bytes; `Some(0)` is `off`. Set through `cmd->offset`.
    pub max_frame: Option<usize>,
    pub max_message: Option<usize>,
    /// `ws_max_inflated_size`: largest uncompressed message; `Some(0)` is `off`.
    pub max_inflated: Option<usize>,
    /// `ws_protocol_check`, set by nginx's own `ngx_conf_set_flag_slot`, which wants an
    /// `ngx_flag_t` starting at `NGX_CONF_UNSET` (the one field that keeps nginx's convention).
    pub protocol_check: ngx_flag_t,
    /// `ws_route` rules of the nearest scope that has any (`None`: no routing here).
    pub routes: Option<Routes<NgxRegex>>,
    /// `ws_allow_origin` (`None`: any origin).
    pub origins: Option<Origins<NgxRegex>>,
    pub handshake_strict: Option<bool>,
    /// `ws_status` in this location (not inherited: it sets the content handler).
    pub status: Option<Format>,
    /// `ws_limit`s of the nearest scope that has any, as `limit_req`.
    pub limits: Option<Vec<LimitRef>>,
    /// `ws_limit_dry_run`, by nginx's `ngx_conf_set_flag_slot`.
    pub limit_dry_run: ngx_flag_t,
    /// `ws_limit_log_level` (an `NGX_LOG_*` value).
    pub limit_log_level: Option<usize>,
}

/// A new configuration (create_loc_conf): everything unset.
impl Default for LocConf {
    fn default() -> Self {
        LocConf {
            log: None,
            events: None,
            payload: None,
            idle_timeout: None,
            max_lifetime: None,
            ping_interval: None,
            pong_timeout: None,
            close_timeout: None,
            drain: None,
            max_frame: None,
            max_message: None,
            max_inflated: None,
            protocol_check: NGX_CONF_UNSET,
            routes: None,
            origins: None,
            handshake_strict: None,
            status: None,
            limits: None,
            limit_dry_run: NGX_CONF_UNSET,
            limit_log_level: None,
        }
    }
}

/// Defaults of the directives that have one besides off.
const PONG_TIMEOUT_DEFAULT: ngx_msec_t = 10_000;
const CLOSE_TIMEOUT_DEFAULT: ngx_msec_t = 5_000;

impl LocConf {
    /// The logs records go to here (empty: logging is off).
    pub fn logs(&self) -> &[Sink] {
        self.log.as_deref().unwrap_or_default()
    }

    pub fn events(&self) -> u32 {
        self.events.unwrap_or(events::DEFAULT)
    }

    pub fn payload(&self) -> usize {
        self.payload.unwrap_or(0)
    }

    pub fn idle_timeout(&self) -> ngx_msec_t {
        self.idle_timeout.unwrap_or(0)
    }

    pub fn max_lifetime(&self) -> ngx_msec_t {
        self.max_lifetime.unwrap_or(0)
    }

    pub fn ping_interval(&self) -> ngx_msec_t {
        self.ping_interval.unwrap_or(0)
    }

    pub fn pong_timeout(&self) -> ngx_msec_t {
        self.pong_timeout.unwrap_or(PONG_TIMEOUT_DEFAULT)
    }

    pub fn close_timeout(&self) -> ngx_msec_t {
        self.close_timeout.unwrap_or(CLOSE_TIMEOUT_DEFAULT)
    }

    pub fn drain(&self) -> ngx_msec_t {
        self.drain.unwrap_or(0)
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame.unwrap_or(0)
    }

    pub fn max_message(&self) -> usize {
        self.max_message.unwrap_or(0)
    }

    pub fn max_inflated(&self) -> usize {
        self.max_inflated.unwrap_or(0)
    }

    pub fn protocol_check(&self) -> bool {
        self.protocol_check == 1
    }

    /// The `ws_limit`s in force here.
    pub fn limits(&self) -> &[LimitRef] {
        self.limits.as_deref().unwrap_or(&[])
    }

    pub fn limit_dry_run(&self) -> bool {
        self.limit_dry_run == 1
    }

    pub fn limit_log_level(&self) -> usize {
        self.limit_log_level.unwrap_or(ws_core::limit::LOG_ERR)
    }

    /// Whether any directive that observes or acts on tunnels applies here.
    pub fn tracks_tunnels(&self) -> bool {
        !self.logs().is_empty()
            || self.idle_timeout() > 0
            || self.max_lifetime() > 0
            || self.ping_interval() > 0
            || self.drain() > 0
            || self.max_frame() > 0
            || self.max_message() > 0
            || self.max_inflated() > 0
            || self.protocol_check()
            || !self.limits().is_empty()
    }

    /// Whether the request gate has work in this location.
    pub fn gate_active(&self) -> bool {
        self.routes.is_some() || self.origins.is_some() || self.strict()
    }

    /// `ws_handshake strict`.
    pub fn strict(&self) -> bool {
        self.handshake_strict == Some(true)
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &LocConf) -> Result<(), MergeConfigError> {
        fn inherit<T: Copy>(v: &mut Option<T>, prev: Option<T>, default: T) {
            *v = v.or(prev).or(Some(default));
        }
        if self.log.is_none() {
            self.log = Some(prev.log.clone().unwrap_or_default());
        }
        inherit(&mut self.events, prev.events, events::DEFAULT);
        inherit(&mut self.payload, prev.payload, 0);
        inherit(&mut self.idle_timeout, prev.idle_timeout, 0);
        inherit(&mut self.max_lifetime, prev.max_lifetime, 0);
        inherit(&mut self.ping_interval, prev.ping_interval, 0);
        inherit(
            &mut self.pong_timeout,
            prev.pong_timeout,
            PONG_TIMEOUT_DEFAULT,
        );
        inherit(
            &mut self.close_timeout,
            prev.close_timeout,
            CLOSE_TIMEOUT_DEFAULT,
        );
        inherit(&mut self.drain, prev.drain, 0);
        inherit(&mut self.max_frame, prev.max_frame, 0);
        inherit(&mut self.max_message, prev.max_message, 0);
        inherit(&mut self.max_inflated, prev.max_inflated, 0);
        inherit(&mut self.handshake_strict, prev.handshake_strict, false);
        if self.protocol_check == NGX_CONF_UNSET {
            self.protocol_check = if prev.protocol_check == NGX_CONF_UNSET {
                0
            } else {
                prev.protocol_check
            };
        }
        // Like proxy_set_header: a scope with any ws_route (ws_allow_origin) uses only its own.
        if self.routes.is_none() {
            self.routes = prev.routes.clone();
        }
        if self.origins.is_none() {
            self.origins = prev.origins.clone();
        }
        if self.limits.is_none() {
            self.limits = prev.limits.clone();
        }
        if self.limit_dry_run == NGX_CONF_UNSET {
            self.limit_dry_run = if prev.limit_dry_run == NGX_CONF_UNSET {
                0
            } else {
                prev.limit_dry_run
            };
        }
        inherit(
            &mut self.limit_log_level,
            prev.limit_log_level,
            ws_core::limit::LOG_ERR,
        );
        Ok(())
    }
}

/// Arguments of the directive being parsed (the name first).
///
/// # Safety
/// `cf` must be the configuration being parsed, as nginx passes it to a directive handler.
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during directive parsing cf->args is an array of ngx_str_t with at least the name.
    unsafe { (*(*cf).args).as_slice() }
}

pub fn text(s: &ngx_str_t) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

/// Parses an nginx size (`64k`, `1m`).
pub fn parse_size(s: &ngx_str_t) -> Option<usize> {
    let mut s = *s;
    // SAFETY: ngx_parse_size only reads `s.len` bytes at `s.data`.
    let v = unsafe { ngx_parse_size(&mut s) };
    usize::try_from(v).ok()
}

/// Parses an nginx time (`30s`, `5m`, `500ms`) into milliseconds.
pub fn parse_msec(s: &ngx_str_t) -> Option<ngx_msec_t> {
    let mut s = *s;
    // SAFETY: ngx_parse_time only reads `s.len` bytes at `s.data`.
    let v = unsafe { ngx_parse_time(&mut s, 0) };
    if v == NGX_ERROR as ngx_int_t {
        None
    } else {
        ngx_msec_t::try_from(v).ok()
    }
}

/// A `name=value` parameter's value, as an nginx string.
pub fn param<'a>(p: &'a ngx_str_t, name: &[u8]) -> Option<ngx_str_t> {
    let v: &'a [u8] = p.as_bytes().strip_prefix(name)?;
    Some(ngx_str_t {
        len: v.len(),
        data: v.as_ptr().cast_mut(),
    })
}

/// The directive being parsed: nginx's `cf` and command, and its arguments.
pub struct Directive<'a> {
    pub cf: *mut ngx_conf_t,
    cmd: &'a ngx_command_t,
    /// The arguments after the directive's name.
    pub args: &'a [ngx_str_t],
}

impl Directive<'_> {
    /// The directive's name, from the static commands table.
    pub fn name(&self) -> &'static str {
        // SAFETY: command names point into the static commands table.
        let b: &'static [u8] =
            unsafe { core::slice::from_raw_parts(self.cmd.name.data, self.cmd.name.len) };
        core::str::from_utf8(b).unwrap_or("ws_*")
    }

    /// `invalid value "v" in "name" directive`.
    pub fn invalid(&self, v: &ngx_str_t) -> ConfError {
        ConfError::InvalidValue {
            directive: self.name(),
            value: text(v),
        }
    }

    /// `invalid parameter "p" in "name" directive`.
    pub fn invalid_param(&self, p: &ngx_str_t) -> ConfError {
        ConfError::InvalidParameter {
            directive: self.name(),
            value: text(p),
        }
    }

    /// `"name" directive is duplicate`.
    pub fn duplicate(&self) -> ConfError {
        ConfError::Duplicate(self.name())
    }

    /// The http{} main configuration. Not part of the directive: the lifetime only keeps its
    /// use within the parse, and no other reference to it is live during a directive handler
    /// (the one main-conf directive, `ws_status_zone`, gets it as its `conf` and never asks).
    #[allow(clippy::mut_from_ref)]
    pub fn main_conf(&self) -> Result<&mut MainConf, ConfError> {
        // SAFETY: every ws_* directive is parsed inside http{}.
        unsafe { main_conf(self.cf) }.ok_or(ConfError::NoMainConf(self.name()))
    }

    /// The field of `conf` that the command's `offset` names.
    ///
    /// # Safety
    /// The command's offset must be that of a `T` field of `C` (`offset_of!` in the table).
    unsafe fn field<'c, C, T>(&self, conf: &'c mut C) -> &'c mut T {
        // SAFETY: per the contract.
        unsafe {
            &mut *ptr::from_mut(conf)
                .cast::<u8>()
                .add(self.cmd.offset)
                .cast::<T>()
        }
    }
}

/// Runs a directive's parser on the configuration structure it sets, and prints its error
/// the way nginx prints its own.
///
/// # Safety
/// nginx's directive handler arguments; `conf` must be a `C` (the structure the command's
/// `conf` offset selects, made by our create_*_conf).
pub unsafe fn run<C>(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    parse: fn(&Directive<'_>, &mut C) -> Result<(), ConfError>,
) -> *mut c_char {
    // SAFETY: per the contract: a live command of the static table, the arguments of the
    // directive being parsed, and our configuration structure, referenced nowhere else now.
    let (d, conf) = unsafe {
        (
            Directive {
                cf,
                cmd: &*cmd,
                args: &args(cf)[1..],
            },
            &mut *conf.cast::<C>(),
        )
    };
    match parse(&d, conf) {
        Ok(()) => NGX_CONF_OK,
        Err(ConfError::Reported) => NGX_CONF_ERROR,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
            NGX_CONF_ERROR
        }
    }
}

/// Defines the `extern "C"` handler nginx calls for a directive: it runs `parse` (a
/// `fn(&Directive, &mut Conf) -> Result<(), ConfError>`) on the configuration structure `Conf`.
macro_rules! directive_handler {
    ($(#[$doc:meta])* $name:ident: $conf:ty => $parse:path) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Called by nginx as the directive's handler, from the commands table.
        pub unsafe extern "C" fn $name(
            cf: *mut ::ngx::ffi::ngx_conf_t,
            cmd: *mut ::ngx::ffi::ngx_command_t,
            conf: *mut ::core::ffi::c_void,
        ) -> *mut ::core::ffi::c_char {
            // SAFETY: nginx calls directive handlers with the configuration being parsed, the
            // command, and the structure the command's `conf` offset selects: a `$conf`.
            unsafe { $crate::conf::run::<$conf>(cf, cmd, conf, $parse) }
        }
    };
}
pub(crate) use directive_handler;

directive_handler!(
    /// `ws_log path [buffer=size] [flush=time] [if=condition] | syslog:... [if=condition] | off;`
    ngx_http_ws_set_log: LocConf => parse_log
);
directive_handler!(
    /// `ws_log_events event ...;`
    ngx_http_ws_set_log_events: LocConf => parse_log_events
);
directive_handler!(
    /// `ws_log_payload size;`
    ngx_http_ws_set_log_payload: LocConf => parse_log_payload
);
directive_handler!(
    /// A time or `off`, into the `Option<ngx_msec_t>` at the command's offset.
    ngx_http_ws_set_msec_or_off: LocConf => parse_msec_or_off
);
directive_handler!(
    /// A time (not `off`), into the `Option<ngx_msec_t>` at the command's offset.
    ngx_http_ws_set_msec: LocConf => parse_msec_field
);
directive_handler!(
    /// `ws_drain time | off;`
    ngx_http_ws_set_drain: LocConf => parse_drain
);
directive_handler!(
    /// A size or `off`, into the `Option<usize>` at the command's offset.
    ngx_http_ws_set_size_or_off: LocConf => parse_size_or_off
);
directive_handler!(
    /// `ws_route [=|~|~*]pattern upstream [protocol=...];` and `ws_route default upstream;`
    ngx_http_ws_set_route: LocConf => parse_route
);
directive_handler!(
    /// `ws_allow_origin origin ... [missing=allow|deny];`
    ngx_http_ws_set_allow_origin: LocConf => parse_allow_origin
);
directive_handler!(
    /// `ws_handshake strict | off;`
    ngx_http_ws_set_handshake: LocConf => parse_handshake
);

fn parse_log(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    let a = d.args;
    if a[0].as_bytes() == b"off" {
        if let Some(p) = a.get(1) {
            return Err(d.invalid_param(p));
        }
        return match &lcf.log {
            None => {
                lcf.log = Some(Vec::new());
                Ok(())
            }
            Some(logs) if logs.is_empty() => Err(d.duplicate()),
            Some(_) => Err(ConfError::LogOffWithOthers),
        };
    }
    match &lcf.log {
        Some(logs) if logs.is_empty() => return Err(ConfError::LogOffWithOthers),
        Some(logs) if logs.len() >= sink::MAX_PER_SCOPE => {
            return Err(ConfError::TooManyLogs(sink::MAX_PER_SCOPE))
        }
        _ => {}
    }
    let target = text(&a[0]);
    if target.is_empty() {
        return Err(d.invalid(&a[0]));
    }
    let mut buffer = 0usize;
    let mut flush: ngx_msec_t = 0;
    let mut filter = None;
    for p in &a[1..] {
        if let Some(v) = param(p, b"buffer=") {
            buffer = parse_size(&v)
                .filter(|&n| n > 0)
                .ok_or_else(|| d.invalid_param(p))?;
        } else if let Some(v) = param(p, b"flush=") {
            flush = parse_msec(&v)
                .filter(|&n| n > 0)
                .ok_or_else(|| d.invalid_param(p))?;
        } else if let Some(v) = param(p, b"if=") {
            if filter.is_some() || v.len == 0 {
                return Err(d.invalid_param(p));
            }
            // SAFETY: cf is being parsed; the value lives in the configuration pool.
            filter = Some(unsafe { compile_complex_value(d.cf, v) }?);
        } else {
            return Err(d.invalid_param(p));
        }
    }
    if flush > 0 && buffer == 0 {
        return Err(ConfError::FlushWithoutBuffer(target));
    }

    let dest = if a[0].as_bytes().starts_with(b"syslog:") {
        if buffer > 0 {
            return Err(ConfError::SyslogBuffered(target));
        }
        // SAFETY: cf is being parsed and its first argument is the syslog:... one.
        let syslog = unsafe { SyslogLog::configure(d.cf, target) }?;
        // SAFETY: cf->pool is the configuration pool; it outlives every request of this cycle.
        let pool = unsafe { Pool::from_ngx_pool((*d.cf).pool) };
        let syslog = NonNull::new(pool.allocate(syslog)).ok_or(ConfError::NoMemory)?;
        d.main_conf()?.syslogs.push(syslog);
        Dest::Syslog(syslog)
    } else {
        Dest::File(open_log_file(d, &a[0], buffer, flush)?)
    };
    lcf.log
        .get_or_insert_with(Vec::new)
        .push(Sink { dest, filter });
    Ok(())
}

/// The `LogFile` of `path`: the one another `ws_log` of this configuration already opened
/// (with the same buffering), or a new one.
fn open_log_file(
    d: &Directive<'_>,
    path: &ngx_str_t,
    buffer: usize,
    flush: ngx_msec_t,
) -> Result<NonNull<LogFile>, ConfError> {
    // SAFETY: cf is valid during parsing; ngx_conf_open_file copies what it keeps.
    let file = unsafe {
        let mut name = *path;
        ngx_conf_open_file((*d.cf).cycle, &mut name)
    };
    let file = NonNull::new(file).ok_or(ConfError::NoMemory)?;
    let mcf = d.main_conf()?;

    for &existing in &mcf.logs {
        // SAFETY: LogFiles live in the configuration pool for the cycle's lifetime.
        let lf = unsafe { existing.as_ref() };
        if lf.file() == file.as_ptr() {
            if lf.buffer_size() != buffer || lf.flush_msec() != flush {
                return Err(ConfError::LogConflict(text(path)));
            }
            return Ok(existing);
        }
    }
    // SAFETY: file was just returned by ngx_conf_open_file.
    if unsafe { !LogFile::file_is_free(file.as_ptr()) } {
        return Err(ConfError::LogShared(text(path)));
    }

    // SAFETY: cf->pool is the configuration pool; it outlives every request of this cycle.
    let pool = unsafe { Pool::from_ngx_pool((*d.cf).pool) };
    // SAFETY: cf is valid during parsing; the cycle's new_log outlives the cycle.
    let lf = unsafe {
        LogFile::new(
            file.as_ptr(),
            buffer,
            flush,
            &raw mut (*(*d.cf).cycle).new_log,
        )
    };
    let lf = NonNull::new(pool.allocate(lf)).ok_or(ConfError::NoMemory)?;
    // SAFETY: freshly allocated, fixed address from now on.
    unsafe { LogFile::install(lf) };
    mcf.logs.push(lf);
    Ok(lf)
}

/// Compiles `value` as an nginx complex value (variables and text), as `access_log if=` does.
///
/// # Safety
/// `cf` must be the configuration being parsed; `value` must live in its pool.
unsafe fn compile_complex_value(
    cf: *mut ngx_conf_t,
    mut value: ngx_str_t,
) -> Result<NonNull<ngx_http_complex_value_t>, ConfError> {
    // SAFETY: cf->pool is the configuration pool.
    let cv = unsafe { ngx_pcalloc((*cf).pool, size_of::<ngx_http_complex_value_t>()) };
    let cv = NonNull::new(cv.cast::<ngx_http_complex_value_t>()).ok_or(ConfError::NoMemory)?;
    // SAFETY: a plain C struct for which all-zero is the initial state, as nginx's callers use.
    let mut ccv: ngx_http_compile_complex_value_t = unsafe { core::mem::zeroed() };
    ccv.cf = cf;
    ccv.value = &mut value;
    ccv.complex_value = cv.as_ptr();
    // SAFETY: ccv is set up as nginx's own directives do; nginx copies what it keeps and logs
    // what is wrong.
    if unsafe { ngx_http_compile_complex_value(&mut ccv) } != ngx::ffi::NGX_OK as ngx_int_t {
        return Err(ConfError::Reported);
    }
    Ok(cv)
}

fn parse_log_events(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.events.is_some() {
        return Err(d.duplicate());
    }
    let mut set = 0;
    for a in d.args {
        set |= events::parse(&text(a)).ok_or_else(|| d.invalid(a))?;
    }
    lcf.events = Some(set);
    Ok(())
}

fn parse_log_payload(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.payload.is_some() {
        return Err(d.duplicate());
    }
    let a = &d.args[0];
    let n = parse_size(a).ok_or_else(|| d.invalid(a))?;
    if n > MAX_PAYLOAD_CAPTURE {
        return Err(ConfError::PayloadTooLarge {
            value: text(a),
            max: MAX_PAYLOAD_CAPTURE,
        });
    }
    lcf.payload = Some(n);
    Ok(())
}

/// A positive time, or `off` (0) when `off_ok`.
fn msec_value(d: &Directive<'_>, off_ok: bool) -> Result<ngx_msec_t, ConfError> {
    let a = &d.args[0];
    if off_ok && a.as_bytes() == b"off" {
        return Ok(0);
    }
    parse_msec(a).filter(|&v| v > 0).ok_or_else(|| d.invalid(a))
}

fn set_msec(d: &Directive<'_>, lcf: &mut LocConf, off_ok: bool) -> Result<(), ConfError> {
    // SAFETY: the commands using these handlers name Option<ngx_msec_t> fields of LocConf.
    let field: &mut Option<ngx_msec_t> = unsafe { d.field(lcf) };
    if field.is_some() {
        return Err(d.duplicate());
    }
    *field = Some(msec_value(d, off_ok)?);
    Ok(())
}

fn parse_msec_or_off(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    set_msec(d, lcf, true)
}

fn parse_msec_field(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    set_msec(d, lcf, false)
}

fn parse_drain(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    set_msec(d, lcf, true)?;
    if lcf.drain() > 0 {
        d.main_conf()?.drain_used = true;
    }
    Ok(())
}

fn parse_size_or_off(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    // SAFETY: the commands using this handler name Option<usize> fields of LocConf.
    let field: &mut Option<usize> = unsafe { d.field(lcf) };
    if field.is_some() {
        return Err(d.duplicate());
    }
    let a = &d.args[0];
    *field = Some(if a.as_bytes() == b"off" {
        0
    } else {
        parse_size(a)
            .filter(|&n| n > 0)
            .ok_or_else(|| d.invalid(a))?
    });
    Ok(())
}

fn parse_route(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    let a: Vec<String> = d.args.iter().map(text).collect();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let spec = route::parse_rule(&a).map_err(|e| match e {
        route::ParseError::Value(value) => ConfError::InvalidValue {
            directive: "ws_route",
            value,
        },
        route::ParseError::Parameter(value) => ConfError::InvalidParameter {
            directive: "ws_route",
            value,
        },
        route::ParseError::Count => ConfError::ArgCount("ws_route"),
    })?;
    let routes = lcf.routes.get_or_insert_with(Routes::default);
    let name = match spec {
        RuleSpec::Default { upstream } => {
            if routes.default.is_some() {
                return Err(ConfError::DuplicateDefault);
            }
            routes.default = Some(upstream.clone());
            upstream
        }
        RuleSpec::Rule {
            kind,
            pattern,
            upstream,
            protocols,
        } => {
            let rule = Rule::new(kind, pattern, upstream.clone(), protocols, |p, caseless| {
                // SAFETY: cf is being parsed.
                unsafe { compile_regex(d.cf, "ws_route", p, caseless) }
            })?;
            routes.rules.push(rule);
            upstream
        }
    };
    // SAFETY: conf_file is the file being read.
    let (file, line) = unsafe {
        let f = &*(*d.cf).conf_file;
        (text(&f.file.name), f.line)
    };
    let mcf = d.main_conf()?;
    mcf.gate_used = true;
    mcf.route_upstreams.push(UpstreamRef { name, file, line });
    Ok(())
}

fn parse_allow_origin(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.origins.is_some() {
        return Err(d.duplicate());
    }
    let mut origins = Origins {
        rules: Vec::new(),
        missing_deny: false,
    };
    let mut missing_seen = false;
    for a in d.args {
        if let Some(m) = param(a, b"missing=") {
            if missing_seen {
                return Err(d.invalid_param(a));
            }
            missing_seen = true;
            origins.missing_deny = match m.as_bytes() {
                b"allow" => false,
                b"deny" => true,
                _ => return Err(d.invalid_param(a)),
            };
            continue;
        }
        let v = text(a);
        let rule = match route::parse_origin(&v) {
            Some(OriginSpec::Any) => OriginRule::Any,
            Some(OriginSpec::Exact(o)) => OriginRule::Exact(o),
            Some(OriginSpec::Wildcard(o)) => OriginRule::Wildcard(o),
            Some(OriginSpec::Regex { pattern, caseless }) => OriginRule::Regex(
                // SAFETY: cf is being parsed.
                unsafe { compile_regex(d.cf, "ws_allow_origin", &pattern, caseless) }?,
            ),
            None => return Err(d.invalid(a)),
        };
        origins.rules.push(rule);
    }
    if origins.rules.is_empty() {
        return Err(ConfError::ArgCount("ws_allow_origin"));
    }
    lcf.origins = Some(origins);
    d.main_conf()?.gate_used = true;
    Ok(())
}

fn parse_handshake(d: &Directive<'_>, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.handshake_strict.is_some() {
        return Err(d.duplicate());
    }
    let a = &d.args[0];
    let strict = match a.as_bytes() {
        b"strict" => true,
        b"off" => false,
        _ => return Err(d.invalid(a)),
    };
    lcf.handshake_strict = Some(strict);
    if strict {
        d.main_conf()?.gate_used = true;
    }
    Ok(())
}

/// After http{} is parsed: every `ws_route` upstream names an `upstream {}` block (they may
/// come after the server that uses them), and the route variables are indexed.
///
/// # Safety
/// `cf` must be the http{} configuration, at init_main_conf time.
/// Each unknown upstream is logged where it is used; the error returned is the last one.
pub unsafe fn init_routes(cf: *mut ngx_conf_t, mcf: &mut MainConf) -> Result<(), ConfError> {
    use ngx::ffi::ngx_http_upstream_srv_conf_t;
    use ngx::http::{HttpModuleMainConf, NgxHttpUpstreamModule};

    if mcf.route_upstreams.is_empty() {
        return Ok(());
    }
    // SAFETY: cf is inside http{}; the upstream module's main conf exists in every http{}.
    let umcf = NgxHttpUpstreamModule::main_conf(unsafe { &*cf });
    let blocks: &[*mut ngx_http_upstream_srv_conf_t] = match umcf {
        // SAFETY: `upstreams` is an array of ngx_http_upstream_srv_conf_t pointers.
        Some(u) => unsafe { u.upstreams.as_slice() },
        None => &[],
    };
    let defined = |name: &str| {
        blocks.iter().any(|&b| {
            // SAFETY: the array holds live upstream configurations.
            let b = unsafe { &*b };
            b.flags & ngx::ffi::NGX_HTTP_UPSTREAM_CREATE as ngx_uint_t != 0
                && b.host.as_bytes().eq_ignore_ascii_case(name.as_bytes())
        })
    };
    let mut result = Ok(());
    for r in &mcf.route_upstreams {
        if !defined(&r.name) {
            let e = ConfError::NoUpstream(r.name.clone());
            // SAFETY: cf->log is the configuration log.
            let log = unsafe { (*cf).log };
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{} in {}:{}", e, r.file, r.line);
            result = Err(e);
        }
    }
    result?;
    for (name, slot) in [
        (ngx_string!("ws_route"), &mut mcf.route_index),
        (ngx_string!("ws_upstream"), &mut mcf.upstream_index),
    ] {
        let mut name = name;
        // SAFETY: cf is valid; nginx copies the name.
        let idx = unsafe { ngx_http_get_variable_index(cf, &mut name) };
        if idx == NGX_ERROR as ngx_int_t {
            return Err(ConfError::NoMemory);
        }
        *slot = idx;
    }
    Ok(())
}

/// Our location configuration for a request.
pub fn loc_conf(r: &Request) -> Option<&'static LocConf> {
    // SAFETY: our location configuration is a LocConf; it lives as long as the cycle, which
    // outlives its requests, and is only read once the cycle runs.
    unsafe {
        Some(
            r.http_location_conf_unchecked::<LocConf>(crate::module())?
                .as_ref(),
        )
    }
}

/// Our http main configuration for a request.
pub fn main_conf_of(r: &Request) -> Option<&'static MainConf> {
    // SAFETY: as loc_conf, for our MainConf.
    unsafe {
        Some(
            r.http_main_conf_unchecked::<MainConf>(crate::module())?
                .as_ref(),
        )
    }
}

/// Our http main configuration in the running cycle.
///
/// # Safety
/// Must be called from nginx's thread, with `ngx_cycle` set.
pub unsafe fn cycle_main_conf() -> Option<&'static MainConf> {
    // SAFETY: ngx_cycle points at the running cycle in nginx's thread.
    let cycle = unsafe { ngx::ffi::ngx_cycle.as_ref()? };
    // SAFETY: the http main conf of this module is a MainConf. Configuration is only read
    // once the cycle runs (what changes at run time lives elsewhere: crate::drain, the log
    // files' own state), so shared references to it never alias a mutable one.
    unsafe {
        Some(
            cycle
                .http_main_conf_unchecked::<MainConf>(crate::module())?
                .as_ref(),
        )
    }
}

/// The http main configuration while http{} is being parsed.
///
/// # Safety
/// `cf` must be a configuration inside http{}.
pub unsafe fn main_conf<'a>(cf: *mut ngx_conf_t) -> Option<&'a mut MainConf> {
    use ngx::http::HttpModuleConfExt;
    // SAFETY: inside http{}, cf->ctx is an ngx_http_conf_ctx_t holding our main conf.
    unsafe {
        (*cf)
            .http_main_conf_unchecked::<MainConf>(crate::module())
            .map(|mut p| p.as_mut())
    }
}

/// Looks up `$request_id`'s index once, at configuration time.
///
/// # Safety
/// `cf` must be a configuration inside http{}.
pub unsafe fn init_request_id(cf: *mut ngx_conf_t, mcf: &mut MainConf) -> Result<(), ConfError> {
    let mut name = ngx_string!("request_id");
    // SAFETY: cf is valid; the name outlives the call (nginx copies it).
    let idx = unsafe { ngx_http_get_variable_index(cf, &mut name) };
    if idx == NGX_ERROR as ngx_int_t {
        return Err(ConfError::NoMemory);
    }
    mcf.request_id_index = idx;
    Ok(())
}
