//! `cargo xtask soak` (scripts/soak): builds the module, the vendored nginx and
//! examples/soak.rs, then becomes the soak program (exec), which does the run and the checks
//! and whose exit status is the command's (docs/soak.md).

use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::build;
use crate::{repo_root, Error};

fn say(what: &str) {
    eprintln!("\x1b[1msoak:\x1b[0m {what}");
}

/// What the command takes for itself; everything else goes to the soak program.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    release: bool,
    help: bool,
    has_prefix: bool,
    pass: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args, Error> {
    let mut a = Args {
        release: true,
        help: false,
        has_prefix: false,
        pass: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--debug" => a.release = false,
            "-h" | "--help" => a.help = true,
            "--prefix" => {
                let dir = it
                    .next()
                    .filter(|d| !d.is_empty())
                    // exit 1, as the shell script did
                    .ok_or_else(|| Error::fail("--prefix needs a value"))?;
                a.has_prefix = true;
                a.pass.extend([arg.clone(), dir.clone()]);
            }
            _ => a.pass.push(arg.clone()),
        }
    }
    Ok(a)
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut a = parse(args)?;
    if a.help {
        print!("{HELP}");
        return Ok(());
    }
    say(&format!(
        "building the module, nginx and examples/soak.rs ({})",
        if a.release { "--release" } else { "debug" }
    ));
    let built = build::build(&build::Options {
        release: a.release,
        nice: false,
    })
    .map_err(|e| Error::fail(e.message))?;
    let soak = built
        .example("soak")
        .map_err(|_| Error::fail("the soak example binary was not built"))?;

    if !a.has_prefix {
        let prefix = repo_root().join("target/soak");
        std::fs::create_dir_all(&prefix)
            .map_err(|e| Error::fail(format!("{}: {e}", prefix.display())))?;
        a.pass.push("--prefix".into());
        a.pass.push(prefix.to_string_lossy().into_owned());
    }

    say(&format!("running {}", soak.display()));
    // exec: the soak program's output, signals and exit status are the command's own.
    let err = Command::new(soak)
        .arg("--nginx")
        .arg(&built.nginx)
        .arg("--module")
        .arg(&built.module)
        .args(&a.pass)
        .exec();
    Err(Error::fail(format!("cannot run {}: {err}", soak.display())))
}

const HELP: &str = "\
Usage: cargo xtask soak [--debug] [soak options]        (scripts/soak)

Builds the module, the vendored nginx and examples/soak.rs, then runs nginx (2 workers) in
front of in-process echo upstreams with many concurrent WebSocket tunnels for a fixed time,
reloading nginx, killing upstreams mid-frame, stalling clients mid-frame and filling a log
disk, and checks every message, every tunnel's close record, crashes and worker memory.
Prints a summary; exits non-zero if any check failed. See docs/soak.md.

  --debug            build without --release (faster to build, slower to run)
  --duration SECS    soak time after the warm-up (default 120)
  --tunnels N        concurrent client tunnels (default 1000)
  --pause-ms MS      each client waits 0..MS between messages (default 2000)
  --reloads N        SIGHUPs to the master, evenly spread (default 4: every duration/5)
  --kill-pct P       percent of tunnels whose upstream dies mid-frame (default 2)
  --stall-pct P      percent of tunnels whose client stalls mid-frame (default 1)
  --full-pct P       percent of tunnels logging to the full disk (default 10)
  --seed N           message generator seed (printed by every run, to repeat one)
  --prefix DIR       nginx prefix and logs (default target/soak; its logs/ is emptied)

Run as root to get the 512k tmpfs that fills up (mount -t tmpfs); otherwise that log goes
to /dev/full, and the summary says so. Everything listens on 127.0.0.1, on ports chosen at
run time.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn own_options_are_taken_and_the_rest_passed_in_order() {
        let a = parse(&args(&["--duration", "20", "--debug", "--tunnels", "100"])).unwrap();
        assert!(!a.release && !a.help && !a.has_prefix);
        assert_eq!(a.pass, args(&["--duration", "20", "--tunnels", "100"]));

        let a = parse(&args(&["--prefix", "/tmp/x", "--seed", "7"])).unwrap();
        assert!(a.release && a.has_prefix);
        assert_eq!(a.pass, args(&["--prefix", "/tmp/x", "--seed", "7"]));

        assert!(parse(&args(&["--tunnels", "3", "--help"])).unwrap().help);
        assert_eq!(parse(&args(&["--prefix"])).unwrap_err().status, 1);
        assert_eq!(parse(&args(&["--prefix", ""])).unwrap_err().status, 1);
    }
}
