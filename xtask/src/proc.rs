//! Child processes and ports for the test runs: everything listens on 127.0.0.1, on ports
//! chosen at run time, and every child is stopped when its guard goes away.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::Error;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::msg(format!("no free port: {e}")))
}

/// What `nginx -v` prints ("nginx version: nginx/1.28.3", on stderr), trimmed; empty if
/// nginx cannot be run.
pub fn nginx_v(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

/// Whether something listens on 127.0.0.1:port.
pub fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// The last SIGINT or SIGTERM received since `catch_signals`, 0 for none.
static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    CAUGHT.store(sig, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM do not end this process: `caught` reports them, so that a
/// command can stop its children in order before it exits (as a shell script's trap does).
pub fn catch_signals() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installs a handler that only stores to an atomic, which is
        // async-signal-safe; no other code in this process handles these signals.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// The signal (SIGINT or SIGTERM) caught since `catch_signals`, if any.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// A running child, signalled and reaped when dropped.
pub struct Guard {
    child: Child,
    what: String,
    /// The signal that stops it gracefully (nginx: QUIT, which writes buffered logs out).
    stop_signal: i32,
    /// How long it gets to stop after that signal before it is killed.
    grace: Duration,
}

impl Guard {
    /// Starts `cmd` with stdin from /dev/null and stdout and stderr appended to `log`.
    pub fn spawn(
        what: &str,
        cmd: &mut Command,
        log: &Path,
        stop_signal: i32,
    ) -> Result<Self, Error> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::msg(format!("{}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::msg(format!("{}: {e}", log.display())))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::msg(format!("cannot start {what}: {e}")))?;
        Ok(Guard {
            child,
            what: what.to_owned(),
            stop_signal,
            grace: Duration::from_secs(30),
        })
    }

    /// How long the child gets to stop after its stop signal (default 30 s).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to 10 s until the child listens on 127.0.0.1:port.
    pub fn wait_port(&mut self, port: u16) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::msg(format!("{} exited ({status})", self.what)));
            }
            if listening(port) {
                return Ok(());
            }
            sleep(Duration::from_millis(100));
        }
        Err(Error::msg(format!(
            "{} does not listen on 127.0.0.1:{port}",
            self.what
        )))
    }

    /// Sends the stop signal, waits up to 30 s, then kills.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) on our own child, which has not been reaped (try_wait said it
            // is still running), so the pid cannot belong to another process.
            unsafe { libc::kill(pid, self.stop_signal) };
            let deadline = Instant::now() + self.grace;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop_now();
    }
}
