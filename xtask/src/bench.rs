//! `cargo xtask bench`: the benchmarks. Builds the module, the vendored nginx and
//! examples/ws-bench.rs in release mode, runs the parser microbenchmarks
//! (crates/ws-core/benches/parser.rs, criterion), `bench-instructions` at 64 B and 1 KiB
//! (callgrind instructions per proxied message, the primary judge: repeatable on a loaded
//! machine), then the load generator, which starts every configuration itself on 127.0.0.1 and
//! measures them interleaved. Results go to bench-results/<UTC time>/; a full run also copies
//! them to bench-results/latest/. See docs/benchmarks.md.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::bench_instructions;
use crate::build;
use crate::{repo_root, Error};

fn say(what: &str) {
    eprintln!("\x1b[1mbench:\x1b[0m {what}");
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut quick = false;
    // Every workload and the parser: only such a run replaces bench-results/latest.
    let mut full = true;
    let mut parser = true;
    let mut instructions = true;
    let mut load = true;
    let mut pass: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => {
                quick = true;
                full = false;
                pass.push(arg.clone());
            }
            "--no-parser" => {
                parser = false;
                full = false;
            }
            "--no-instructions" => {
                instructions = false;
                full = false;
            }
            "--parser-only" => {
                load = false;
                instructions = false;
                full = false;
            }
            "--only" => {
                full = false;
                let v = it
                    .next()
                    .ok_or_else(|| Error::usage("--only needs a value"))?;
                pass.extend([arg.clone(), v.clone()]);
            }
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(());
            }
            _ => pass.push(arg.clone()),
        }
    }

    let started = Instant::now();
    let repo = repo_root();
    let stamp = utc("+%Y%m%dT%H%M%SZ")?;
    let out = repo.join("bench-results").join(&stamp);
    fs::create_dir_all(&out).map_err(|e| Error::msg(format!("{}: {e}", out.display())))?;

    say("building the module, nginx and examples/ws-bench.rs (release)");
    let a = build::build(&build::Options {
        release: true,
        nice: true,
    })?;
    let bench_bin = a.example("ws-bench")?.clone();

    let mut extra: Vec<String> = Vec::new();
    if parser {
        say("parser microbenchmarks (crates/ws-core/benches/parser.rs)");
        criterion(&repo, quick)?;
        extra.extend([
            "--criterion".into(),
            repo.join("target/criterion").display().to_string(),
        ]);
    }

    if instructions {
        let trips = if quick { 1000 } else { 5000 };
        for size in [64, 1024] {
            say(&format!(
                "instructions per proxied message, {size} B (bench-instructions {trips} {size})"
            ));
            bench_instructions::run(&a, trips, size)?;
            let copy = out.join(format!("instructions-{size}B.md"));
            copy_file(&bench_instructions::table_path(size), &copy)?;
            extra.extend(["--instructions".into(), copy.display().to_string()]);
        }
    }

    if !load {
        pass.extend(["--only".into(), "none".into()]);
    }
    say(&format!("running {}", bench_bin.display()));
    let st = Command::new(&bench_bin)
        .arg("--nginx")
        .arg(&a.nginx)
        .arg("--module")
        .arg(&a.module)
        .arg("--out")
        .arg(&out)
        .arg("--work")
        .arg(repo.join("target/bench"))
        .args(&extra)
        .args(&pass)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::msg(format!("cannot run {}: {e}", bench_bin.display())))?;
    if !st.success() {
        return Err(Error {
            message: format!("ws-bench failed ({st})"),
            status: 1,
        });
    }

    if full {
        let latest = repo.join("bench-results/latest");
        let _ = fs::remove_dir_all(&latest);
        fs::create_dir_all(&latest).map_err(|e| Error::msg(format!("{e}")))?;
        let names = fs::read_dir(&out).map_err(|e| Error::msg(format!("{e}")))?;
        for e in names.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = matches!(name.as_str(), "results.md" | "results.json" | "ratios.png")
                || (name.starts_with("instructions-") && name.ends_with(".md"));
            if keep {
                copy_file(&e.path(), &latest.join(&name))?;
            }
        }
        say("copied to bench-results/latest/");
    }
    say(&format!(
        "finished in {} s (build included): {}",
        started.elapsed().as_secs(),
        out.join("results.md").display()
    ));
    Ok(())
}

/// The criterion parser benchmarks, their result lines on stderr.
fn criterion(repo: &Path, quick: bool) -> Result<(), Error> {
    for group in ["parser", "observer"] {
        let _ = fs::remove_dir_all(repo.join("target/criterion").join(group));
    }
    let times: &[&str] = if quick {
        &[
            "--warm-up-time",
            "0.1",
            "--measurement-time",
            "0.3",
            "--sample-size",
            "10",
        ]
    } else {
        &["--warm-up-time", "1", "--measurement-time", "2"]
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new("nice")
        .arg(cargo)
        .current_dir(repo)
        .args([
            "bench", "-p", "ws-core", "--bench", "parser", "--", "--noplot",
        ])
        .args(times)
        .output()
        .map_err(|e| Error::msg(format!("cannot run cargo bench: {e}")))?;
    let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("parser/") || l.starts_with("observer/") || l.contains("thrpt:"))
        .collect();
    if !o.status.success() || lines.is_empty() {
        return Err(Error::msg("cargo bench failed"));
    }
    for l in lines {
        eprintln!("{l}");
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> Result<(), Error> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| Error::msg(format!("{} -> {}: {e}", from.display(), to.display())))
}

/// The UTC time in `date`'s format.
fn utc(format: &str) -> Result<String, Error> {
    let o = Command::new("date")
        .args(["-u", format])
        .output()
        .map_err(|e| Error::msg(format!("date: {e}")))?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

const HELP: &str = "\
Usage: cargo xtask bench [--quick] [--no-parser] [--no-instructions] [--parser-only]
                         [ws-bench options]

Builds the module, the vendored nginx and examples/ws-bench.rs in release mode, runs the
parser microbenchmarks (crates/ws-core/benches/parser.rs, criterion), then
bench-instructions at 64 B and 1 KiB (callgrind instructions per proxied message, the primary
judge: repeatable on a loaded machine; judged and included in the report), then the load
generator, which starts every configuration itself on 127.0.0.1 and measures them
interleaved: the echo upstream directly, stock nginx, the module loaded without directives,
close records, frame records (buffered and not), frame records with 64 payload bytes and
HAProxy on plain echoes and a stream; compressed (permessage-deflate) echoes with message
records, capture off and with ws_log_payload 256; echoes under a ws_limit that never triggers
and under one that shapes; idle tunnels, plain and compressed, for memory. Every CPU ratio is
the median of the per-round ratios with their min-max; CPU targets carry a bootstrap
interval. Writes results.md, results.json and ratios.png (gnuplot) into
bench-results/<UTC time>/; a full run (not --quick, --only, --no-parser, --no-instructions or
--parser-only) also copies them to bench-results/latest/. See docs/benchmarks.md.

  --quick            a few minutes after the build: 2 short rounds, no 1000-connection
                     workloads, 1000 idle tunnels, short parser runs, 1000 round trips
                     for the instruction counts
  --no-parser        skip the criterion microbenchmarks
  --no-instructions  skip bench-instructions (about 5 minutes)
  --parser-only      only the criterion microbenchmarks
  --rounds N         rounds per workload (default 5)
  --no-pin           let the processes run on any CPU (default: the proxy on CPU 1, the
                     generator and the upstream on CPU 0, with 2 CPUs or more)
  --duration SECS    measured time per configuration, workload and round (default 0.6)
  --idle N           idle tunnels for the memory figures (default 10000)
  --only LIST        workloads to run, by id prefix: echo, stream, deflate, limit, shaped,
                     idle (plain and compressed), idle-deflate, echo-64B, ...

Needs haproxy, gnuplot, valgrind and Python's websockets (scripts/bench installs them). The
10,000 idle tunnels need about 20,000 descriptors in the generator (client and upstream
ends): run as root, or with a hard RLIMIT_NOFILE that allows it (the run scales the number
down otherwise and says so).
";
