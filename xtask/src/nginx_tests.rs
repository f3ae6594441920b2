//! `cargo xtask nginx-tests` (scripts/nginx-tests): nginx-ws under nginx's own test harness
//! (nginx-tests: Perl, Test::Nginx, prove), from a checkout of nginx-tests.
//!
//! 1. ours: tests/nginx/*.t with TEST_NGINX_GLOBALS loading the module (they run under our
//!    own harness; `cargo xtask nginx-t` runs them without a checkout);
//! 2. baseline: nginx-tests' upgrade and WebSocket tests against the same nginx, without the
//!    module;
//! 3. module: the same with the module loaded and enabled at http level through
//!    TEST_NGINX_GLOBALS_HTTP, logging to one file that must then hold JSON records only.
//!
//! Each file's TAP goes to target/nginx-tests/RUN/FILE.tap; RUN/results has one line per file
//! (`file status planned passed failed skipped todo_unexpected_passes`) and RUN/failures one
//! line per failing assertion, so that two runs compare assertion by assertion.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::build;
use crate::{repo_root, Error};

/// nginx's own tests of the upgrade path.
const NGINX_OWN: [&str; 4] = [
    "proxy_websocket.t",
    "proxy_upgrade.t",
    "ssl_proxy_upgrade.t",
    "worker_shutdown_timeout_proxy_upgrade.t",
];

const USAGE: &str = "usage: scripts/nginx-tests <nginx-tests checkout> [test files...]";

fn say(what: &str) {
    eprintln!("\x1b[1mnginx-tests:\x1b[0m {what}");
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::msg(format!("{}: {e}", what.display()))
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let Some((first, rest)) = args.split_first() else {
        return Err(Error::msg(USAGE));
    };
    match first.as_str() {
        "-h" | "--help" => {
            print!("{HELP}");
            return Ok(());
        }
        "" => return Err(Error::msg(USAGE)),
        _ => {}
    }
    let checkout = fs::canonicalize(first)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| Error::msg(format!("no directory \"{first}\"")))?;
    if !checkout.join("lib/Test/Nginx.pm").is_file() {
        return Err(Error::msg(format!(
            "{} is not an nginx-tests checkout (no lib/Test/Nginx.pm)",
            checkout.display()
        )));
    }

    let repo = repo_root();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    if rest.is_empty() {
        let dir = repo.join("tests/nginx");
        ours = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "t") && p.is_file())
            .collect();
        ours.sort();
        theirs = NGINX_OWN.iter().map(|s| s.to_string()).collect();
    } else {
        for f in rest {
            // Our files by path (from the repository), nginx's by their name in the checkout.
            let here = repo.join(f);
            if f.ends_with(".t") && here.is_file() {
                ours.push(fs::canonicalize(&here).map_err(io(&here))?);
            } else if checkout.join(f).is_file() {
                theirs.push(f.clone());
            } else {
                return Err(Error::msg(format!(
                    "no test \"{f}\" (neither a file here nor in {})",
                    checkout.display()
                )));
            }
        }
    }

    say("building the module and nginx");
    let built = build::build(&build::Options {
        release: false,
        nice: true,
    })?;
    let version = nginx_version(&built.nginx);
    say(&format!(
        "nginx: {version}, module: {}",
        built.module.display()
    ));

    let out = repo.join("target/nginx-tests");
    if out.exists() {
        fs::remove_dir_all(&out).map_err(io(&out))?;
    }
    fs::create_dir_all(&out).map_err(io(&out))?;
    // nginx workers run as nobody when the tests run as root
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).map_err(io(&out))?;
    }

    let runner = Runner {
        out: out.clone(),
        checkout: checkout.clone(),
        nginx: built.nginx.clone(),
    };
    let load = format!("load_module {};", built.module.display());
    if !ours.is_empty() {
        let files: Vec<String> = ours
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        runner.run("ours", &repo, &files, &[("TEST_NGINX_GLOBALS", &load)])?;
    }
    let wslog = out.join("module/ws.log");
    if !theirs.is_empty() {
        runner.run("baseline", &checkout, &theirs, &[])?;
        fs::create_dir_all(out.join("module")).map_err(io(&out))?;
        fs::write(&wslog, "").map_err(io(&wslog))?;
        let http = format!(
            "ws_log {}; ws_log_events open frame message close;\n\
             ws_log_payload 16; ws_idle_timeout 60s; ws_max_lifetime 1h;",
            wslog.display()
        );
        runner.run(
            "module",
            &checkout,
            &theirs,
            &[
                ("TEST_NGINX_GLOBALS", &load),
                ("TEST_NGINX_GLOBALS_HTTP", &http),
            ],
        )?;
    }

    // The summary.
    let read = |p: PathBuf| fs::read_to_string(p).unwrap_or_default();
    let mut failed = false;
    let mut s = format!(
        "\n== nginx-tests summary ({version}; logs in {})\n",
        out.display()
    );
    if !ours.is_empty() {
        s.push_str(&summary("ours", &read(out.join("ours/results"))));
        let failures = read(out.join("ours/failures"));
        for line in failures.lines() {
            let _ = writeln!(s, "    FAIL {line}");
            failed = true;
        }
    }
    if !theirs.is_empty() {
        s.push_str(&summary("baseline", &read(out.join("baseline/results"))));
        s.push_str(&summary("module", &read(out.join("module/results"))));
        let baseline = read(out.join("baseline/failures"));
        if !baseline.is_empty() {
            s.push_str("  failing without the module (baseline):\n");
            for line in baseline.lines() {
                let _ = writeln!(s, "    {line}");
            }
        }
        let module = read(out.join("module/failures"));
        let new = new_failures(&baseline, &module);
        if new.is_empty() {
            s.push_str("  no test fails with the module that passes without it\n");
        } else {
            s.push_str("  failing with the module only:\n");
            for line in new {
                let _ = writeln!(s, "    FAIL {line}");
            }
            failed = true;
        }
        print!("{s}");
        s.clear();
        let log = read(wslog);
        match log_records(&log) {
            Ok(counts) => {
                let _ = writeln!(
                    s,
                    "  ws.log of the module run: {} lines, all JSON records ({})",
                    counts.values().sum::<usize>(),
                    counts
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Err(bad) => {
                for line in bad {
                    eprintln!("not a record: {line}");
                }
                s.push_str("  ws.log of the module run: lines that are not JSON records (above)\n");
                failed = true;
            }
        }
    }
    print!("{s}");
    if failed {
        Err(Error::quiet(1))
    } else {
        Ok(())
    }
}

/// "nginx/1.28.3" from `nginx -v` ("nginx version: nginx/1.28.3", on stderr).
fn nginx_version(nginx: &Path) -> String {
    let text = crate::proc::nginx_v(nginx);
    text.strip_prefix("nginx version: ")
        .unwrap_or(&text)
        .to_owned()
}

struct Runner {
    out: PathBuf,
    checkout: PathBuf,
    nginx: PathBuf,
}

impl Runner {
    /// Runs each file with `prove -v` from `dir` and records its results and failures.
    fn run(
        &self,
        name: &str,
        dir: &Path,
        files: &[String],
        env: &[(&str, &str)],
    ) -> Result<(), Error> {
        let run_dir = self.out.join(name);
        fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
        let mut results = String::new();
        let mut failures = String::new();
        for file in files {
            let base = Path::new(file)
                .file_name()
                .map_or_else(|| file.clone(), |b| b.to_string_lossy().into_owned());
            let tap_path = run_dir.join(format!("{base}.tap"));
            say(&format!("{name}: {base}"));
            let tap_file = fs::File::create(&tap_path).map_err(io(&tap_path))?;
            let tap_err = tap_file.try_clone().map_err(io(&tap_path))?;
            let mut cmd = Command::new("prove");
            cmd.current_dir(dir)
                .arg("-v")
                .arg("-I")
                .arg(self.checkout.join("lib"))
                .arg(file)
                .stdin(Stdio::null())
                .stdout(tap_file)
                .stderr(tap_err)
                .env("TEST_NGINX_BINARY", &self.nginx);
            for var in [
                "TEST_NGINX_GLOBALS",
                "TEST_NGINX_GLOBALS_HTTP",
                "TEST_NGINX_LEAVE",
                "TEST_NGINX_CATLOG",
            ] {
                cmd.env_remove(var);
            }
            cmd.envs(env.iter().copied());
            let status = cmd
                .status()
                .map_err(|e| Error::msg(format!("cannot run prove (Debian package perl): {e}")))?;
            let tap = fs::read(&tap_path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let r = Tap::parse(&base, &tap, status.success());
            results.push_str(&r.line());
            for f in &r.failures {
                let _ = writeln!(failures, "{f}");
            }
            if r.status() == "skip" {
                say(&format!("  skipped: {}", skip_reason(&tap).unwrap_or("?")));
            }
        }
        let write = |f: &str, text: &str| {
            let p = run_dir.join(f);
            fs::write(&p, text).map_err(io(&p))
        };
        write("results", &results)?;
        write("failures", &failures)
    }
}

/// What one test file's TAP says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tap {
    file: String,
    plan: Option<u32>,
    skip_all: bool,
    run: u32,
    passed: u32,
    failed: u32,
    skipped: u32,
    /// TODO tests that passed unexpectedly
    todo: u32,
    /// "file: N - description" for every failing assertion (TODO tests excluded), or why the
    /// file as a whole failed
    failures: Vec<String>,
}

/// Whether `rest` has `#`, optional white space, then `word`.
fn directive(rest: &str, word: &str, any_case: bool) -> bool {
    rest.match_indices('#').any(|(i, _)| {
        let after = rest[i + 1..].trim_start();
        after.get(..word.len()).is_some_and(|w| {
            if any_case {
                w.eq_ignore_ascii_case(word)
            } else {
                w == word
            }
        })
    })
}

/// A test line, `ok N...` or `not ok N...`: (passed, number, the rest of the line).
fn test_line(line: &str) -> Option<(bool, &str, &str)> {
    let (ok, rest) = match line.strip_prefix("not ok ") {
        Some(rest) => (false, rest),
        None => (true, line.strip_prefix("ok ")?),
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    (digits > 0).then(|| (ok, &rest[..digits], &rest[digits..]))
}

/// `1..N` at the start of a line.
fn plan_line(line: &str) -> Option<(u32, &str)> {
    let rest = line.strip_prefix("1..")?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some((rest[..digits].parse().ok()?, &rest[digits..]))
}

/// Why a file skips all its tests: what `prove -v` says of it (`FILE .. skipped: reason`; it
/// does not show the test's own `1..0 # SKIP reason` line), or that line itself.
fn skip_reason(tap: &str) -> Option<&str> {
    tap.lines().find_map(|l| {
        prove_skipped(l).or_else(|| {
            let zero = plan_line(l)
                .is_some_and(|(n, rest)| n == 0 && rest.to_ascii_lowercase().contains("skip"));
            zero.then_some(l)
        })
    })
}

/// The reason in prove's `FILE .. skipped: reason` line.
fn prove_skipped(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(" .. skipped")?;
    Some(rest.strip_prefix(':').unwrap_or(rest).trim())
}

impl Tap {
    fn parse(file: &str, tap: &str, exited_ok: bool) -> Tap {
        let mut t = Tap {
            file: file.to_owned(),
            ..Tap::default()
        };
        for line in tap.lines() {
            if let Some((n, _)) = plan_line(line) {
                t.plan = Some(n);
            }
            // perl: /^1\.\.0\b.*#\s*skip/i
            if let Some(rest) = line.strip_prefix("1..0") {
                let word_end = !rest.starts_with(|c: char| c.is_alphanumeric() || c == '_');
                if word_end && directive(rest, "skip", true) {
                    t.skip_all = true;
                }
            }
            if prove_skipped(line).is_some() {
                t.skip_all = true;
            }
            if let Some((ok, n, rest)) = test_line(line) {
                t.run += 1;
                if directive(rest, "skip", true) {
                    t.skipped += 1;
                } else if directive(rest, "TODO", false) {
                    if ok {
                        t.todo += 1;
                    }
                } else if ok {
                    t.passed += 1;
                } else {
                    t.failed += 1;
                    t.failures.push(format!("{file}: {n}{rest}"));
                }
            }
        }
        // A file that died, or ran another number of tests than it planned, fails once more.
        if !t.skip_all && (!exited_ok || t.plan != Some(t.run)) && t.failed == 0 {
            t.failed += 1;
            t.failures.push(format!(
                "{file}: died or ran {} of {} tests",
                t.run,
                t.plan.map_or("?".into(), |p| p.to_string())
            ));
        }
        t
    }

    fn status(&self) -> &'static str {
        if self.skip_all {
            "skip"
        } else if self.failed > 0 {
            "fail"
        } else {
            "pass"
        }
    }

    /// The line of RUN/results.
    fn line(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}\n",
            self.file,
            self.status(),
            self.plan.unwrap_or(0),
            self.passed,
            self.failed,
            self.skipped,
            self.todo
        )
    }
}

/// "NAME: F/N files pass, T/M tests pass, K fail" and one line per file, from RUN/results.
fn summary(name: &str, results: &str) -> String {
    let (mut files, mut pass_files, mut skip_files) = (0, 0, 0);
    let (mut planned, mut passed, mut failed) = (0u64, 0u64, 0u64);
    let mut detail = String::new();
    for line in results.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [file, status, plan, pass, fail, _skip, todo] = f[..] else {
            continue;
        };
        let num = |s: &str| s.parse::<u64>().unwrap_or(0);
        files += 1;
        planned += num(plan);
        passed += num(pass);
        failed += num(fail);
        match status {
            "pass" => pass_files += 1,
            "skip" => skip_files += 1,
            _ => {}
        }
        let _ = writeln!(
            detail,
            "    {file:<42} {status:<4} {}/{}{}",
            num(pass),
            num(plan),
            if num(todo) > 0 {
                format!(" ({todo} TODO passed)")
            } else {
                String::new()
            }
        );
    }
    format!(
        "{name}: {pass_files}/{files} files pass{}, {passed}/{planned} tests pass, {failed} fail\n\
         {detail}",
        if skip_files > 0 {
            format!(" ({skip_files} skipped)")
        } else {
            String::new()
        }
    )
}

/// The failures of the module run that the baseline run does not have (whole lines).
fn new_failures<'a>(baseline: &str, module: &'a str) -> Vec<&'a str> {
    let known: BTreeSet<&str> = baseline.lines().collect();
    module.lines().filter(|l| !known.contains(l)).collect()
}

/// Records by event if every line of the log is a JSON object with an `event`; otherwise the
/// lines that are not.
fn log_records(log: &str) -> Result<BTreeMap<String, usize>, Vec<&str>> {
    let mut counts = BTreeMap::new();
    let mut bad = Vec::new();
    for line in log.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(rec)) if rec.get("event").is_some_and(|e| !e.is_null()) => {
                let event = match &rec["event"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                *counts.entry(event).or_default() += 1;
            }
            _ => bad.push(line),
        }
    }
    if bad.is_empty() {
        Ok(counts)
    } else {
        Err(bad)
    }
}

const HELP: &str = "\
Usage: cargo xtask nginx-tests <nginx-tests checkout> [test files...]   (scripts/nginx-tests)

nginx-ws under nginx's own test harness (nginx-tests: Perl, Test::Nginx, prove).

  1. ours:            tests/nginx/*.t, with TEST_NGINX_GLOBALS loading the module (they run
                      under our own harness, tests/nginx/lib/NginxWs/Harness.pm; scripts/test
                      runs them without a checkout: cargo xtask nginx-t);
  2. nginx, baseline: nginx-tests' proxy_websocket.t, proxy_upgrade.t, ssl_proxy_upgrade.t and
                      worker_shutdown_timeout_proxy_upgrade.t against the same nginx binary,
                      without the module;
  3. nginx, module:   the same four with the module loaded and enabled at http level through
                      TEST_NGINX_GLOBALS_HTTP (ws_log of every event, payload capture, idle
                      timeout, max lifetime), logging to one file that must then hold valid
                      JSON lines only.

Prints a summary (files and tests passed per run). Fails (exit 1) if one of our tests fails,
if an nginx test fails with the module that does not fail without it, or if the log written
in run 3 has a line that is not a JSON object. See docs/conformance.md.

  <nginx-tests checkout>  a clone of https://github.com/nginx/nginx-tests (its lib/ has
                          Test/Nginx.pm)
  test files              instead of all: our tests/nginx/*.t files given by path, nginx's
                          tests by their name in the checkout (e.g. proxy_websocket.t); a
                          run with none of its files is left out

Needs perl's prove, Protocol::WebSocket and IO::Socket::SSL (scripts/nginx-tests installs them
from Debian's packages). Logs of every run stay in target/nginx-tests/.
";

#[cfg(test)]
mod tests {
    use super::*;

    const TAP: &str = "proxy_websocket.t .. \n\
        1..6\n\
        ok 1 - websocket handshake\n\
        not ok 2 - frame echoed\n\
        #   Failed test 'frame echoed'\n\
        ok 3 # skip no ssl\n\
        not ok 4 - later # TODO not yet\n\
        ok 5 - fixed # TODO fixed since\n\
        ok 6 - no alerts\n\
        Failed 1/6 subtests\n";

    #[test]
    fn tap_counts_as_the_perl_did() {
        let t = Tap::parse("proxy_websocket.t", TAP, false);
        assert_eq!(
            (t.plan, t.run, t.passed, t.failed, t.skipped, t.todo),
            (Some(6), 6, 2, 1, 1, 1)
        );
        assert_eq!(t.failures, ["proxy_websocket.t: 2 - frame echoed"]);
        assert_eq!(t.line(), "proxy_websocket.t fail 6 2 1 1 1\n");
    }

    #[test]
    fn a_file_that_dies_or_runs_short_fails_once() {
        let t = Tap::parse("a.t", "1..3\nok 1\nok 2\n", false);
        assert_eq!(t.failures, ["a.t: died or ran 2 of 3 tests"]);
        assert_eq!(t.status(), "fail");
        let t = Tap::parse("b.t", "Can't locate Foo.pm\n", false);
        assert_eq!(t.failures, ["b.t: died or ran 0 of ? tests"]);
        assert_eq!(t.line(), "b.t fail 0 0 1 0 0\n");
        // a non-zero exit with every planned test run and passed still fails
        assert_eq!(Tap::parse("c.t", "1..1\nok 1\n", false).status(), "fail");
        assert_eq!(Tap::parse("c.t", "1..1\nok 1\n", true).status(), "pass");
    }

    #[test]
    fn a_file_that_skips_all_is_skipped() {
        let tap = "ws_log.t .. \n1..0 # SKIP the module is not loaded\n";
        let t = Tap::parse("ws_log.t", tap, true);
        assert_eq!(t.status(), "skip");
        assert_eq!(t.line(), "ws_log.t skip 0 0 0 0 0\n");
        assert_eq!(
            skip_reason(tap),
            Some("1..0 # SKIP the module is not loaded")
        );
        assert!(!Tap::parse("x.t", "1..00 # skip\n", true).skip_all);
        // what prove -v really prints for such a file
        let tap = "/r/tests/nginx/ws_log.t .. skipped: ws module not loaded\n\
                   Files=1, Tests=0,  0 wallclock secs\nResult: NOTESTS\n";
        let t = Tap::parse("ws_log.t", tap, true);
        assert_eq!(t.line(), "ws_log.t skip 0 0 0 0 0\n");
        assert!(t.failures.is_empty());
        assert_eq!(skip_reason(tap), Some("ws module not loaded"));
    }

    #[test]
    fn summary_as_the_awk_printed_it() {
        let results = "ws_log.t pass 36 36 0 0 0\nproxy_upgrade.t fail 33 31 2 0 1\n\
                       ssl.t skip 0 0 0 0 0\n";
        assert_eq!(
            summary("module", results),
            "module: 1/3 files pass (1 skipped), 67/69 tests pass, 2 fail\n\
             \x20   ws_log.t                                   pass 36/36\n\
             \x20   proxy_upgrade.t                            fail 31/33 (1 TODO passed)\n\
             \x20   ssl.t                                      skip 0/0\n"
        );
    }

    #[test]
    fn failures_new_with_the_module() {
        assert_eq!(new_failures("", "a.t: 1\n"), ["a.t: 1"]);
        assert_eq!(
            new_failures("a.t: 1\nb.t: 2\n", "a.t: 1\nb.t: 3\n"),
            ["b.t: 3"]
        );
        assert!(new_failures("a.t: 1\n", "").is_empty());
    }

    #[test]
    fn log_records_by_event_or_the_lines_that_are_not() {
        let log = "{\"event\":\"open\"}\n{\"event\":\"frame\"}\n{\"event\":\"frame\"}\n";
        assert_eq!(
            log_records(log).unwrap(),
            BTreeMap::from([("frame".into(), 2), ("open".into(), 1)])
        );
        assert_eq!(log_records("").unwrap().len(), 0);
        let bad = "{\"event\":\"open\"}\n[1]\n{\"x\":1}\n{\"event\":null}\n\nnot json\n";
        assert_eq!(
            log_records(bad).unwrap_err(),
            ["[1]", "{\"x\":1}", "{\"event\":null}", "", "not json"]
        );
    }
}
