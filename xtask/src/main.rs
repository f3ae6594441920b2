//! nginx-ws project tooling, run as `cargo xtask <command>` (an alias in .cargo/config.toml).
//! The scripts in scripts/ are the user-facing entry points; those that have moved here are
//! thin wrappers around these commands.

mod autobahn;
mod bench;
mod bench_instructions;
mod build;
mod demo;
mod nginx_t;
mod nginx_tests;
mod proc;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;

/// A failure: the message is printed as `xtask <command>: error: ...`.
#[derive(Debug)]
pub struct Error {
    message: String,
    /// 2 for a usage error or an environment that cannot run the command, 1 for a failed check.
    status: u8,
}

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            status: 2,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Error::msg(format!("{} (try --help)", message.into()))
    }

    /// A failure with exit status 1 (the shell scripts' `die`).
    pub fn fail(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            status: 1,
        }
    }

    /// Only an exit status: the command has said what there was to say.
    pub fn quiet(status: u8) -> Self {
        Error {
            message: String::new(),
            status,
        }
    }
}

/// The repository: the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

const HELP: &str = "\
Usage: cargo xtask <command> [options]

Commands:
  build      build the module, nginx and the examples; print where they are
  nginx-t    the nginx-tests-format suite tests/nginx/*.t under our own harness
  nginx-tests
             ours and nginx's own upgrade tests under nginx-tests' harness, without and with
             the module (scripts/nginx-tests)
  autobahn   the Autobahn|Testsuite conformance runs and their comparison (scripts/autobahn)
  demo       nginx with the module in front of two echo backends, traffic, the frame log live
             (scripts/demo)
  soak       many tunnels for a long time with reloads and injected faults (scripts/soak)
  bench      the benchmarks: parser, instruction counts, load generator (scripts/bench)
  bench-instructions
             callgrind instructions per proxied message (scripts/bench-instructions)

cargo xtask <command> --help describes each.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{HELP}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "build" => build::main(rest),
        "autobahn" => autobahn::main(rest),
        "bench" => bench::main(rest),
        "bench-instructions" => bench_instructions::main(rest),
        "nginx-t" => nginx_t::main(rest),
        "demo" => demo::main(rest),
        "soak" => soak::main(rest),
        "nginx-tests" => nginx_tests::main(rest),
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(Error::usage(format!("unknown command \"{other}\""))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.message.is_empty() {
                // The bodies of scripts keep the scripts' names in their messages.
                let name = match command.as_str() {
                    "demo" | "soak" | "nginx-tests" => command.clone(),
                    _ => format!("xtask {command}"),
                };
                eprintln!("{name}: error: {}", e.message);
            }
            ExitCode::from(e.status)
        }
    }
}
