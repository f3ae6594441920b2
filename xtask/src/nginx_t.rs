//! `cargo xtask nginx-t`: the nginx-tests-format suite (tests/nginx/*.t) under our own harness
//! (tests/nginx/lib/NginxWs/Harness.pm), with the freshly built nginx and the module loaded
//! through TEST_NGINX_GLOBALS, as nginx-tests runs its own tests.

use std::process::Command;

use crate::{build, repo_root, Error};

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut opts = build::Options::default();
    let mut jobs = 1u32;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--release" => opts.release = true,
            "-j" | "--jobs" => {
                jobs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| Error::usage("--jobs needs a positive number"))?;
            }
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            f if f.ends_with(".t") => files.push(f.to_owned()),
            other => return Err(Error::usage(format!("unknown argument \"{other}\""))),
        }
    }
    let root = repo_root();
    if files.is_empty() {
        let mut all: Vec<String> = std::fs::read_dir(root.join("tests/nginx"))
            .map_err(|e| Error::msg(format!("tests/nginx: {e}")))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".t"))
            .map(|name| format!("tests/nginx/{name}"))
            .collect();
        all.sort();
        files = all;
    }

    let built = build::build(&opts)?;
    let status = Command::new("prove")
        .current_dir(&root)
        .arg(format!("-j{jobs}"))
        .args(&files)
        .env("TEST_NGINX_BINARY", &built.nginx)
        .env(
            "TEST_NGINX_GLOBALS",
            format!("load_module {};", built.module.display()),
        )
        .env_remove("TEST_NGINX_GLOBALS_HTTP")
        .status()
        .map_err(|e| Error::msg(format!("cannot run prove (Debian package perl): {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error {
            message: "tests/nginx: some tests failed".into(),
            status: 1,
        })
    }
}

const HELP: &str = "\
Usage: cargo xtask nginx-t [--release] [-j N] [tests/nginx/FILE.t ...]

Runs the nginx-tests-format suite (tests/nginx/*.t, or the files given) with prove, under our
own harness (tests/nginx/lib/NginxWs/Harness.pm): TEST_NGINX_BINARY is the freshly built nginx,
TEST_NGINX_GLOBALS loads the freshly built module. Needs perl's prove and the Debian packages
libprotocol-websocket-perl and libio-socket-ssl-perl (scripts/test installs them).

  --release   build and test the release profile
  -j N        run N test files at once (prove -j)

TEST_NGINX_LEAVE=1 keeps each test's directory, TEST_NGINX_VERBOSE=1 logs the traffic,
TEST_NGINX_CATLOG=1 prints nginx's error log after each file.
";
