//! With the `cuda` feature, compiles `cuda/attention.cu` to PTX with the toolkit's nvcc (`$CUDA_PATH/bin`
//! or the PATH), for compute capability `$CUDA_COMPUTE_CAP` (default 80; the driver compiles PTX
//! for any newer card when it loads it). Without the feature there is nothing to build.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["CUDA_PATH", "CUDA_COMPUTE_CAP", "NVCC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| {
        env::var_os("CUDA_PATH")
            .map(|root| PathBuf::from(root).join("bin/nvcc"))
            .filter(|nvcc| nvcc.exists())
            .unwrap_or_else(|| "nvcc".into())
    });
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().trim_start_matches("sm_").trim_end_matches('a');
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = "cuda/attention.cu";
    println!("cargo::rerun-if-changed={source}");
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
        ])
        .arg(source)
        .arg("-o")
        .arg(out.join("attention.ptx"))
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the cuda feature needs nvcc (set CUDA_PATH or NVCC, see dev/cuda-toolkit.sh): \
                 running {}: {e}",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {source}");
}
