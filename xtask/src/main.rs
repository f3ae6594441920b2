//! nginx-ws project tooling, run as `cargo xtask <command>` (an alias in .cargo/config.toml).
//! The scripts in scripts/ are the user-facing entry points; those that have moved here are
//! thin wrappers around these commands.

mod autobahn;
mod bench;
mod bench_instructions;
mod build;
mod nginx_t;
mod proc;

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
  autobahn   the Autobahn|Testsuite conformance runs and their comparison (scripts/autobahn)
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
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(Error::usage(format!("unknown command \"{other}\""))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {command}: error: {}", e.message);
            ExitCode::from(e.status)
        }
    }
}
