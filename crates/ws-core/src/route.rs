//! Request-side policy, pure: `ws_route` rules and their matching, `ws_allow_origin` origins,
//! and the RFC 6455 handshake checks of `ws_handshake strict` (request and upstream 101).
//!
//! No nginx types: regexes are anything implementing [`Matcher`] (nginx's PCRE in the module,
//! a plain closure in the unit tests). The glue in `gate.rs` feeds these from the request.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// A compiled regular expression.
pub trait Matcher {
    fn is_match(&self, s: &[u8]) -> bool;
}

/// How a `ws_route` pattern matches `$uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// No modifier: `$uri` starts with the pattern (case-sensitive, like `location`).
    Prefix,
    /// `=`: `$uri` is the pattern.
    Exact,
    /// `~` (`caseless: false`) or `~*`.
    Regex { caseless: bool },
}

/// A parsed `ws_route` directive, before its regex (if any) is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleSpec {
    Default {
        upstream: String,
    },
    Rule {
        kind: Kind,
        pattern: String,
        upstream: String,
        protocols: Vec<String>,
    },
}

/// Why a `ws_route` directive is malformed (the glue turns these into nginx-style messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A value that is not a usable pattern, upstream name or protocol list.
    Value(String),
    /// An argument that is not understood.
    Parameter(String),
    /// Wrong number of arguments.
    Count,
}

/// Parses the arguments of `ws_route` (without the directive name).
///
/// `ws_route default upstream;` or `ws_route [=|~|~*]pattern upstream [protocol=a,b];`; the
/// modifier may also stand alone, as in `location = /x`.
pub fn parse_rule(args: &[&str]) -> Result<RuleSpec, ParseError> {
    if args.first() == Some(&"default") {
        return match args {
            [_, up] => Ok(RuleSpec::Default {
                upstream: upstream_name(up)?,
            }),
            [_, _, extra, ..] => Err(ParseError::Parameter((*extra).to_string())),
            _ => Err(ParseError::Count),
        };
    }
    let (kind, rest): (Kind, Vec<&str>) = match args {
        ["=", p, rest @ ..] => (Kind::Exact, [&[*p], rest].concat()),
        ["~", p, rest @ ..] => (Kind::Regex { caseless: false }, [&[*p], rest].concat()),
        ["~*", p, rest @ ..] => (Kind::Regex { caseless: true }, [&[*p], rest].concat()),
        [p, rest @ ..] => {
            let (kind, p) = if let Some(p) = p.strip_prefix("~*") {
                (Kind::Regex { caseless: true }, p)
            } else if let Some(p) = p.strip_prefix('~') {
                (Kind::Regex { caseless: false }, p)
            } else if let Some(p) = p.strip_prefix('=') {
                (Kind::Exact, p)
            } else {
                (Kind::Prefix, *p)
            };
            (kind, [&[p], rest].concat())
        }
        [] => return Err(ParseError::Count),
    };
    let (pattern, upstream, params) = match rest.as_slice() {
        [p, u, params @ ..] => (*p, *u, params),
        _ => return Err(ParseError::Count),
    };
    if pattern.is_empty() {
        return Err(ParseError::Value(pattern.to_string()));
    }
    let upstream = upstream_name(upstream)?;
    let mut protocols = Vec::new();
    for p in params {
        let Some(list) = p.strip_prefix("protocol=") else {
            return Err(ParseError::Parameter((*p).to_string()));
        };
        if !protocols.is_empty() {
            return Err(ParseError::Parameter((*p).to_string()));
        }
        for name in list.split(',') {
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(ParseError::Value((*p).to_string()));
            }
            protocols.push(name.to_string());
        }
    }
    Ok(RuleSpec::Rule {
        kind,
        pattern: pattern.to_string(),
        upstream,
        protocols,
    })
}

fn upstream_name(s: &str) -> Result<String, ParseError> {
    if s.is_empty() || s.contains(['/', ' ']) || s.contains("://") {
        return Err(ParseError::Value(s.to_string()));
    }
    Ok(s.to_string())
}

/// RFC 7230 `tchar`: what a subprotocol or extension name is made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How a compiled rule matches.
#[derive(Debug, Clone)]
pub enum Pattern<R> {
    Prefix(String),
    Exact(String),
    Regex(R),
}

/// One `ws_route` rule, ready to match.
#[derive(Debug, Clone)]
pub struct Rule<R> {
    pub pattern: Pattern<R>,
    pub upstream: String,
    pub protocols: Vec<String>,
    /// The rule as `$ws_route` shows it: modifier and pattern (`~^/chat/`, `=/ws`, `/a`), then
    /// ` protocol=a,b` when the rule has one.
    pub text: String,
}

impl<R> Rule<R> {
    /// Builds a rule from its parsed form; `regex` compiles a regex pattern.
    pub fn new<E>(
        kind: Kind,
        pattern: String,
        upstream: String,
        protocols: Vec<String>,
        regex: impl FnOnce(&str, bool) -> Result<R, E>,
    ) -> Result<Rule<R>, E> {
        let modifier = match kind {
            Kind::Prefix => "",
            Kind::Exact => "=",
            Kind::Regex { caseless: false } => "~",
            Kind::Regex { caseless: true } => "~*",
        };
        let mut text = format!("{modifier}{pattern}");
        if !protocols.is_empty() {
            text.push_str(" protocol=");
            text.push_str(&protocols.join(","));
        }
        let pattern = match kind {
            Kind::Prefix => Pattern::Prefix(pattern),
            Kind::Exact => Pattern::Exact(pattern),
            Kind::Regex { caseless } => Pattern::Regex(regex(&pattern, caseless)?),
        };
        Ok(Rule {
            pattern,
            upstream,
            protocols,
            text,
        })
    }
}

/// The `ws_route` rules of one scope, in configuration order.
#[derive(Debug, Clone)]
pub struct Routes<R> {
    pub rules: Vec<Rule<R>>,
    pub default: Option<String>,
}

impl<R> Default for Routes<R> {
    fn default() -> Self {
        Routes {
            rules: Vec::new(),
            default: None,
        }
    }
}

/// The text `$ws_route` shows for the default.
pub const DEFAULT_ROUTE: &str = "default";

/// What routing chose for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen<'a> {
    /// `$ws_route`.
    pub route: &'a str,
    /// `$ws_upstream`.
    pub upstream: &'a str,
}

impl<R: Matcher> Routes<R> {
    /// The route for a request: for an upgrade request the first rule (in configuration order)
    /// whose pattern matches `uri` and, if it lists protocols, one of which the client offers;
    /// otherwise, and for every plain HTTP request, the default.
    pub fn choose<'a>(
        &'a self,
        uri: &[u8],
        upgrade: bool,
        offered: &[&[u8]],
    ) -> Option<Chosen<'a>> {
        if upgrade {
            for rule in &self.rules {
                let hit = match &rule.pattern {
                    Pattern::Prefix(p) => uri.starts_with(p.as_bytes()),
                    Pattern::Exact(p) => uri == p.as_bytes(),
                    Pattern::Regex(re) => re.is_match(uri),
                };
                let proto_ok = rule.protocols.is_empty()
                    || rule
                        .protocols
                        .iter()
                        .any(|p| offered.contains(&p.as_bytes()));
                if hit && proto_ok {
                    return Some(Chosen {
                        route: &rule.text,
                        upstream: &rule.upstream,
                    });
                }
            }
        }
        self.default.as_deref().map(|upstream| Chosen {
            route: DEFAULT_ROUTE,
            upstream,
        })
    }
}

/// The comma-separated tokens of header values (several header lines count as one list), with
/// surrounding whitespace removed and empty elements skipped.
pub fn tokens<'a>(values: &[&'a [u8]]) -> Vec<&'a [u8]> {
    values
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether header values contain `token` (case-insensitive), as for `Connection: upgrade`.
pub fn has_token(values: &[&[u8]], token: &[u8]) -> bool {
    tokens(values).iter().any(|t| t.eq_ignore_ascii_case(token))
}

/// The extension names of `Sec-WebSocket-Extensions` values (parameters after `;` dropped).
pub fn extension_names<'a>(values: &[&'a [u8]]) -> Vec<&'a [u8]> {
    tokens(values)
        .into_iter()
        .map(|e| {
            e.split(|&b| b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

// --- ws_allow_origin -------------------------------------------------------------------------

/// A serialized origin, normalized: scheme and host lowercase, a default port (80 for http/ws,
/// 443 for https/wss) dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Origin {
    /// Parses `scheme://host[:port]` (an `Origin` header value or a configured origin).
    /// Anything else, including a path, userinfo or the opaque origin `null`, is `None`.
    pub fn parse(s: &[u8]) -> Option<Origin> {
        let s = std::str::from_utf8(s.trim_ascii()).ok()?;
        let (scheme, rest) = s.split_once("://")?;
        if scheme.is_empty()
            || !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return None;
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6.split_once(']')?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':')?),
            };
            (format!("[{addr}]"), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;=[]:".contains(&b))
            && (host.starts_with('[') || !host.contains(':'));
        if !host_ok {
            return None;
        }
        let port = match port {
            None => None,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                Some(p.parse::<u16>().ok()?)
            }
            Some(_) => return None,
        };
        let scheme = scheme.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        };
        Some(Origin {
            port: port.filter(|&p| Some(p) != default),
            host: host.to_ascii_lowercase(),
            scheme,
        })
    }
}

/// One `ws_allow_origin` entry.
#[derive(Debug, Clone)]
pub enum OriginRule<R> {
    /// `*`: any origin.
    Any,
    Exact(Origin),
    /// `scheme://*.suffix[:port]`: hosts with at least one label before `.suffix` (any
    /// depth), not `suffix` itself. `suffix` is stored with its leading dot.
    Wildcard(Origin),
    /// `~re` / `~*re`, matched against the header value as sent.
    Regex(R),
}

/// A parsed `ws_allow_origin` value, before its regex (if any) is compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginSpec {
    Any,
    Exact(Origin),
    Wildcard(Origin),
    Regex { pattern: String, caseless: bool },
}

/// Parses one `ws_allow_origin` value (not `missing=`).
pub fn parse_origin(s: &str) -> Option<OriginSpec> {
    if s == "*" {
        return Some(OriginSpec::Any);
    }
    if let Some(p) = s.strip_prefix("~*") {
        return (!p.is_empty()).then(|| OriginSpec::Regex {
            pattern: p.to_string(),
            caseless: true,
        });
    }
    if let Some(p) = s.strip_prefix('~') {
        return (!p.is_empty()).then(|| OriginSpec::Regex {
            pattern: p.to_string(),
            caseless: false,
        });
    }
    if let Some((scheme, rest)) = s.split_once("://*.") {
        // Parse the rest as if it were a plain origin, then keep its host as the suffix.
        let o = Origin::parse(format!("{scheme}://{rest}").as_bytes())?;
        if o.host.starts_with('[') || o.host.contains('*') || o.host.starts_with('.') {
            return None;
        }
        return Some(OriginSpec::Wildcard(Origin {
            host: format!(".{}", o.host),
            ..o
        }));
    }
    let o = Origin::parse(s.as_bytes())?;
    if o.host.contains('*') {
        return None;
    }
    Some(OriginSpec::Exact(o))
}

/// The `ws_allow_origin` list of one scope.
#[derive(Debug, Clone)]
pub struct Origins<R> {
    pub rules: Vec<OriginRule<R>>,
    /// `missing=deny`.
    pub missing_deny: bool,
}

impl<R: Matcher> Origins<R> {
    /// Whether an upgrade request with these `Origin` header values may pass. No header: allowed
    /// unless `missing=deny`. More than one `Origin` header: only `*` allows it.
    pub fn allows(&self, values: &[&[u8]]) -> bool {
        let value = match values {
            [] => return !self.missing_deny,
            [v] => v.trim_ascii(),
            _ => return self.rules.iter().any(|r| matches!(r, OriginRule::Any)),
        };
        let parsed = Origin::parse(value);
        self.rules.iter().any(|rule| match rule {
            OriginRule::Any => true,
            OriginRule::Regex(re) => re.is_match(value),
            OriginRule::Exact(o) => parsed.as_ref() == Some(o),
            OriginRule::Wildcard(w) => parsed.as_ref().is_some_and(|o| {
                o.scheme == w.scheme
                    && o.port == w.port
                    && o.host.len() > w.host.len()
                    && o.host.ends_with(&w.host)
                    && !o.host.starts_with('.')
            }),
        })
    }
}

// --- ws_handshake strict ---------------------------------------------------------------------

/// What `ws_handshake strict` found wrong with an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Malformed per RFC 6455 4.2.1: answered with 400. The text is for the error log.
    Bad(&'static str),
    /// `Sec-WebSocket-Version` present but not 13: answered with 426 and
    /// `Sec-WebSocket-Version: 13`.
    Version,
}

// --- what an upgrade asks for -----------------------------------------------------------------

/// What a request's `Upgrade` header fields (all of them, however many) ask for.
///
/// nginx tunnels any request with an `Upgrade` field once the upstream answers 101, whatever
/// the field says; so every such request is an upgrade attempt for the module's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// No `Upgrade` field: a plain HTTP request.
    None,
    /// Every token names `websocket`.
    WebSocket,
    /// `websocket` among other protocols (`h2c, websocket`, or two fields).
    Mixed,
    /// Fields, but no token names `websocket` (another protocol, or empty).
    Other,
}

/// Whether an `Upgrade` token (`protocol-name["/" protocol-version]`, RFC 9110 7.8) names
/// WebSocket.
fn names_websocket(token: &[u8]) -> bool {
    let name = token.split(|&b| b == b'/').next().unwrap_or_default();
    name.trim_ascii().eq_ignore_ascii_case(b"websocket")
}

/// Classifies the values of every `Upgrade` field of a request.
pub fn upgrade_offer(values: &[&[u8]]) -> Upgrade {
    if values.is_empty() {
        return Upgrade::None;
    }
    let tokens = tokens(values);
    let ws = tokens.iter().filter(|t| names_websocket(t)).count();
    match ws {
        0 => Upgrade::Other,
        n if n == tokens.len() => Upgrade::WebSocket,
        _ => Upgrade::Mixed,
    }
}

/// Whether a 101 answering an upgrade attempt starts a WebSocket tunnel: the upstream's
/// `Upgrade` fields name `websocket`, or it sent `Sec-WebSocket-Accept`, or, naming nothing,
/// it did not say it switched to another protocol. Only a 101 that names another protocol
/// and carries no `Sec-WebSocket-Accept` is another protocol's tunnel.
pub fn switched_to_websocket(upgrade: &[&[u8]], accept: bool) -> bool {
    accept || upgrade_offer(upgrade) != Upgrade::Other
}

/// The parts of an upgrade request that RFC 6455 4.2.1 constrains.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRequest<'a> {
    pub get: bool,
    /// HTTP/1.1 or later.
    pub http11: bool,
    /// HTTP/2 or HTTP/3: nginx has no WebSocket tunnel there (RFC 8441 is not supported).
    pub http2: bool,
    pub upgrade: Upgrade,
    pub connection: &'a [&'a [u8]],
    pub key: &'a [&'a [u8]],
    pub version: &'a [&'a [u8]],
}

/// Checks an upgrade request (one with an `Upgrade` field) against RFC 6455 4.2.1.
pub fn check_request(r: &UpgradeRequest<'_>) -> Result<(), RequestError> {
    if !r.get {
        return Err(RequestError::Bad("method is not GET"));
    }
    if !r.http11 {
        return Err(RequestError::Bad("HTTP version is below 1.1"));
    }
    if r.http2 {
        return Err(RequestError::Bad("upgrade over HTTP/2 or HTTP/3"));
    }
    match r.upgrade {
        Upgrade::WebSocket => {}
        Upgrade::Mixed => {
            return Err(RequestError::Bad(
                "\"Upgrade\" offers other protocols besides \"websocket\"",
            ))
        }
        Upgrade::None | Upgrade::Other => {
            return Err(RequestError::Bad("\"Upgrade\" lacks \"websocket\""))
        }
    }
    if !has_token(r.connection, b"upgrade") {
        return Err(RequestError::Bad("\"Connection\" lacks \"upgrade\""));
    }
    let key = match r.key {
        [k] => k.trim_ascii(),
        [] => return Err(RequestError::Bad("no \"Sec-WebSocket-Key\"")),
        _ => return Err(RequestError::Bad("more than one \"Sec-WebSocket-Key\"")),
    };
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if k.len() == 16 => {}
        _ => {
            return Err(RequestError::Bad(
                "\"Sec-WebSocket-Key\" is not base64 of 16 bytes",
            ))
        }
    }
    match r.version {
        [] => Err(RequestError::Bad("no \"Sec-WebSocket-Version\"")),
        [v] if v.trim_ascii() == b"13" => Ok(()),
        _ => Err(RequestError::Version),
    }
}

/// The GUID of RFC 6455 1.3.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_for(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key.trim_ascii());
    h.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The headers of a handshake that `ws_handshake strict` checks in an upstream's 101.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    /// The client's `Sec-WebSocket-Key`.
    pub key: &'a [&'a [u8]],
    /// The client's `Sec-WebSocket-Protocol` and `Sec-WebSocket-Extensions`.
    pub offered_protocols: &'a [&'a [u8]],
    pub offered_extensions: &'a [&'a [u8]],
    /// The upstream's `Sec-WebSocket-Accept`, `-Protocol` and `-Extensions`.
    pub accept: &'a [&'a [u8]],
    pub protocol: &'a [&'a [u8]],
    pub extensions: &'a [&'a [u8]],
}

/// Checks an upstream's 101 against the client's request (RFC 6455 4.1, client side): the
/// accept value, a selected subprotocol the client offered (exactly one, compared
/// case-sensitively), and only extensions the client offered (names compared
/// case-insensitively). The error text is for the error log.
pub fn check_response(h: &Handshake<'_>) -> Result<(), &'static str> {
    let [key] = h.key else {
        return Err("the client sent no single \"Sec-WebSocket-Key\"");
    };
    match h.accept {
        [a] if a.trim_ascii() == accept_for(key).as_bytes() => {}
        [] => return Err("no \"Sec-WebSocket-Accept\""),
        _ => return Err("wrong \"Sec-WebSocket-Accept\""),
    }
    let selected = tokens(h.protocol);
    match selected.as_slice() {
        [] => {}
        [p] if tokens(h.offered_protocols).contains(p) => {}
        [_] => return Err("subprotocol the client did not offer"),
        _ => return Err("more than one subprotocol selected"),
    }
    let offered = extension_names(h.offered_extensions);
    for e in extension_names(h.extensions) {
        if !offered.iter().any(|o| o.eq_ignore_ascii_case(e)) {
            return Err("extension the client did not offer");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake regex for the tests: substring, or prefix with `^`; `caseless` lowercases.
    #[derive(Debug, Clone)]
    struct Fake(String, bool);

    impl Matcher for Fake {
        fn is_match(&self, s: &[u8]) -> bool {
            let s = String::from_utf8_lossy(s);
            let (s, p) = if self.1 {
                (s.to_lowercase(), self.0.to_lowercase())
            } else {
                (s.into_owned(), self.0.clone())
            };
            match p.strip_prefix('^') {
                Some(p) => s.starts_with(p),
                None => s.contains(&p),
            }
        }
    }

    fn fake(p: &str, caseless: bool) -> Result<Fake, ()> {
        Ok(Fake(p.to_string(), caseless))
    }

    fn routes(lines: &[&[&str]]) -> Routes<Fake> {
        let mut r = Routes::default();
        for args in lines {
            match parse_rule(args).unwrap() {
                RuleSpec::Default { upstream } => r.default = Some(upstream),
                RuleSpec::Rule {
                    kind,
                    pattern,
                    upstream,
                    protocols,
                } => r
                    .rules
                    .push(Rule::new(kind, pattern, upstream, protocols, fake).unwrap()),
            }
        }
        r
    }

    #[test]
    fn parse_forms() {
        assert_eq!(
            parse_rule(&["default", "pool"]),
            Ok(RuleSpec::Default {
                upstream: "pool".into()
            })
        );
        assert_eq!(parse_rule(&["=/ws", "a"]), parse_rule(&["=", "/ws", "a"]),);
        let RuleSpec::Rule {
            kind, protocols, ..
        } = parse_rule(&["~*", "^/Chat", "a", "protocol=v1,v2.json"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(kind, Kind::Regex { caseless: true });
        assert_eq!(protocols, ["v1", "v2.json"]);
        assert_eq!(
            parse_rule(&["~^/x", "a"]).unwrap(),
            RuleSpec::Rule {
                kind: Kind::Regex { caseless: false },
                pattern: "^/x".into(),
                upstream: "a".into(),
                protocols: vec![]
            }
        );
        assert_eq!(
            parse_rule(&["/x", "a", "proto=v1"]),
            Err(ParseError::Parameter("proto=v1".into()))
        );
        assert_eq!(
            parse_rule(&["/x", "a", "protocol="]),
            Err(ParseError::Value("protocol=".into()))
        );
        assert_eq!(
            parse_rule(&["/x", "a", "protocol=a,,b"]),
            Err(ParseError::Value("protocol=a,,b".into()))
        );
        assert_eq!(
            parse_rule(&["/x", "a", "protocol=a b"]),
            Err(ParseError::Value("protocol=a b".into()))
        );
        assert_eq!(
            parse_rule(&["default", "a", "protocol=x"]),
            Err(ParseError::Parameter("protocol=x".into()))
        );
        assert_eq!(parse_rule(&["/x"]), Err(ParseError::Count));
        assert_eq!(parse_rule(&["=", "/x"]), Err(ParseError::Count));
        assert_eq!(parse_rule(&["~", "a"]), Err(ParseError::Count));
        assert_eq!(
            parse_rule(&["=", "", "a"]),
            Err(ParseError::Value("".into()))
        );
        assert_eq!(
            parse_rule(&["/x", "http://a"]),
            Err(ParseError::Value("http://a".into()))
        );
    }

    #[test]
    fn first_match_wins_and_texts() {
        let r = routes(&[
            &["=/exact", "e"],
            &["/chat/", "chat", "protocol=v2"],
            &["~^/chat/", "re"],
            &["~*", "^/LOUD", "loud"],
            &["/", "root"],
            &["default", "dflt"],
        ]);
        let pick = |uri: &str, offered: &[&[u8]]| r.choose(uri.as_bytes(), true, offered);
        assert_eq!(
            pick("/exact", &[]),
            Some(Chosen {
                route: "=/exact",
                upstream: "e"
            })
        );
        assert_eq!(pick("/exact/x", &[]).unwrap().upstream, "root");
        let c = pick("/chat/1", &[b"v1", b"v2"]).unwrap();
        assert_eq!((c.route, c.upstream), ("/chat/ protocol=v2", "chat"));
        // Protocols are case-sensitive; without the protocol the next rule matches.
        assert_eq!(pick("/chat/1", &[b"V2"]).unwrap().route, "~^/chat/");
        assert_eq!(pick("/loud/x", &[]).unwrap().route, "~*^/LOUD");
        assert_eq!(pick("nope", &[]).unwrap().route, "default");
        // Plain HTTP requests always get the default.
        assert_eq!(r.choose(b"/exact", false, &[]).unwrap().upstream, "dflt");
        let none = routes(&[&["/a", "a"]]);
        assert_eq!(none.choose(b"/b", true, &[]), None);
        assert_eq!(none.choose(b"/a", false, &[]), None);
        assert_eq!(none.choose(b"/a", true, &[]).unwrap().upstream, "a");
    }

    #[test]
    fn token_lists() {
        assert_eq!(
            tokens(&[b" a , b", b"c,,", b""]),
            [b"a" as &[u8], b"b", b"c"]
        );
        assert!(has_token(&[b"keep-alive, Upgrade"], b"upgrade"));
        assert!(!has_token(&[b"keep-alive, upgraded"], b"upgrade"));
        assert_eq!(
            extension_names(&[b"permessage-deflate; client_max_window_bits, x-foo"]),
            [b"permessage-deflate" as &[u8], b"x-foo"]
        );
    }

    fn origins(list: &[&str], missing_deny: bool) -> Origins<Fake> {
        let rules = list
            .iter()
            .map(|s| match parse_origin(s).unwrap_or_else(|| panic!("{s}")) {
                OriginSpec::Any => OriginRule::Any,
                OriginSpec::Exact(o) => OriginRule::Exact(o),
                OriginSpec::Wildcard(o) => OriginRule::Wildcard(o),
                OriginSpec::Regex { pattern, caseless } => {
                    OriginRule::Regex(Fake(pattern, caseless))
                }
            })
            .collect();
        Origins {
            rules,
            missing_deny,
        }
    }

    #[test]
    fn origin_parsing() {
        let o = Origin::parse(b"HTTPS://App.Example.COM:443").unwrap();
        assert_eq!(
            o,
            Origin {
                scheme: "https".into(),
                host: "app.example.com".into(),
                port: None
            }
        );
        assert_eq!(Origin::parse(b"http://a:8080").unwrap().port, Some(8080));
        assert_eq!(Origin::parse(b"http://[::1]:8080").unwrap().host, "[::1]");
        for bad in [
            "null",
            "https://a/",
            "https://a/x",
            "https://",
            "a.example.com",
            "https://a:",
            "https://a:99999",
            "https://a:8x",
            "https://u@a",
            "1http://a",
        ] {
            assert!(Origin::parse(bad.as_bytes()).is_none(), "{bad}");
        }
        for bad in [
            "https://*",
            "https://a*.b",
            "https://*.*.b",
            "~",
            "https://*.[::1]",
            "x",
        ] {
            assert!(parse_origin(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn origin_exact() {
        let o = origins(&["https://app.example.com", "http://localhost:3000"], false);
        assert!(o.allows(&[b"https://app.example.com"]));
        assert!(o.allows(&[b"HTTPS://APP.example.com"]));
        assert!(o.allows(&[b"https://app.example.com:443"]));
        assert!(!o.allows(&[b"https://app.example.com:8443"]));
        assert!(!o.allows(&[b"http://app.example.com"]));
        assert!(!o.allows(&[b"https://app.example.com.evil.com"]));
        assert!(!o.allows(&[b"https://evil-app.example.com"]));
        assert!(o.allows(&[b"http://localhost:3000"]));
        assert!(!o.allows(&[b"http://localhost"]));
        assert!(!o.allows(&[b"null"]));
        // No Origin: allowed unless missing=deny.
        assert!(o.allows(&[]));
        assert!(!origins(&["https://a.b"], true).allows(&[]));
        // Two Origin headers are refused unless `*`.
        assert!(!o.allows(&[b"https://app.example.com", b"https://app.example.com"]));
        assert!(origins(&["*"], false).allows(&[b"x", b"y"]));
    }

    #[test]
    fn origin_wildcard() {
        let o = origins(&["https://*.example.com"], false);
        assert!(o.allows(&[b"https://a.example.com"]));
        assert!(o.allows(&[b"https://a.b.example.com"]));
        assert!(o.allows(&[b"https://A.Example.Com"]));
        assert!(!o.allows(&[b"https://example.com"]));
        assert!(!o.allows(&[b"https://evil-example.com"]));
        assert!(!o.allows(&[b"https://example.com.evil.com"]));
        assert!(!o.allows(&[b"https://.example.com"]));
        assert!(!o.allows(&[b"http://a.example.com"]));
        assert!(!o.allows(&[b"https://a.example.com:8443"]));
        let p = origins(&["https://*.example.com:8443"], false);
        assert!(p.allows(&[b"https://a.example.com:8443"]));
        assert!(!p.allows(&[b"https://a.example.com"]));
    }

    #[test]
    fn origin_regex_and_any() {
        let o = origins(&["~^https://dev-"], false);
        assert!(o.allows(&[b"https://dev-1.example.net"]));
        assert!(!o.allows(&[b"https://DEV-1.example.net"]));
        assert!(origins(&["~*^https://dev-"], false).allows(&[b"HTTPS://DEV-1"]));
        let any = origins(&["*"], true);
        assert!(any.allows(&[b"null"]));
        assert!(!any.allows(&[]));
    }

    const KEY: &[u8] = b"dGhlIHNhbXBsZSBub25jZQ==";

    fn req<'a>(
        connection: &'a [&'a [u8]],
        key: &'a [&'a [u8]],
        version: &'a [&'a [u8]],
    ) -> UpgradeRequest<'a> {
        UpgradeRequest {
            get: true,
            http11: true,
            http2: false,
            upgrade: Upgrade::WebSocket,
            connection,
            key,
            version,
        }
    }

    #[test]
    fn request_checks() {
        let ok = req(&[b"keep-alive, Upgrade"], &[KEY], &[b"13"]);
        assert_eq!(check_request(&ok), Ok(()));
        assert!(matches!(
            check_request(&UpgradeRequest { get: false, ..ok }),
            Err(RequestError::Bad(_))
        ));
        assert!(matches!(
            check_request(&UpgradeRequest {
                http11: false,
                ..ok
            }),
            Err(RequestError::Bad(_))
        ));
        let bad = |r: UpgradeRequest<'_>| matches!(check_request(&r), Err(RequestError::Bad(_)));
        assert!(bad(UpgradeRequest { http2: true, ..ok }));
        for upgrade in [Upgrade::Mixed, Upgrade::Other, Upgrade::None] {
            assert!(bad(UpgradeRequest { upgrade, ..ok }), "{upgrade:?}");
        }
        assert!(bad(req(&[], &[KEY], &[b"13"])));
        assert!(bad(req(&[b"close"], &[KEY], &[b"13"])));
        assert!(bad(req(&[b"upgrade"], &[], &[b"13"])));
        assert!(bad(req(&[b"upgrade"], &[KEY, KEY], &[b"13"])));
        assert!(bad(req(&[b"upgrade"], &[b"c2hvcnQ="], &[b"13"])));
        assert!(bad(req(
            &[b"upgrade"],
            &[b"AAAAAAAAAAAAAAAAAAAAAAAA"],
            &[b"13"]
        )));
        assert!(bad(req(
            &[b"upgrade"],
            &[b"not base64 at all!!!!!=="],
            &[b"13"]
        )));
        assert!(bad(req(&[b"upgrade"], &[KEY], &[])));
        assert_eq!(
            check_request(&req(&[b"upgrade"], &[KEY], &[b"8"])),
            Err(RequestError::Version)
        );
        assert_eq!(
            check_request(&req(&[b"upgrade"], &[KEY], &[b"13", b"8"])),
            Err(RequestError::Version)
        );
    }

    #[test]
    fn accept_value() {
        // RFC 6455 1.3's example.
        assert_eq!(accept_for(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn response_checks() {
        let good = Handshake {
            key: &[KEY],
            offered_protocols: &[b"chat, superchat"],
            offered_extensions: &[b"permessage-deflate; client_max_window_bits"],
            accept: &[b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="],
            protocol: &[b"chat"],
            extensions: &[b"Permessage-Deflate; server_no_context_takeover"],
        };
        assert_eq!(check_response(&good), Ok(()));
        assert!(check_response(&Handshake {
            protocol: &[],
            extensions: &[],
            ..good
        })
        .is_ok());
        assert!(check_response(&Handshake {
            accept: &[b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            accept: &[],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            protocol: &[b"Chat"],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            protocol: &[b"chat, superchat"],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            offered_protocols: &[],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            extensions: &[b"x-webkit-deflate-frame"],
            ..good
        })
        .is_err());
        assert!(check_response(&Handshake {
            offered_extensions: &[],
            ..good
        })
        .is_err());
    }

    #[test]
    fn upgrade_offers() {
        assert_eq!(upgrade_offer(&[]), Upgrade::None);
        assert_eq!(upgrade_offer(&[b"websocket"]), Upgrade::WebSocket);
        assert_eq!(upgrade_offer(&[b" WebSocket "]), Upgrade::WebSocket);
        assert_eq!(upgrade_offer(&[b"websocket/13"]), Upgrade::WebSocket);
        // Every field counts, not only the first.
        assert_eq!(upgrade_offer(&[b"h2c", b"websocket"]), Upgrade::Mixed);
        assert_eq!(upgrade_offer(&[b"h2c, websocket"]), Upgrade::Mixed);
        assert_eq!(
            upgrade_offer(&[b"websocket", b"websocket"]),
            Upgrade::WebSocket
        );
        assert_eq!(upgrade_offer(&[b"h2c"]), Upgrade::Other);
        assert_eq!(upgrade_offer(&[b"websocketx"]), Upgrade::Other);
        assert_eq!(upgrade_offer(&[b""]), Upgrade::Other);
    }

    #[test]
    fn what_a_101_switched_to() {
        assert!(switched_to_websocket(&[b"websocket"], false));
        assert!(switched_to_websocket(&[], false));
        assert!(switched_to_websocket(&[b"foo"], true));
        assert!(switched_to_websocket(&[b"foo", b"websocket"], false));
        assert!(!switched_to_websocket(&[b"foo"], false));
    }
}
