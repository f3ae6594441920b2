//! `cargo xtask build`: one cargo build of the module, the vendored nginx and the examples, and
//! where cargo put them.
//!
//! Module and examples are built by a single `cargo build --lib --examples`: separate runs
//! resolve features differently (the examples pull in dev-dependencies), so each would build an
//! nginx of its own and rebuild the module every time. Several nginx builds may exist under
//! `target/`; the one the module was built against is the one its build script reports as
//! `NGX_WS_NGINX_BUILD_DIR`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{repo_root, Error};

/// What the build produced.
#[derive(Debug, Default)]
pub struct Artifacts {
    pub module: PathBuf,
    pub nginx: PathBuf,
    pub build_dir: PathBuf,
    /// Example binaries by name (`ws-echo`, `ws-traffic`, `ws-bench`, `soak`, ...).
    pub examples: BTreeMap<String, PathBuf>,
}

impl Artifacts {
    pub fn example(&self, name: &str) -> Result<&PathBuf, Error> {
        self.examples
            .get(name)
            .ok_or_else(|| Error::msg(format!("the {name} example binary was not built")))
    }
}

#[derive(Debug, Default, Clone)]
pub struct Options {
    pub release: bool,
    /// Run cargo under `nice` (the long runs: bench, autobahn, nginx-tests).
    pub nice: bool,
}

/// Builds and locates the artifacts. Cargo's diagnostics go to stderr as usual.
pub fn build(opts: &Options) -> Result<Artifacts, Error> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = if opts.nice {
        let mut c = Command::new("nice");
        c.arg(cargo);
        c
    } else {
        Command::new(cargo)
    };
    // `cargo run` gave this process the variables of the xtask package (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME, ...). Build scripts that track them (nginx-sys, ring: rerun-if-env-changed)
    // would see them change between this build and a plain `cargo build` or `cargo test`, and
    // rebuild nginx and everything after it each time one follows the other.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_cargo_run_variable) {
            cmd.env_remove(&name);
        }
    }
    cmd.current_dir(repo_root())
        .args([
            "build",
            "--lib",
            "--examples",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped());
    if opts.release {
        cmd.arg("--release");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::msg(format!("cannot run cargo: {e}")))?;

    let mut found = Artifacts::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| Error::msg(format!("reading cargo's output: {e}")))?;
        if let Ok(msg) = serde_json::from_str::<Value>(&line) {
            found.take(&msg);
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::msg(format!("cargo: {e}")))?;
    if !status.success() {
        return Err(Error::msg("cargo build failed"));
    }

    if !found.module.is_file() {
        return Err(Error::msg(
            "cargo did not report the module (libnginx_ws.so)",
        ));
    }
    found.nginx = found.build_dir.join("nginx");
    if found.build_dir.as_os_str().is_empty() || !found.nginx.is_file() {
        return Err(Error::msg(format!(
            "nginx binary not found (build dir \"{}\")",
            found.build_dir.display()
        )));
    }
    Ok(found)
}

impl Artifacts {
    /// Takes what it needs from one of cargo's JSON messages; the last report wins.
    fn take(&mut self, msg: &Value) {
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                let target = &msg["target"];
                let kinds = target["kind"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                if kinds.iter().any(|k| k == "example") {
                    if let (Some(name), Some(exe)) =
                        (target["name"].as_str(), msg["executable"].as_str())
                    {
                        self.examples.insert(name.to_owned(), exe.into());
                    }
                }
                for file in msg["filenames"].as_array().into_iter().flatten() {
                    if let Some(f) = file.as_str().filter(|f| f.ends_with("/libnginx_ws.so")) {
                        self.module = f.into();
                    }
                }
            }
            Some("build-script-executed") => {
                for pair in msg["env"].as_array().into_iter().flatten() {
                    if pair[0] == "NGX_WS_NGINX_BUILD_DIR" {
                        if let Some(dir) = pair[1].as_str() {
                            self.build_dir = dir.into();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Shell assignments for `eval`: `module`, `nginx`, `build_dir`, and `example_<name>` for
    /// each example (dashes as underscores).
    pub fn shell(&self) -> String {
        let mut out = String::new();
        let mut var = |name: &str, path: &PathBuf| {
            out.push_str(&format!(
                "{name}={}\n",
                shell_quote(&path.to_string_lossy())
            ));
        };
        var("module", &self.module);
        var("nginx", &self.nginx);
        var("build_dir", &self.build_dir);
        for (name, path) in &self.examples {
            var(&format!("example_{}", name.replace('-', "_")), path);
        }
        out
    }

    /// One `what: path` line each, for people.
    pub fn human(&self) -> String {
        let mut out = format!(
            "nginx: {}\nmodule: {}\n",
            self.nginx.display(),
            self.module.display()
        );
        for (name, path) in &self.examples {
            out.push_str(&format!("example {name}: {}\n", path.display()));
        }
        out
    }
}

/// The variables cargo sets for the program of `cargo run` (not those it reads itself, like
/// CARGO_HOME or CARGO_TARGET_DIR).
fn is_cargo_run_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_MANIFEST_LINKS",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ]
        .contains(&name)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub fn main(args: &[String]) -> Result<(), Error> {
    let mut opts = Options::default();
    let mut shell = false;
    for arg in args {
        match arg.as_str() {
            "--release" => opts.release = true,
            "--nice" => opts.nice = true,
            "--shell" => shell = true,
            "-h" | "--help" => {
                print!("{}", HELP);
                return Ok(());
            }
            other => return Err(Error::usage(format!("unknown argument \"{other}\""))),
        }
    }
    let found = build(&opts)?;
    print!("{}", if shell { found.shell() } else { found.human() });
    Ok(())
}

const HELP: &str = "\
Usage: cargo xtask build [--release] [--nice] [--shell]

Builds the module, the vendored nginx and the examples in one cargo run and prints where they
are: the nginx binary, the module (.so) and each example binary.

  --release   the release profile
  --nice      run cargo under nice
  --shell     print shell assignments instead (module=, nginx=, build_dir=, example_ws_echo=,
              ...) for scripts: eval \"$(cargo xtask build --shell)\"
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_module_nginx_and_examples_from_cargo_messages() {
        let mut a = Artifacts::default();
        for line in [
            r#"{"reason":"build-script-executed","env":[["OTHER","x"],["NGX_WS_NGINX_BUILD_DIR","/t/objs"]]}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"nginx_ws","kind":["cdylib","rlib"]},"filenames":["/t/libnginx_ws.rlib","/t/libnginx_ws.so"],"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"ws-echo","kind":["example"]},"filenames":["/t/examples/ws-echo"],"executable":"/t/examples/ws-echo"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"serde","kind":["lib"]},"filenames":["/t/libserde.rlib"],"executable":null}"#,
        ] {
            a.take(&serde_json::from_str(line).unwrap());
        }
        assert_eq!(a.module, PathBuf::from("/t/libnginx_ws.so"));
        assert_eq!(a.build_dir, PathBuf::from("/t/objs"));
        assert_eq!(a.examples.len(), 1);
        assert_eq!(
            a.example("ws-echo").unwrap(),
            &PathBuf::from("/t/examples/ws-echo")
        );
        assert!(a.example("soak").is_err());
    }

    #[test]
    fn only_the_variables_of_cargo_run_are_dropped() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
        ] {
            assert!(is_cargo_run_variable(name), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
        ] {
            assert!(!is_cargo_run_variable(name), "{name}");
        }
    }

    #[test]
    fn shell_output_is_quoted() {
        let a = Artifacts {
            module: "/a b/it's.so".into(),
            ..Default::default()
        };
        assert!(a.shell().starts_with("module='/a b/it'\\''s.so'\n"));
    }
}
