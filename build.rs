//! Builds the varlen attention kernel (src/model/kernels/varlen_attention.cu)
//! twice from one source: for the host always (a C++ loop over the launch's
//! threads, so CI tests the kernel's logic without a GPU), and as PTX with
//! nvcc when the `cuda` feature is on (embedded with `include_str!`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const KERNEL: &str = "src/model/kernels/varlen_attention.cu";
const HOST: &str = "src/model/kernels/varlen_host.cpp";

fn main() {
    println!("cargo:rerun-if-changed={KERNEL}");
    println!("cargo:rerun-if-changed={HOST}");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .file(HOST)
        .warnings(true)
        .compile("softprompt_varlen_host");

    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        ptx();
    }
}

/// `nvcc --ptx` for the capability candle builds for (CUDA_COMPUTE_CAP, as
/// scripts/cuda_build.sh sets it; default 80, whose PTX the driver also
/// JIT-compiles for 9.0).
fn ptx() {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("varlen_attention.ptx");
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(KERNEL)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc} for {KERNEL}: {e} (scripts/cuda_toolchain.sh installs it)")
        });
    assert!(status.success(), "{nvcc} failed on {KERNEL}");
}
