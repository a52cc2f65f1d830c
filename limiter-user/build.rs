//! Builds the kernel programs (`limiter-ebpf`) for `bpfel-unknown-none` and
//! puts the objects in `OUT_DIR`, where `kernel/mod.rs` and `baseline.rs` embed
//! them.
//!
//! This does by hand what aya-build does, because aya-build overwrites the
//! rustflags and the counts need `-C target-cpu=v3` (atomic fetch-and-add
//! and compare-and-swap). The toolchain is Debian's rustc with a precompiled
//! `core` for the bpf target, linked into rustup as `bpf-debian` by
//! `cargo xtask setup` (see ../shared/docs/TOOLCHAIN.md).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TOOLCHAIN: &str = "bpf-debian";
const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "limiter-ebpf";
/// The objects it builds: the kernel programs, and with the `bench` feature
/// the baselines and traffic generator of the benchmarks.
const OBJECTS: [&str; 2] = ["limiter-ebpf", "baseline"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.parent().expect("crate inside the workspace");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    for watched in [
        "limiter-ebpf",
        "limiter-common/src",
        "limiter-common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    if let Err(message) = build(workspace, &out_dir) {
        panic!("building the eBPF programs failed: {message}");
    }
}

fn build(workspace: &Path, out_dir: &Path) -> Result<(), String> {
    // A target dir of its own: the outer cargo holds the lock on the usual one.
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| e.to_string())?;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
        "-Ctarget-cpu=v3".to_string(),
    ]
    .join("\x1f");
    let objects: &[&str] = if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &OBJECTS
    } else {
        &OBJECTS[..1]
    };
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release"])
        .args(["--target", TARGET, "--package", PACKAGE]);
    for object in objects {
        cmd.args(["--bin", object]);
    }
    cmd.arg("--target-dir")
        .arg(&target_dir)
        .current_dir(workspace)
        // aya-ebpf needs one unstable feature, limiter-ebpf the atomic
        // intrinsics; nothing else may use unstable features.
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,limiter_ebpf")
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    for inherited in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(inherited);
    }
    let status = cmd.status().map_err(|e| {
        format!("cannot run rustup ({e}); run `cargo xtask setup` to install the eBPF toolchain")
    })?;
    if !status.success() {
        return Err(format!(
            "`rustup run {TOOLCHAIN} cargo build --target {TARGET} -p {PACKAGE}` failed ({status}); \
             if the toolchain or bpf-linker is missing, run `cargo xtask setup`"
        ));
    }
    for object in objects {
        let built = target_dir.join(TARGET).join("release").join(object);
        let dest = out_dir.join(object);
        std::fs::copy(&built, &dest)
            .map_err(|e| format!("copying {} to {}: {e}", built.display(), dest.display()))?;
    }
    Ok(())
}
