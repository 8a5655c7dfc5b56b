//! The `kiln` binary on its own: copied to an empty directory, run from `/` with a fresh
//! state dir and no `KILN_AGENT_BIN`, it sets up, boots a VM and builds a template with the
//! guest agent built into it. What `cargo install --path crates/kiln-cli` gives a user. Real VM under TCG;
//! see `common` for the prerequisites.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_no_qemu, assets, registry, REMEDY, SERVER_ENV_CLEARED};

/// `kiln ARGS` as a user would run the installed binary: from `/`, on `home`, with nothing
/// pointing at an agent.
fn run(kiln: &Path, home: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(kiln);
    cmd.args(args)
        .current_dir("/")
        .env("KILN_HOME", home)
        .env_remove("KILN_AGENT_BIN");
    for var in SERVER_ENV_CLEARED {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    eprintln!(
        "$ kiln {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The value of `name:` in `kiln setup`'s or `kiln doctor`'s output.
fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{stdout}"))
}

/// Copies the guest kernels of the test state dir (not their initramfs files, which are
/// per agent) so that `kiln setup` finds the kernel present and downloads nothing, and
/// builds the initramfs itself.
fn copy_kernels(from: &Path, to: &Path) {
    let mut copied = 0;
    for version in std::fs::read_dir(from).unwrap().flatten() {
        let src = version.path();
        if !src.join("vmlinuz").is_file() {
            continue;
        }
        let dst = to.join(version.file_name());
        std::fs::create_dir_all(dst.join("modules")).unwrap();
        std::fs::copy(src.join("vmlinuz"), dst.join("vmlinuz")).unwrap();
        for module in std::fs::read_dir(src.join("modules")).unwrap().flatten() {
            std::fs::copy(module.path(), dst.join("modules").join(module.file_name())).unwrap();
        }
        copied += 1;
    }
    assert!(
        copied > 0,
        "no guest kernel in {} -> {REMEDY}",
        from.display()
    );
}

#[test]
fn the_binary_alone_sets_up_runs_a_vm_and_builds_a_template() {
    let registry = registry(&assets());
    let bin_dir = tempfile::tempdir().unwrap();
    let kiln = bin_dir.path().join("kiln");
    std::fs::copy(env!("CARGO_BIN_EXE_kiln"), &kiln).unwrap();
    assert_eq!(
        std::fs::read_dir(bin_dir.path()).unwrap().count(),
        1,
        "nothing but kiln beside kiln"
    );
    // Short: VM sockets live under the state dir.
    let home = tempfile::Builder::new()
        .prefix("kst")
        .tempdir_in("/tmp")
        .unwrap();
    let home = home.path();
    copy_kernels(&assets().join("state/kernel"), &home.join("kernel"));

    let out = run(&kiln, home, &["setup", "--no-packages"]);
    assert!(out.status.success(), "kiln setup failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The agent came out of the binary into the state dir, and the initramfs was built
    // from it.
    let agent = Path::new(field(&stdout, "agent:"));
    assert_eq!(agent.parent(), Some(home.join("agent").as_path()));
    let name = agent.file_name().unwrap().to_str().unwrap();
    let sha12 = name.strip_prefix("kiln-agent-").unwrap();
    let meta = std::fs::metadata(agent).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    let initramfs = field(&stdout, "initramfs:");
    assert!(
        initramfs.starts_with(home.to_str().unwrap())
            && initramfs.contains(&format!("initramfs-{sha12}.cpio"))
            && initramfs.ends_with("(built)"),
        "initramfs: {initramfs}"
    );

    let out = run(&kiln, home, &["doctor"]);
    assert!(out.status.success(), "kiln doctor failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        Path::new(field(&stdout, "[ ok ] agent binary:")),
        agent,
        "doctor checks the agent setup wrote"
    );

    let image = format!("{registry}/kiln/minbase:latest");
    let out = run(&kiln, home, &["run", &image, "--", "echo", "ok"]);
    assert_no_qemu(home, Duration::from_secs(10));
    assert!(out.status.success(), "kiln run failed");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    // A template build goes through the engine, which gets the agent from the CLI too.
    let spec = home.join("spec.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "name": "standalone", "memoryMib": 256, "diskMib": 1024,
            "from": image, "steps": [{"run": "echo built > /built"}],
        })
        .to_string(),
    )
    .unwrap();
    let out = run(
        &kiln,
        home,
        &["template", "build", "-f", spec.to_str().unwrap()],
    );
    assert_no_qemu(home, Duration::from_secs(10));
    assert!(out.status.success(), "kiln template build failed");
    // Every command used the agent setup wrote out: another agent (the workspace build,
    // say) would have got an initramfs of its own.
    let initramfs_files: Vec<String> = std::fs::read_dir(home.join("kernel"))
        .unwrap()
        .flat_map(|v| std::fs::read_dir(v.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("initramfs-"))
        .collect();
    assert_eq!(initramfs_files, [format!("initramfs-{sha12}.cpio")]);
}
