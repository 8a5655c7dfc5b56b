//! Builds the guest agent for the guest and leaves it in `$OUT_DIR/kiln-agent`, which
//! `src/main.rs` embeds: a `kiln` from `cargo build` or `cargo install` then starts VMs
//! with nothing beside it.
//!
//! The agent runs as PID 1 in an initramfs with no libc, so it is a static glibc build for
//! `x86_64-unknown-linux-gnu` (what `scripts/build-agent.sh` makes), built by a nested
//! `cargo` into a target directory of its own next to the outer build's: the outer build
//! holds the lock on its own directory for as long as this script runs, and a directory
//! that stays put keeps the nested build incremental.
//!
//! `KILN_AGENT_BIN` at build time skips the nested build and embeds that file instead
//! (`scripts/test.sh` passes the agent it has just built).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../kiln-vm/src/elf.rs"]
mod elf;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// What the nested build reads: a change to any of these builds the agent again.
const AGENT_INPUTS: &[&str] = &[
    "crates/kiln-agent/Cargo.toml",
    "crates/kiln-agent/src",
    "crates/kiln-agent-proto/Cargo.toml",
    "crates/kiln-agent-proto/src",
    "Cargo.toml",
    "Cargo.lock",
];

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=KILN_AGENT_BIN");
    let agent = match std::env::var_os("KILN_AGENT_BIN").filter(|v| !v.is_empty()) {
        Some(given) => {
            let given = PathBuf::from(given);
            if given.is_relative() {
                // It would be taken from crates/kiln-cli, where cargo runs this script.
                fail(&format!(
                    "KILN_AGENT_BIN={} must be an absolute path when building kiln",
                    given.display()
                ));
            }
            println!("cargo:rerun-if-changed={}", given.display());
            given
        }
        None => build_agent(&out_dir),
    };
    let data = std::fs::read(&agent)
        .unwrap_or_else(|e| fail(&format!("reading the agent {}: {e}", agent.display())));
    match elf::is_static(&data) {
        Ok(true) => {}
        Ok(false) => fail(&format!(
            "the agent {} is dynamically linked; it runs as /init with no libc, so it must \
             be static (scripts/build-agent.sh builds one)",
            agent.display()
        )),
        Err(e) => fail(&format!("the agent {}: {e}", agent.display())),
    }
    let embedded = out_dir.join("kiln-agent");
    std::fs::write(&embedded, &data)
        .unwrap_or_else(|e| fail(&format!("writing {}: {e}", embedded.display())));
}

/// Runs the nested `cargo build` of the agent and returns the binary it made.
fn build_agent(out_dir: &Path) -> PathBuf {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set"));
    let workspace = manifest_dir.join("../..");
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    for input in AGENT_INPUTS {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    let target_dir = nested_target_dir(out_dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--package", "kiln-agent", "--release"])
        .args(["--target", GUEST_TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .args(outer_flags());
    for (name, _) in std::env::vars_os() {
        if !passes_to_nested_build(&name) {
            cmd.env_remove(&name);
        }
    }
    // Only the guest target gets crt-static: proc-macros (host) must stay dynamic. No debug
    // info, stripped: the initramfs wants ~3 MB, not ~17.
    cmd.env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    )
    .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
    .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    // Cargo reads this script's stdout for `cargo:` lines; the nested build's output is
    // for people (shown when the build fails, or with `-vv`).
    cmd.stdout(std::io::stderr());
    eprintln!(
        "building the guest agent: {} {:?}",
        Path::new(&cargo).display(),
        cmd.get_args().collect::<Vec<_>>()
    );
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("running {}: {e}", Path::new(&cargo).display())));
    if !status.success() {
        fail(&format!(
            "building the guest agent failed ({status}); its output is above. \
             To embed an agent built elsewhere, set KILN_AGENT_BIN to a static kiln-agent."
        ));
    }
    target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("kiln-agent")
}

/// `<outer target dir>/guest-agent`: shared by the outer build's profiles (debug, release,
/// `cargo clippy`), which all embed the same release agent. `OUT_DIR` is
/// `<target>/<profile>/build/kiln-cli-<hash>/out`; under any other shape the agent is built
/// in `OUT_DIR` itself (correct, only not shared).
fn nested_target_dir(out_dir: &Path) -> PathBuf {
    let mut up = out_dir.ancestors();
    match (up.nth(2), up.nth(1)) {
        (Some(build), Some(target)) if build.file_name() == Some(OsStr::new("build")) => {
            target.join("guest-agent")
        }
        _ => out_dir.join("guest-agent"),
    }
}

/// `--locked`, `--offline` and `--frozen` as given to the cargo that runs this script
/// (its parent): cargo hands them to no build script, and the nested build must keep the
/// same promises (no network, no change to Cargo.lock).
fn outer_flags() -> Vec<String> {
    let parent = std::os::unix::process::parent_id();
    let Ok(cmdline) = std::fs::read(format!("/proc/{parent}/cmdline")) else {
        return Vec::new();
    };
    let mut flags: Vec<String> = cmdline
        .split(|b| *b == 0)
        .take_while(|arg| *arg != b"--")
        .filter_map(|arg| match arg {
            b"--locked" | b"--offline" | b"--frozen" => {
                Some(String::from_utf8_lossy(arg).into_owned())
            }
            _ => None,
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// Whether an environment variable of this script goes to the nested build. Cargo sets
/// many for build scripts (features, cfgs, profile, target, flags, dependency metadata)
/// and a nested cargo would read some of them as its own settings or pass them on to its
/// own build scripts; the outer build's `RUSTFLAGS`, target dir, target and lint wrapper
/// (`cargo clippy`) must not reach it either, or it would rebuild the agent whenever they
/// differ. What passes: the toolchain (`RUSTC`, `RUSTUP_*`, `RUSTC_WRAPPER`), where to
/// fetch from and how (`CARGO_HOME`, network and registry settings), the jobserver
/// (`CARGO_MAKEFLAGS`, so the nested build shares the outer one's `-j`) and the rest of
/// the user's environment.
fn passes_to_nested_build(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return true;
    };
    if let Some(rest) = name.strip_prefix("CARGO_") {
        return rest == "HOME"
            || rest == "MAKEFLAGS"
            || ["NET_", "HTTP_", "REGISTRY_", "REGISTRIES_", "TERM_"]
                .iter()
                .any(|p| rest.starts_with(p));
    }
    !(name.starts_with("DEP_")
        || matches!(
            name,
            "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTC_LINKER"
                | "TARGET"
                | "HOST"
                | "OUT_DIR"
                | "PROFILE"
                | "OPT_LEVEL"
                | "DEBUG"
                | "NUM_JOBS"
        ))
}

/// Fails the build with `msg` (cargo shows a build script's stderr when it fails).
fn fail(msg: &str) -> ! {
    eprintln!("error: kiln-cli build script: {msg}");
    std::process::exit(1);
}
