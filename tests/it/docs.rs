//! The documentation is checked like code: every relative link in README.md, CONTRIBUTING.md
//! and docs/*.md points to a file that exists (and an `#anchor` to one of its headings, as
//! GitHub makes them), and every ```nginx block passes `nginx -t` with the module loaded.
//!
//! A block is checked in the context its fence names after the language (```nginx main,
//! ```nginx http, ```nginx server, ```nginx location); without one, the context is guessed
//! from what the block holds. The wrapper adds what a snippet leaves out: the `load_module`
//! line, `events {}`, a server, and an `upstream {}` block for every name that `proxy_pass`
//! or `ws_route` uses and the snippet does not define. `listen` addresses become free ports on
//! 127.0.0.1, files the snippet names are created in a temporary prefix (certificates made up
//! for `ssl_certificate`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{free_port, module_path, nginx_bin};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The documentation files, README first.
fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    let mut files = vec![root.join("README.md"), root.join("CONTRIBUTING.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    for f in &files {
        assert!(f.exists(), "{} is missing", f.display());
    }
    files
}

fn rel(p: &Path) -> String {
    p.strip_prefix(ROOT).unwrap_or(p).display().to_string()
}

/// A fenced code block: its info string, first line number (of the fence) and text.
struct Fence {
    info: String,
    line: usize,
    text: String,
}

/// A Markdown file split into prose lines (with their numbers) and fenced blocks.
struct Doc {
    prose: Vec<(usize, String)>,
    fences: Vec<Fence>,
}

fn parse(text: &str) -> Doc {
    let mut doc = Doc {
        prose: Vec::new(),
        fences: Vec::new(),
    };
    // The open fence's marker (``` or ~~~) and the block so far.
    let mut open: Option<(&str, Fence)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let t = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        match (open.as_mut(), marker) {
            (Some((m, _)), Some(found)) if found == *m && t.trim_end() == found => {
                let (_, f) = open.take().expect("open fence");
                doc.fences.push(f);
            }
            (Some((_, f)), _) => {
                f.text.push_str(line);
                f.text.push('\n');
            }
            (None, Some(found)) => {
                let info = t[found.len()..].trim().to_string();
                open = Some((
                    found,
                    Fence {
                        info,
                        line: n,
                        text: String::new(),
                    },
                ));
            }
            (None, None) => doc.prose.push((n, line.to_string())),
        }
    }
    assert!(open.is_none(), "unclosed code fence");
    doc
}

/// GitHub's anchor for a heading: lowercase, spaces to `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor of a Markdown file (duplicates numbered as GitHub numbers them).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in parse(text).prose {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes == 0 || hashes > 6 || !line[hashes..].starts_with(' ') {
            continue;
        }
        let s = slug(&line[hashes..]);
        let n = seen.entry(s.clone()).or_insert(0);
        out.insert(if *n == 0 {
            s.clone()
        } else {
            format!("{s}-{n}")
        });
        *n += 1;
    }
    out
}

/// Inline code spans blanked out, so that a `[x](y)` shown as code is not taken for a link.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(' ');
        } else {
            out.push(if in_code { ' ' } else { c });
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a line.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let Some(end) = after.find(')') else { break };
        let target = after[..end].split_whitespace().next().unwrap_or("");
        out.push(target.to_string());
        rest = &after[end..];
    }
    out
}

#[test]
fn docs_links_resolve() {
    let mut checked = 0;
    let mut errors = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        let dir = file.parent().expect("doc dir");
        for (n, line) in parse(&text).prose {
            for target in link_targets(&line) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let dest = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                let at = format!("{}:{n}: link {target}", rel(&file));
                if !dest.exists() {
                    errors.push(format!("{at}: {} does not exist", rel(&dest)));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if dest.extension().is_none_or(|e| e != "md") {
                    errors.push(format!("{at}: an anchor into a file that is not Markdown"));
                    continue;
                }
                let target_text = std::fs::read_to_string(&dest).expect("read link target");
                if !anchors(&target_text).contains(anchor) {
                    errors.push(format!(
                        "{at}: no heading with the anchor #{anchor} in {}",
                        rel(&dest)
                    ));
                }
            }
        }
    }
    eprintln!("docs: {checked} relative links checked");
    assert!(checked > 50, "only {checked} relative links found");
    assert!(errors.is_empty(), "broken links:\n{}", errors.join("\n"));
}

/// Where an nginx snippet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Main,
    Http,
    Server,
    Location,
}

impl Context {
    fn named(s: &str) -> Option<Context> {
        Some(match s {
            "main" => Context::Main,
            "http" => Context::Http,
            "server" => Context::Server,
            "location" => Context::Location,
            _ => return None,
        })
    }

    /// The context a snippet without a named one belongs in, from the directives at its top
    /// level (lines that are not indented).
    fn guess(text: &str) -> Context {
        let top: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with([' ', '\t']))
            .map(str::trim)
            .collect();
        let starts = |words: &[&str]| top.iter().any(|l| words.iter().any(|w| l.starts_with(w)));
        if starts(&[
            "load_module",
            "events",
            "http {",
            "worker_processes",
            "daemon",
        ]) {
            Context::Main
        } else if starts(&[
            "server {",
            "upstream ",
            "map ",
            "log_format ",
            "ws_status_zone",
            "split_clients",
        ]) {
            Context::Http
        } else if starts(&["location ", "listen ", "server_name "]) {
            Context::Server
        } else {
            Context::Location
        }
    }
}

/// The directive arguments of every line (outside comments) that starts with `name`.
fn directive_args<'a>(text: &'a str, name: &str) -> Vec<Vec<&'a str>> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.split(';'))
        .map(str::trim)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.collect())
        })
        .collect()
}

/// Upstream names the snippet uses but does not define.
fn missing_upstreams(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for args in directive_args(text, "proxy_pass") {
        let Some(url) = args.first() else { continue };
        let host = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or("");
        if !host.is_empty() && !host.contains(['$', ':']) && !host.starts_with("unix") {
            used.insert(host.to_lowercase());
        }
    }
    for args in directive_args(text, "ws_route") {
        let args: Vec<&str> = args
            .into_iter()
            .filter(|a| !a.starts_with("protocol="))
            .collect();
        // [= | ~ | ~*] as a word of its own, then the pattern, then the upstream.
        let skip = usize::from(matches!(args.first(), Some(&"=" | &"~" | &"~*")));
        if let Some(up) = args.get(skip + 1) {
            used.insert(up.to_lowercase());
        }
    }
    for args in directive_args(text, "upstream") {
        if let Some(name) = args.first() {
            used.remove(&name.to_lowercase());
        }
    }
    used
}

/// `listen` addresses replaced by free ports on 127.0.0.1 (parameters such as `ssl` kept).
fn with_free_ports(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("listen ") {
            let indent = &line[..line.len() - t.len()];
            let params = rest
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ");
            let params = if params.is_empty() {
                ";".to_string()
            } else {
                format!(" {params}")
            };
            let params = params.trim_end_matches(';').to_string() + ";";
            out.push_str(&format!("{indent}listen 127.0.0.1:{}{params}", free_port()));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// The whole nginx.conf for a snippet.
fn wrap(snippet: &str, context: Context) -> String {
    let module = format!("load_module {};", module_path().display());
    let upstreams: String = missing_upstreams(snippet)
        .iter()
        .map(|u| format!("upstream {u} {{ server 127.0.0.1:1; }}\n"))
        .collect();
    let listen = || format!("listen 127.0.0.1:{};", free_port());
    let body = with_free_ports(snippet);
    match context {
        Context::Main => {
            let mut conf = String::new();
            let mut has_module = false;
            for line in body.lines() {
                if line.trim_start().starts_with("load_module ") {
                    has_module = true;
                    conf.push_str(&module);
                } else {
                    conf.push_str(line);
                }
                conf.push('\n');
                if line.trim() == "http {" {
                    conf.push_str(&upstreams);
                }
            }
            if !has_module {
                conf = format!("{module}\n{conf}");
            }
            if directive_args(&body, "events").is_empty() && !body.contains("events {") {
                conf.push_str("events {}\n");
            }
            conf
        }
        Context::Http => format!("{module}\nevents {{}}\nhttp {{\n{upstreams}{body}}}\n"),
        Context::Server => {
            format!(
                "{module}\nevents {{}}\nhttp {{\n{upstreams}server {{\n{}\n{body}}}\n}}\n",
                listen()
            )
        }
        Context::Location => format!(
            "{module}\nevents {{}}\nhttp {{\n{upstreams}server {{\n{}\nlocation / {{\n{body}}}\n}}\n}}\n",
            listen()
        ),
    }
}

/// Creates in `prefix` what the configuration names: the directories of its log files, and a
/// certificate and key wherever `ssl_certificate`/`ssl_certificate_key` point.
fn make_files(prefix: &Path, conf: &str) {
    let under = |p: &str| -> Option<PathBuf> {
        let p = p.trim_matches('"');
        (!p.starts_with('/') && !p.contains('$') && !p.starts_with("syslog:"))
            .then(|| prefix.join(p))
    };
    for name in ["ws_log", "access_log", "error_log"] {
        for args in directive_args(conf, name) {
            if let Some(p) = args.first().and_then(|a| under(a)) {
                std::fs::create_dir_all(p.parent().expect("log dir")).expect("mkdir");
            }
        }
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    for (name, pem) in [
        ("ssl_certificate", cert.cert.pem()),
        ("ssl_certificate_key", cert.key_pair.serialize_pem()),
    ] {
        for args in directive_args(conf, name) {
            if let Some(p) = args.first().and_then(|a| under(a)) {
                std::fs::create_dir_all(p.parent().expect("cert dir")).expect("mkdir");
                std::fs::write(&p, &pem).expect("write pem");
            }
        }
    }
}

/// `nginx -t` on a configuration in a fresh prefix; what nginx said when it failed.
fn nginx_t(conf: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("logs")).expect("logs");
    make_files(dir.path(), conf);
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("conf");
    let out = Command::new(nginx_bin())
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run nginx -t");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn docs_nginx_snippets_pass_nginx_t() {
    let mut checked = 0;
    let mut errors = Vec::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        for fence in parse(&text).fences {
            let mut words = fence.info.split_whitespace();
            if words.next() != Some("nginx") {
                continue;
            }
            let context = match words.next() {
                Some(w) => match Context::named(w) {
                    Some(c) => c,
                    None => {
                        errors.push(format!(
                            "{}:{}: unknown context \"{w}\" (main, http, server or location)",
                            rel(&file),
                            fence.line
                        ));
                        continue;
                    }
                },
                None => Context::guess(&fence.text),
            };
            checked += 1;
            let conf = wrap(&fence.text, context);
            if let Err(said) = nginx_t(&conf) {
                errors.push(format!(
                    "{}:{}: the nginx block ({context:?} context) fails nginx -t:\n{said}\
                     configuration tested:\n{conf}",
                    rel(&file),
                    fence.line
                ));
            }
        }
    }
    eprintln!("docs: {checked} nginx blocks checked with nginx -t");
    assert!(checked > 20, "only {checked} nginx blocks found");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn slugs_as_github_makes_them() {
    assert_eq!(
        slug(" Inside nginx's build: `--add-dynamic-module`"),
        "inside-nginxs-build---add-dynamic-module"
    );
    assert_eq!(slug("Embedded variables"), "embedded-variables");
    assert_eq!(slug("ws_log"), "ws_log");
    let a = anchors("# A\n```sh\n# not a heading\n```\n## Variables\n### Variables\n");
    assert!(a.contains("a") && a.contains("variables") && a.contains("variables-1"));
    assert!(!a.contains("not-a-heading"));
    assert_eq!(
        link_targets("see [x](a.md#b) and `[y](no.md)` and [z](https://e.org)"),
        ["a.md#b", "https://e.org"]
    );
    assert_eq!(
        missing_upstreams(
            "upstream chat { server a; }\nproxy_pass http://chat;\nws_route ~* ^/x gql;\n\
             proxy_pass http://$ws_upstream;\nproxy_pass http://127.0.0.1:9001;\n\
             ws_route default legacy;"
        ),
        BTreeSet::from(["gql".to_string(), "legacy".to_string()])
    );
    assert_eq!(Context::guess("ws_log off;\n"), Context::Location);
    assert_eq!(
        Context::guess("location /a {\n    ws_log off;\n}\n"),
        Context::Server
    );
    assert_eq!(Context::guess("upstream a { server b; }\n"), Context::Http);
}
