//! `cargo xtask demo` (scripts/demo): nginx with nginx-conf/logging.conf in front of two echo
//! backends, WebSocket traffic through it, and the JSON frame log shown as it is written.
//!
//! The runtime prefix is target/demo/ (its logs/ are cleared at every start). Children run in
//! process groups of their own, so that Ctrl-C reaches only this process, which then stops them
//! in order: the client first (it answers TERM with a Close frame), then nginx (QUIT: a
//! graceful shutdown, which writes the buffered frame log out), then the backends.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::build;
use crate::proc::{self, Guard};
use crate::{repo_root, Error};

/// How long each child gets after its stop signal before it is killed.
const GRACE: Duration = Duration::from_secs(10);

fn say(what: &str) {
    eprintln!("\x1b[1mdemo:\x1b[0m {what}");
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut once = false;
    for arg in args {
        match arg.as_str() {
            "--once" => once = true,
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            other => {
                return Err(Error::fail(format!(
                    "unknown argument \"{other}\" (try --help)"
                )))
            }
        }
    }
    // As the shell's ${VAR:-default}: empty is unset.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let rounds = rounds(env("DEMO_ROUNDS").as_deref(), once)?;
    let ports = Ports::parse(env("PORT").as_deref(), env("BACKEND_PORTS").as_deref())?;

    say("building the module, nginx and the examples (the first build takes a few minutes)");
    let built = build::build(&build::Options::default()).map_err(|e| Error::fail(e.message))?;
    let (Ok(echo_bin), Ok(traffic_bin)) = (built.example("ws-echo"), built.example("ws-traffic"))
    else {
        return Err(Error::fail("example binaries not found"));
    };

    let prefix = repo_root().join("target/demo");
    let logs = prefix.join("logs");
    if let Some(pid) = running_pid(&logs.join("nginx.pid")) {
        return Err(Error::fail(format!(
            "an nginx from an earlier demo still runs (pid {pid}); stop it first"
        )));
    }
    fs::create_dir_all(&logs).map_err(|e| Error::fail(format!("{}: {e}", logs.display())))?;
    clear_logs(&logs)?;

    let template = repo_root().join("nginx-conf/logging.conf");
    let template = fs::read_to_string(&template)
        .map_err(|e| Error::fail(format!("{}: {e}", template.display())))?;
    let conf = prefix.join("nginx.conf");
    fs::write(&conf, demo_conf(&template, &built.module, &ports))
        .map_err(|e| Error::fail(format!("{}: {e}", conf.display())))?;
    let mut prefix_arg = prefix.clone().into_os_string();
    prefix_arg.push("/");
    let nginx_cmd = || {
        let mut c = Command::new(&built.nginx);
        c.arg("-p").arg(&prefix_arg).arg("-c").arg(&conf);
        c
    };
    let tested = nginx_cmd()
        .args(["-t", "-q"])
        .status()
        .map_err(|e| Error::fail(format!("{}: {e}", built.nginx.display())))?;
    if !tested.success() {
        return Err(Error::fail(format!(
            "nginx -t failed for {}",
            conf.display()
        )));
    }

    for p in [ports.nginx, ports.backends[0], ports.backends[1]] {
        if proc::listening(p) {
            return Err(Error::fail(format!(
                "127.0.0.1:{p} is already in use (set PORT or BACKEND_PORTS to other ports)"
            )));
        }
    }

    proc::catch_signals();
    let mut children = Children::default();
    let result = session(
        &mut children,
        Session {
            once: rounds.is_some(),
            rounds,
            ports: &ports,
            logs: &logs,
            conf: &conf,
            module: &built.module,
            nginx: &built.nginx,
            nginx_cmd: &nginx_cmd,
            echo_bin,
            traffic_bin,
        },
    );
    // The shell script said why it failed first, then stopped everything (its EXIT trap).
    if let Err(e) = &result {
        if !e.message.is_empty() {
            eprintln!("demo: error: {}", e.message);
        }
    }
    drop(children);
    result.map_err(|e| Error::quiet(e.status))
}

/// The rounds of traffic before the demo ends by itself: DEMO_ROUNDS, or 3 with --once; none:
/// until Ctrl-C.
fn rounds(env: Option<&str>, once: bool) -> Result<Option<u64>, Error> {
    match env {
        Some(v) => {
            let valid = v.starts_with(|c: char| ('1'..='9').contains(&c))
                && v.bytes().all(|b| b.is_ascii_digit());
            match v.parse() {
                Ok(n) if valid => Ok(Some(n)),
                _ => Err(Error::fail("DEMO_ROUNDS must be a positive number")),
            }
        }
        None => Ok(once.then_some(3)),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Ports {
    nginx: u16,
    backends: [u16; 2],
}

impl Ports {
    /// PORT (default 8080) and BACKEND_PORTS (default "9001 9002"), as `read -r b1 b2` splits
    /// them: anything after the second port stays with it and makes it invalid.
    fn parse(port: Option<&str>, backends: Option<&str>) -> Result<Self, Error> {
        let port = port.unwrap_or("8080");
        let mut words = backends.unwrap_or("9001 9002").split_whitespace();
        let b1 = words.next().unwrap_or("");
        let b2 = words.collect::<Vec<_>>().join(" ");
        let one = |p: &str| {
            let valid = p.starts_with(|c: char| ('1'..='9').contains(&c))
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit());
            p.parse::<u16>()
                .ok()
                .filter(|_| valid)
                .ok_or_else(|| Error::fail(format!("invalid port \"{p}\"")))
        };
        let ports = Ports {
            nginx: one(port)?,
            backends: [one(b1)?, one(&b2)?],
        };
        let [b1, b2] = ports.backends;
        if ports.nginx == b1 || ports.nginx == b2 || b1 == b2 {
            return Err(Error::fail("the three ports must differ"));
        }
        Ok(ports)
    }
}

/// nginx-conf/logging.conf with the module's path and the ports put in: the first
/// `modules/ngx_http_ws_module.so` of a line, and every `127.0.0.1:9001`, `127.0.0.1:9002` and
/// `127.0.0.1:8080`. One pass, so that a port that is another's default (BACKEND_PORTS="9002
/// 9001") is not replaced twice.
fn demo_conf(template: &str, module: &Path, ports: &Ports) -> String {
    let module = module.to_string_lossy();
    let mut out = String::with_capacity(template.len() + 256);
    for line in template.split_inclusive('\n') {
        let line = line.replacen("modules/ngx_http_ws_module.so", &module, 1);
        let mut rest = line.as_str();
        while let Some(i) = rest.find("127.0.0.1:") {
            let (head, tail) = rest.split_at(i + "127.0.0.1:".len());
            out.push_str(head);
            let port = match tail.get(..4) {
                Some("9001") => Some(ports.backends[0]),
                Some("9002") => Some(ports.backends[1]),
                Some("8080") => Some(ports.nginx),
                _ => None,
            };
            match port {
                Some(p) => {
                    out.push_str(&p.to_string());
                    rest = &tail[4..];
                }
                None => rest = tail,
            }
        }
        out.push_str(rest);
    }
    out
}

/// The pid in an nginx.pid file, if that process is alive.
fn running_pid(pid_file: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Removes logs/*.log and logs/nginx.pid.
fn clear_logs(logs: &Path) -> Result<(), Error> {
    let entries =
        fs::read_dir(logs).map_err(|e| Error::fail(format!("{}: {e}", logs.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".log") || name == "nginx.pid" {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The demo's children, stopped in order when dropped.
#[derive(Default)]
struct Children {
    traffic: Option<Guard>,
    nginx: Option<Guard>,
    backends: Vec<Guard>,
    logs: PathBuf,
}

impl Drop for Children {
    fn drop(&mut self) {
        if let Some(t) = self.traffic.take() {
            t.stop();
        }
        if let Some(n) = self.nginx.take() {
            n.stop();
        }
        if !self.backends.is_empty() {
            for b in self.backends.drain(..) {
                b.stop();
            }
            say(&format!("stopped; logs are in {}", self.logs.display()));
        }
    }
}

struct Session<'a> {
    once: bool,
    rounds: Option<u64>,
    ports: &'a Ports,
    logs: &'a Path,
    conf: &'a Path,
    module: &'a Path,
    nginx: &'a Path,
    nginx_cmd: &'a dyn Fn() -> Command,
    echo_bin: &'a Path,
    traffic_bin: &'a Path,
}

/// Ends the demo on SIGINT or SIGTERM: Ctrl-C is how the interactive demo ends (exit 0); a
/// demo with rounds exits 130 on it, and TERM is 143 either way.
fn interrupted(once: bool) -> Option<Result<(), Error>> {
    let sig = proc::caught()?;
    if sig == libc::SIGINT && !once {
        Some(Ok(()))
    } else {
        Some(Err(Error::quiet((128 + sig) as u8)))
    }
}

/// Waits up to 10 s until the child listens on 127.0.0.1:port.
fn wait_port(child: &mut Guard, port: u16, what: &str, logs: &Path) -> Result<(), Error> {
    for _ in 0..100 {
        if child.exited().is_some() {
            return Err(Error::fail(format!(
                "{what} exited; see {}",
                logs.display()
            )));
        }
        if proc::listening(port) {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    Err(Error::fail(format!(
        "{what} does not listen on 127.0.0.1:{port}"
    )))
}

fn spawn(what: &str, cmd: &mut Command, log: &Path, signal: i32) -> Result<Guard, Error> {
    // A process group of its own: Ctrl-C at the terminal reaches only the demo.
    cmd.process_group(0);
    Guard::spawn(what, cmd, log, signal)
        .map(|g| g.with_grace(GRACE))
        .map_err(|e| Error::fail(e.message))
}

fn session(children: &mut Children, s: Session) -> Result<(), Error> {
    children.logs = s.logs.to_owned();
    for (n, port) in s.ports.backends.iter().enumerate() {
        let n = n + 1;
        let what = format!("the echo backend on port {port}");
        let mut cmd = Command::new(s.echo_bin);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--name")
            .arg(format!("echo-{n}"))
            .args(["--protocol", "chat.v1"]);
        let log = s.logs.join(format!("echo-{n}.log"));
        children
            .backends
            .push(spawn(&what, &mut cmd, &log, libc::SIGTERM)?);
        let child = children.backends.last_mut().expect("just pushed");
        wait_port(child, *port, &what, s.logs)?;
    }

    let error_log = s.logs.join("error.log");
    let nginx = children.nginx.insert(spawn(
        "nginx",
        &mut (s.nginx_cmd)(),
        &error_log,
        libc::SIGQUIT,
    )?);
    wait_port(nginx, s.ports.nginx, "nginx", s.logs)?;

    let url = format!("ws://127.0.0.1:{}/chat", s.ports.nginx);
    let [b1, b2] = s.ports.backends;
    let traffic_log = s.logs.join("traffic.log");
    say(&format!(
        "nginx {} on 127.0.0.1:{} with {}",
        nginx_version(s.nginx),
        s.ports.nginx,
        s.module.display()
    ));
    say(&format!(
        "echo backends on 127.0.0.1:{b1} and 127.0.0.1:{b2}; configuration: {}",
        s.conf.display()
    ));
    say(&format!(
        "traffic: ws-traffic {url} (output in {})",
        traffic_log.display()
    ));
    say(&format!(
        "access log with $ws_* variables: {}",
        s.logs.join("access.log").display()
    ));

    let mut cmd = Command::new(s.traffic_bin);
    cmd.arg(&url).args(["--protocol", "chat.v1"]);
    if let Some(n) = s.rounds {
        cmd.arg("--rounds").arg(n.to_string());
    }
    let traffic =
        children
            .traffic
            .insert(spawn("ws-traffic", &mut cmd, &traffic_log, libc::SIGTERM)?);

    let frames = s.logs.join("ws-frames.log");
    let mut follow = Follow::new(&frames);
    let mut stdout = std::io::stdout();
    let Some(rounds) = s.rounds else {
        say(&format!(
            "frame log {} (flushed every second); Ctrl-C to stop",
            frames.display()
        ));
        loop {
            follow.poll(&mut stdout);
            if let Some(end) = interrupted(s.once) {
                return end;
            }
            if traffic.exited().is_some() {
                children.traffic = None;
                eprint!("{}", read_lossy(&traffic_log));
                return Err(Error::fail(format!(
                    "ws-traffic ended unexpectedly; see {}",
                    s.logs.display()
                )));
            }
            sleep(Duration::from_millis(100));
        }
    };

    say(&format!("frame log {}, {rounds} rounds:", frames.display()));
    let status: ExitStatus = loop {
        follow.poll(&mut stdout);
        if let Some(end) = interrupted(s.once) {
            return end;
        }
        if let Some(status) = traffic.exited() {
            break status;
        }
        sleep(Duration::from_millis(100));
    };
    children.traffic = None;
    // The close record is written when the tunnel closes; give it a second to show.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        sleep(Duration::from_millis(100));
        follow.poll(&mut stdout);
    }

    println!();
    say("ws-traffic output:");
    print!("{}", read_lossy(&traffic_log));
    say("access log:");
    print!("{}", read_lossy(&s.logs.join("access.log")));
    let _ = stdout.flush();
    if !status.success() {
        let code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        });
        return Err(Error::fail(format!("ws-traffic failed (exit {code})")));
    }
    let log = read_lossy(&frames);
    if !log.lines().any(|l| {
        l.find("\"event\":\"close\"")
            .is_some_and(|i| l[i..].contains("\"end\":\"normal\""))
    }) {
        return Err(Error::fail(format!(
            "no normal close record in {}",
            frames.display()
        )));
    }
    let n = log
        .lines()
        .filter(|l| l.contains("\"event\":\"frame\""))
        .count();
    say(&format!("ok: {n} frame records, tunnel closed normally"));
    Ok(())
}

/// "1.28.3" from `nginx -v` ("nginx version: nginx/1.28.3", on stderr).
fn nginx_version(nginx: &Path) -> String {
    proc::nginx_v(nginx)
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// `tail -n +1 -F`: a file followed by name, from its first byte, through its creation,
/// truncation and replacement.
struct Follow {
    path: PathBuf,
    pos: u64,
    inode: Option<u64>,
}

impl Follow {
    fn new(path: &Path) -> Self {
        Follow {
            path: path.to_owned(),
            pos: 0,
            inode: None,
        }
    }

    /// Copies what was written since the last call to `out`.
    fn poll(&mut self, out: &mut impl Write) {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        let Ok(meta) = file.metadata() else {
            return;
        };
        if self.inode != Some(meta.ino()) || meta.len() < self.pos {
            self.inode = Some(meta.ino());
            self.pos = 0;
        }
        if file.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        if let Ok(n) = std::io::copy(&mut file, out) {
            self.pos += n;
        }
        let _ = out.flush();
    }
}

const HELP: &str = "\
Usage: cargo xtask demo [--once]        (scripts/demo)

Builds the module, nginx and the examples, starts nginx with nginx-conf/logging.conf in front
of two WebSocket echo backends, drives traffic through it and shows the JSON frame log live.

  --once         run DEMO_ROUNDS rounds (default 3), print the logs and exit 0
                 (non-zero if something failed); without it, run until Ctrl-C.

Environment:
  PORT           nginx's port (default 8080)
  BACKEND_PORTS  the two echo backends' ports (default \"9001 9002\")
  DEMO_ROUNDS    rounds of traffic before exiting, as with --once

Everything listens on 127.0.0.1 only. The runtime prefix is target/demo/ (nginx.conf, logs/);
its logs are cleared at each start. scripts/demo installs the Debian build packages first.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_from_the_environment_or_once() {
        assert_eq!(rounds(None, false).unwrap(), None);
        assert_eq!(rounds(None, true).unwrap(), Some(3));
        assert_eq!(rounds(Some("10"), false).unwrap(), Some(10));
        assert_eq!(rounds(Some("7"), true).unwrap(), Some(7));
        for bad in ["0", "-1", "01", "3x", " 3", "99999999999999999999999"] {
            let e = rounds(Some(bad), true).unwrap_err();
            assert_eq!(e.message, "DEMO_ROUNDS must be a positive number");
            assert_eq!(e.status, 1);
        }
    }

    #[test]
    fn ports_as_the_shell_script_read_them() {
        let p = Ports::parse(None, None).unwrap();
        assert_eq!(
            p,
            Ports {
                nginx: 8080,
                backends: [9001, 9002]
            }
        );
        let p = Ports::parse(Some("8090"), Some("  9101   9102 ")).unwrap();
        assert_eq!(p.backends, [9101, 9102]);
        let msg = |port, backends| Ports::parse(port, backends).unwrap_err().message;
        assert_eq!(msg(Some("80a"), None), "invalid port \"80a\"");
        assert_eq!(msg(Some("65536"), None), "invalid port \"65536\"");
        assert_eq!(msg(Some("0"), None), "invalid port \"0\"");
        assert_eq!(msg(None, Some("9101")), "invalid port \"\"");
        assert_eq!(msg(None, Some("1 2 3")), "invalid port \"2 3\"");
        assert_eq!(msg(None, Some("8080 9002")), "the three ports must differ");
        assert_eq!(msg(None, Some("9001 9001")), "the three ports must differ");
    }

    #[test]
    fn conf_gets_the_module_and_ports_once_each() {
        let template = "load_module modules/ngx_http_ws_module.so;\n\
                        server 127.0.0.1:9001;\nserver 127.0.0.1:9002;\n\
                        listen 127.0.0.1:8080; # 127.0.0.1:8080\nlisten 127.0.0.1:80;\n";
        let ports = Ports {
            nginx: 9001,
            backends: [9002, 9003],
        };
        let got = demo_conf(template, Path::new("/a&b|c/libnginx_ws.so"), &ports);
        assert_eq!(
            got,
            "load_module /a&b|c/libnginx_ws.so;\n\
             server 127.0.0.1:9002;\nserver 127.0.0.1:9003;\n\
             listen 127.0.0.1:9001; # 127.0.0.1:9001\nlisten 127.0.0.1:80;\n"
        );
        let real = fs::read_to_string(repo_root().join("nginx-conf/logging.conf")).unwrap();
        let got = demo_conf(&real, Path::new("/m.so"), &ports);
        assert!(got.contains("load_module /m.so;"));
        assert!(!got.contains("127.0.0.1:8080"));
        assert!(got.contains("server 127.0.0.1:9002;\n        server 127.0.0.1:9003;"));
    }

    #[test]
    fn follow_reads_appends_truncation_and_replacement() {
        let dir = std::env::temp_dir().join(format!("xtask-follow-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.log");
        let mut f = Follow::new(&path);
        let mut out = Vec::new();
        f.poll(&mut out); // not there yet
        fs::write(&path, "a\n").unwrap();
        f.poll(&mut out);
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"b\n").unwrap();
        f.poll(&mut out);
        f.poll(&mut out);
        assert_eq!(out, b"a\nb\n");
        fs::write(&path, "c\n").unwrap(); // truncated, shorter
        f.poll(&mut out);
        let new = dir.join("new.log");
        fs::write(&new, "d\ne\nf\n").unwrap();
        fs::rename(&new, &path).unwrap(); // replaced
        f.poll(&mut out);
        assert_eq!(out, b"a\nb\nc\nd\ne\nf\n");
        fs::remove_dir_all(&dir).unwrap();
    }
}
