//! Directives, typed configuration and configuration errors.

use core::ffi::{c_char, c_void};
use core::ptr::{self, NonNull};

use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_open_file, ngx_conf_t, ngx_http_get_variable_index, ngx_int_t,
    ngx_msec_t, ngx_parse_size, ngx_parse_time, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE,
    NGX_CONF_2MORE, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE123, NGX_CONF_TAKE2, NGX_ERROR,
    NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET,
    NGX_HTTP_SRV_CONF, NGX_LOG_EMERG,
};
use ngx::http::{Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::log::LogFile;
use crate::route::{self, OriginRule, OriginSpec, Origins, Routes, Rule, RuleSpec};

/// nginx's `NGX_CONF_UNSET_SIZE`.
const NGX_CONF_UNSET_SIZE: usize = usize::MAX;

/// Largest `ws_log_payload`.
pub const MAX_PAYLOAD_CAPTURE: usize = 64 * 1024;

/// A configuration error, printed once at the directive.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("invalid value \"{value}\" in \"{directive}\" directive")]
    InvalidValue {
        directive: &'static str,
        value: String,
    },
    #[error("invalid parameter \"{value}\" in \"{directive}\" directive")]
    InvalidParameter {
        directive: &'static str,
        value: String,
    },
    #[error("\"{0}\" directive is duplicate")]
    Duplicate(&'static str),
    #[error("\"ws_log_payload\" must not exceed {max} bytes, \"{value}\" given")]
    PayloadTooLarge { value: String, max: usize },
    #[error("\"ws_log\" \"{0}\": flush= needs buffer=")]
    FlushWithoutBuffer(String),
    #[error("\"ws_log\" \"{0}\" is already defined with conflicting parameters")]
    LogConflict(String),
    #[error("\"ws_log\" \"{0}\" cannot share its file with a buffered log of another module")]
    LogShared(String),
    #[error("invalid number of arguments in \"{0}\" directive")]
    ArgCount(&'static str),
    #[error("\"ws_route default\" is duplicate")]
    DuplicateDefault,
    /// nginx's PCRE message names the pattern.
    #[error("\"{directive}\": {err}")]
    Regex {
        directive: &'static str,
        err: String,
    },
    #[error("\"{0}\": using regex requires PCRE library")]
    NoPcre(&'static str),
    #[error("ws_route: no upstream \"{0}\" defined")]
    NoUpstream(String),
    #[error(
        "zone \"{name}\" is too small in \"ws_status_zone\" directive, the minimum is {min_k}k"
    )]
    ZoneTooSmall { name: String, min_k: usize },
    #[error("\"ws_status\" needs a \"ws_status_zone\" in the http block")]
    StatusNeedsZone,
    #[error("out of memory")]
    NoMemory,
}

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

/// `ws_log` in one scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogTarget {
    #[default]
    Unset,
    Off,
    File(NonNull<LogFile>),
}

#[derive(Debug)]
pub struct MainConf {
    /// Index of `$request_id`, for the records' `request_id`.
    pub request_id_index: ngx_int_t,
    /// Every `ws_log` file of this configuration, for the flush callback and checks.
    pub logs: Vec<NonNull<LogFile>>,
    /// Some scope has `ws_drain`: workers watch for their graceful shutdown.
    pub drain_used: bool,
    /// `ws_status_zone`.
    pub status: crate::status::StatusConf,
    /// Some scope has `ws_route`, `ws_allow_origin` or `ws_handshake strict`: the request gate
    /// (a preaccess phase handler) is installed.
    pub gate_used: bool,
    /// Every upstream name `ws_route` refers to, with where, checked once http{} is parsed.
    pub route_upstreams: Vec<UpstreamRef>,
    /// Indices of `$ws_route` and `$ws_upstream` (when `ws_route` is used).
    pub route_index: ngx_int_t,
    pub upstream_index: ngx_int_t,
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
            drain_used: false,
            gate_used: false,
            route_upstreams: Vec::new(),
            route_index: NGX_ERROR as ngx_int_t,
            upstream_index: NGX_ERROR as ngx_int_t,
            status: crate::status::StatusConf::default(),
        }
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

/// A time directive's value: unset, `off` (0) or milliseconds.
pub const MSEC_UNSET: ngx_msec_t = ngx_msec_t::MAX;

#[derive(Debug)]
pub struct LocConf {
    pub log: LogTarget,
    /// Bit set of [`events`]; `u32::MAX` while unset.
    pub events: u32,
    pub payload: usize,
    /// Times in milliseconds; 0 is off.
    pub idle_timeout: ngx_msec_t,
    pub max_lifetime: ngx_msec_t,
    pub ping_interval: ngx_msec_t,
    pub pong_timeout: ngx_msec_t,
    pub close_timeout: ngx_msec_t,
    pub drain: ngx_msec_t,
    /// Size limits in bytes; 0 is off.
    pub max_frame: usize,
    pub max_message: usize,
    /// `ws_max_inflated_size`: largest uncompressed size of a compressed message; 0 is off.
    pub max_inflated: usize,
    /// `ws_protocol_check`: 0 off, 1 on, unset.
    pub protocol_check: usize,
    /// `ws_route` rules of the nearest scope that has any (`None`: no routing here).
    pub routes: Option<Routes<NgxRegex>>,
    /// `ws_allow_origin` (`None`: any origin).
    pub origins: Option<Origins<NgxRegex>>,
    /// `ws_handshake strict` (`None` while unset).
    pub handshake_strict: Option<bool>,
    /// `ws_status` in this location (not inherited: it sets the content handler).
    pub status: Option<crate::status::Format>,
}

impl Default for LocConf {
    fn default() -> Self {
        LocConf {
            log: LogTarget::Unset,
            events: u32::MAX,
            payload: NGX_CONF_UNSET_SIZE,
            idle_timeout: MSEC_UNSET,
            max_lifetime: MSEC_UNSET,
            ping_interval: MSEC_UNSET,
            pong_timeout: MSEC_UNSET,
            close_timeout: MSEC_UNSET,
            drain: MSEC_UNSET,
            max_frame: NGX_CONF_UNSET_SIZE,
            max_message: NGX_CONF_UNSET_SIZE,
            max_inflated: NGX_CONF_UNSET_SIZE,
            protocol_check: NGX_CONF_UNSET_SIZE,
            routes: None,
            origins: None,
            handshake_strict: None,
            status: None,
        }
    }
}

fn merge_msec(v: &mut ngx_msec_t, prev: ngx_msec_t, default: ngx_msec_t) {
    if *v == MSEC_UNSET {
        *v = if prev == MSEC_UNSET { default } else { prev };
    }
}

impl LocConf {
    /// The log file records go to, if logging is on here.
    pub fn log_file(&self) -> Option<NonNull<LogFile>> {
        match self.log {
            LogTarget::File(f) => Some(f),
            _ => None,
        }
    }

    /// Whether any directive that observes or acts on tunnels applies here.
    pub fn tracks_tunnels(&self) -> bool {
        self.log_file().is_some()
            || self.idle_timeout > 0
            || self.max_lifetime > 0
            || self.ping_interval > 0
            || self.drain > 0
            || self.max_frame > 0
            || self.max_message > 0
            || self.max_inflated > 0
            || self.protocol_check == 1
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
        if self.log == LogTarget::Unset {
            self.log = if prev.log == LogTarget::Unset {
                LogTarget::Off
            } else {
                prev.log
            };
        }
        if self.events == u32::MAX {
            self.events = if prev.events == u32::MAX {
                events::DEFAULT
            } else {
                prev.events
            };
        }
        merge_msec(&mut self.idle_timeout, prev.idle_timeout, 0);
        merge_msec(&mut self.max_lifetime, prev.max_lifetime, 0);
        merge_msec(&mut self.ping_interval, prev.ping_interval, 0);
        merge_msec(&mut self.pong_timeout, prev.pong_timeout, 10_000);
        merge_msec(&mut self.close_timeout, prev.close_timeout, 5_000);
        merge_msec(&mut self.drain, prev.drain, 0);
        for (v, p) in [
            (&mut self.max_frame, prev.max_frame),
            (&mut self.max_message, prev.max_message),
            (&mut self.max_inflated, prev.max_inflated),
            (&mut self.protocol_check, prev.protocol_check),
        ] {
            if *v == NGX_CONF_UNSET_SIZE {
                *v = if p == NGX_CONF_UNSET_SIZE { 0 } else { p };
            }
        }
        // Like proxy_set_header: a scope with any ws_route (ws_allow_origin) uses only its own.
        if self.routes.is_none() {
            self.routes = prev.routes.clone();
        }
        if self.origins.is_none() {
            self.origins = prev.origins.clone();
        }
        if self.handshake_strict.is_none() {
            self.handshake_strict = Some(prev.handshake_strict == Some(true));
        }
        if self.payload == NGX_CONF_UNSET_SIZE {
            self.payload = if prev.payload == NGX_CONF_UNSET_SIZE {
                0
            } else {
                prev.payload
            };
        }
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

fn text(s: &ngx_str_t) -> String {
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

/// Runs a directive's parser, printing its error once the way nginx prints its own.
fn finish(cf: *mut ngx_conf_t, r: Result<(), ConfError>) -> *mut c_char {
    match r {
        Ok(()) => NGX_CONF_OK,
        Err(e) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", e);
            NGX_CONF_ERROR
        }
    }
}

extern "C" fn ngx_http_ws_set_log(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with the location configuration our create_loc_conf made.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let r = unsafe { set_log(cf, lcf) };
    finish(cf, r)
}

/// # Safety
/// Called from the `ws_log` directive handler with nginx's `cf`.
unsafe fn set_log(cf: *mut ngx_conf_t, lcf: &mut LocConf) -> Result<(), ConfError> {
    if lcf.log != LogTarget::Unset {
        return Err(ConfError::Duplicate("ws_log"));
    }
    // SAFETY: see the function's contract.
    let a = unsafe { args(cf) };
    if a[1].as_bytes() == b"off" {
        if a.len() > 2 {
            return Err(ConfError::InvalidParameter {
                directive: "ws_log",
                value: text(&a[2]),
            });
        }
        lcf.log = LogTarget::Off;
        return Ok(());
    }
    let path = text(&a[1]);
    if path.is_empty() {
        return Err(ConfError::InvalidValue {
            directive: "ws_log",
            value: path,
        });
    }
    let mut buffer = 0usize;
    let mut flush: ngx_msec_t = 0;
    for p in &a[2..] {
        let b = p.as_bytes();
        let bad = || ConfError::InvalidParameter {
            directive: "ws_log",
            value: text(p),
        };
        if let Some(v) = b.strip_prefix(b"buffer=") {
            let v = ngx_str_t {
                len: v.len(),
                data: v.as_ptr().cast_mut(),
            };
            buffer = parse_size(&v).filter(|&n| n > 0).ok_or_else(bad)?;
        } else if let Some(v) = b.strip_prefix(b"flush=") {
            let v = ngx_str_t {
                len: v.len(),
                data: v.as_ptr().cast_mut(),
            };
            flush = parse_msec(&v).filter(|&n| n > 0).ok_or_else(bad)?;
        } else {
            return Err(bad());
        }
    }
    if flush > 0 && buffer == 0 {
        return Err(ConfError::FlushWithoutBuffer(path));
    }

    // SAFETY: cf is valid during parsing; ngx_conf_open_file copies nothing it does not own.
    let file = unsafe {
        let mut name = a[1];
        ngx_conf_open_file((*cf).cycle, &mut name)
    };
    let file = NonNull::new(file).ok_or(ConfError::NoMemory)?;
    // SAFETY: the http main conf exists while http{} is parsed.
    let mcf = unsafe { main_conf(cf) }.ok_or(ConfError::NoMemory)?;

    for &existing in &mcf.logs {
        // SAFETY: LogFiles live in the configuration pool for the cycle's lifetime.
        let lf = unsafe { existing.as_ref() };
        if lf.file() == file.as_ptr() {
            if lf.buffer_size() != buffer || lf.flush_msec() != flush {
                return Err(ConfError::LogConflict(path));
            }
            lcf.log = LogTarget::File(existing);
            return Ok(());
        }
    }
    // SAFETY: file was just returned by ngx_conf_open_file.
    if unsafe { !LogFile::file_is_free(file.as_ptr()) } {
        return Err(ConfError::LogShared(path));
    }

    // SAFETY: cf->pool is the configuration pool; it outlives every request of this cycle.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    // SAFETY: cf is valid during parsing.
    let lf = unsafe {
        LogFile::new(
            file.as_ptr(),
            buffer,
            flush,
            &raw mut (*(*cf).cycle).new_log,
        )
    };
    let lf = NonNull::new(pool.allocate(lf)).ok_or(ConfError::NoMemory)?;
    // SAFETY: freshly allocated, fixed address from now on.
    unsafe { LogFile::install(lf) };
    mcf.logs.push(lf);
    lcf.log = LogTarget::File(lf);
    Ok(())
}

extern "C" fn ngx_http_ws_set_log_events(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    let r = (|| {
        if lcf.events != u32::MAX {
            return Err(ConfError::Duplicate("ws_log_events"));
        }
        let mut set = 0;
        // SAFETY: called by nginx while parsing this directive.
        for a in unsafe { &args(cf)[1..] } {
            let name = text(a);
            set |= events::parse(&name).ok_or(ConfError::InvalidValue {
                directive: "ws_log_events",
                value: name,
            })?;
        }
        lcf.events = set;
        Ok(())
    })();
    finish(cf, r)
}

extern "C" fn ngx_http_ws_set_log_payload(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    let r = (|| {
        if lcf.payload != NGX_CONF_UNSET_SIZE {
            return Err(ConfError::Duplicate("ws_log_payload"));
        }
        // SAFETY: called by nginx while parsing this directive.
        let a = unsafe { &args(cf)[1] };
        let n = parse_size(a).ok_or(ConfError::InvalidValue {
            directive: "ws_log_payload",
            value: text(a),
        })?;
        if n > MAX_PAYLOAD_CAPTURE {
            return Err(ConfError::PayloadTooLarge {
                value: text(a),
                max: MAX_PAYLOAD_CAPTURE,
            });
        }
        lcf.payload = n;
        Ok(())
    })();
    finish(cf, r)
}

/// Which time field a time directive sets.
fn time_field<'a>(
    lcf: &'a mut LocConf,
    name: &[u8],
) -> Option<(&'static str, &'a mut ngx_msec_t, bool)> {
    // (directive, field, accepts "off")
    Some(match name {
        b"ws_idle_timeout" => ("ws_idle_timeout", &mut lcf.idle_timeout, true),
        b"ws_max_lifetime" => ("ws_max_lifetime", &mut lcf.max_lifetime, true),
        b"ws_ping_interval" => ("ws_ping_interval", &mut lcf.ping_interval, true),
        b"ws_pong_timeout" => ("ws_pong_timeout", &mut lcf.pong_timeout, false),
        b"ws_close_timeout" => ("ws_close_timeout", &mut lcf.close_timeout, false),
        b"ws_drain" => ("ws_drain", &mut lcf.drain, true),
        _ => return None,
    })
}

extern "C" fn ngx_http_ws_set_time(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let a = unsafe { args(cf) };
    let mut drain = false;
    let r = (|| {
        let (directive, field, off_ok) =
            time_field(lcf, a[0].as_bytes()).ok_or(ConfError::NoMemory)?;
        if *field != MSEC_UNSET {
            return Err(ConfError::Duplicate(directive));
        }
        let invalid = || ConfError::InvalidValue {
            directive,
            value: text(&a[1]),
        };
        *field = if off_ok && a[1].as_bytes() == b"off" {
            0
        } else {
            parse_msec(&a[1]).filter(|&v| v > 0).ok_or_else(invalid)?
        };
        drain = directive == "ws_drain" && *field > 0;
        Ok(())
    })();
    if drain {
        // SAFETY: inside http{} while parsing.
        if let Some(mcf) = unsafe { main_conf(cf) } {
            mcf.drain_used = true;
        }
    }
    finish(cf, r)
}

extern "C" fn ngx_http_ws_set_route(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let r = unsafe { set_route(cf, lcf) };
    finish(cf, r)
}

/// # Safety
/// Called from the `ws_route` directive handler with nginx's `cf`.
unsafe fn set_route(cf: *mut ngx_conf_t, lcf: &mut LocConf) -> Result<(), ConfError> {
    // SAFETY: see the function's contract.
    let a: Vec<String> = unsafe { args(cf) }[1..].iter().map(text).collect();
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
                unsafe { compile_regex(cf, "ws_route", p, caseless) }
            })?;
            routes.rules.push(rule);
            upstream
        }
    };
    // SAFETY: inside http{} while parsing; conf_file is the file being read.
    let (mcf, file, line) = unsafe {
        let f = &*(*cf).conf_file;
        (main_conf(cf), text(&f.file.name), f.line)
    };
    let mcf = mcf.ok_or(ConfError::NoMemory)?;
    mcf.gate_used = true;
    mcf.route_upstreams.push(UpstreamRef { name, file, line });
    Ok(())
}

extern "C" fn ngx_http_ws_set_allow_origin(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    let r = (|| {
        if lcf.origins.is_some() {
            return Err(ConfError::Duplicate("ws_allow_origin"));
        }
        let mut origins = Origins {
            rules: Vec::new(),
            missing_deny: false,
        };
        let mut missing_seen = false;
        // SAFETY: called by nginx while parsing this directive.
        for a in unsafe { &args(cf)[1..] } {
            let v = text(a);
            if let Some(m) = v.strip_prefix("missing=") {
                if missing_seen {
                    return Err(ConfError::InvalidParameter {
                        directive: "ws_allow_origin",
                        value: v,
                    });
                }
                missing_seen = true;
                origins.missing_deny = match m {
                    "allow" => false,
                    "deny" => true,
                    _ => {
                        return Err(ConfError::InvalidParameter {
                            directive: "ws_allow_origin",
                            value: v,
                        })
                    }
                };
                continue;
            }
            let rule = match route::parse_origin(&v) {
                Some(OriginSpec::Any) => OriginRule::Any,
                Some(OriginSpec::Exact(o)) => OriginRule::Exact(o),
                Some(OriginSpec::Wildcard(o)) => OriginRule::Wildcard(o),
                Some(OriginSpec::Regex { pattern, caseless }) => OriginRule::Regex(
                    // SAFETY: cf is being parsed.
                    unsafe { compile_regex(cf, "ws_allow_origin", &pattern, caseless) }?,
                ),
                None => {
                    return Err(ConfError::InvalidValue {
                        directive: "ws_allow_origin",
                        value: v,
                    })
                }
            };
            origins.rules.push(rule);
        }
        if origins.rules.is_empty() {
            return Err(ConfError::ArgCount("ws_allow_origin"));
        }
        lcf.origins = Some(origins);
        Ok(())
    })();
    if r.is_ok() {
        // SAFETY: inside http{} while parsing.
        if let Some(mcf) = unsafe { main_conf(cf) } {
            mcf.gate_used = true;
        }
    }
    finish(cf, r)
}

extern "C" fn ngx_http_ws_set_handshake(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    let r = (|| {
        if lcf.handshake_strict.is_some() {
            return Err(ConfError::Duplicate("ws_handshake"));
        }
        // SAFETY: called by nginx while parsing this directive.
        let a = unsafe { &args(cf)[1] };
        lcf.handshake_strict = Some(match a.as_bytes() {
            b"strict" => true,
            b"off" => false,
            _ => {
                return Err(ConfError::InvalidValue {
                    directive: "ws_handshake",
                    value: text(a),
                })
            }
        });
        Ok(())
    })();
    if lcf.strict() {
        // SAFETY: inside http{} while parsing.
        if let Some(mcf) = unsafe { main_conf(cf) } {
            mcf.gate_used = true;
        }
    }
    finish(cf, r)
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

extern "C" fn ngx_http_ws_set_limit(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let a = unsafe { args(cf) };
    let r = (|| {
        let (directive, field) = match a[0].as_bytes() {
            b"ws_max_frame_size" => ("ws_max_frame_size", &mut lcf.max_frame),
            b"ws_max_inflated_size" => ("ws_max_inflated_size", &mut lcf.max_inflated),
            _ => ("ws_max_message_size", &mut lcf.max_message),
        };
        if *field != NGX_CONF_UNSET_SIZE {
            return Err(ConfError::Duplicate(directive));
        }
        *field = if a[1].as_bytes() == b"off" {
            0
        } else {
            parse_size(&a[1])
                .filter(|&n| n > 0)
                .ok_or(ConfError::InvalidValue {
                    directive,
                    value: text(&a[1]),
                })?
        };
        Ok(())
    })();
    finish(cf, r)
}

extern "C" fn ngx_http_ws_set_protocol_check(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with our location configuration.
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    // SAFETY: called by nginx while parsing this directive.
    let a = unsafe { args(cf) };
    let r = (|| {
        if lcf.protocol_check != NGX_CONF_UNSET_SIZE {
            return Err(ConfError::Duplicate("ws_protocol_check"));
        }
        lcf.protocol_check = match a[1].as_bytes() {
            b"on" => 1,
            b"off" => 0,
            _ => {
                return Err(ConfError::InvalidValue {
                    directive: "ws_protocol_check",
                    value: text(&a[1]),
                })
            }
        };
        Ok(())
    })();
    finish(cf, r)
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

const LOC_ANY: ngx_uint_t = (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF) as _;
const SRV_LOC: ngx_uint_t = (NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF) as _;

pub static mut NGX_HTTP_WS_COMMANDS: [ngx_command_t; 19] = [
    ngx_command_t {
        name: ngx_string!("ws_log"),
        type_: LOC_ANY | NGX_CONF_TAKE123 as ngx_uint_t,
        set: Some(ngx_http_ws_set_log),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_log_events"),
        type_: LOC_ANY | NGX_CONF_1MORE as ngx_uint_t,
        set: Some(ngx_http_ws_set_log_events),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_log_payload"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_log_payload),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_idle_timeout"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_max_lifetime"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_ping_interval"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_pong_timeout"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_close_timeout"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_drain"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_time),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_route"),
        type_: SRV_LOC | NGX_CONF_2MORE as ngx_uint_t,
        set: Some(ngx_http_ws_set_route),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_allow_origin"),
        type_: LOC_ANY | NGX_CONF_1MORE as ngx_uint_t,
        set: Some(ngx_http_ws_set_allow_origin),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_handshake"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_handshake),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_max_frame_size"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_limit),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_max_message_size"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_limit),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_max_inflated_size"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_limit),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_protocol_check"),
        type_: LOC_ANY | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_http_ws_set_protocol_check),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_status_zone"),
        type_: (NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2) as ngx_uint_t,
        set: Some(crate::status::ngx_http_ws_set_status_zone),
        conf: NGX_HTTP_MAIN_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("ws_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(crate::status::ngx_http_ws_set_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];
