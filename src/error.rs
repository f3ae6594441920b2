//! Configuration errors, printed once at the directive the way nginx prints its own.

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
    #[error("\"ws_log off\" cannot be combined with other \"ws_log\" in the same scope")]
    LogOffWithOthers,
    #[error("\"ws_log\" \"{0}\": logs to syslog cannot be buffered")]
    SyslogBuffered(String),
    #[error("too many \"ws_log\" in one scope, the maximum is {0}")]
    TooManyLogs(usize),
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
    #[error("invalid zone size \"{0}\" in \"ws_limit_zone\" directive")]
    LimitZoneSize(String),
    #[error(
        "zone \"{value}\" is too small in \"ws_limit_zone\" directive, the minimum is {min_k}k"
    )]
    LimitZoneTooSmall { value: String, min_k: usize },
    #[error("invalid rate \"{0}\" in \"ws_limit_zone\" directive, use Nr/s or Nr/m")]
    LimitRate(String),
    #[error("\"{directive}\" must have \"{param}\" parameter")]
    MissingParam {
        directive: &'static str,
        param: &'static str,
    },
    #[error("ws_limit_zone \"{name}\" is already bound to key \"{key}\"")]
    LimitZoneBound { name: String, key: String },
    #[error("\"ws_limit\" zone \"{0}\" is duplicate in this scope")]
    LimitDuplicate(String),
    #[error("ws_limit: zone \"{0}\" is not defined by a ws_limit_zone")]
    LimitZoneUnknown(String),
    #[error("\"{0}\" directive is not inside http{{}}")]
    NoMainConf(&'static str),
    #[error("out of memory")]
    NoMemory,
    /// nginx has already logged why.
    #[error("")]
    Reported,
}
