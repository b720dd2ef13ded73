//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can
//! embed it. A missing object is a build error that says what to run.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=FLOWEXPORT_EBPF_OBJECT");
    let path = match std::env::var_os("FLOWEXPORT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => {
            let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
            manifest.join("../target/bpfel-unknown-none/release/flowexport")
        }
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        eprintln!(
            "\nerror: the eBPF object {} is missing.\n\
             Build it first with `cargo xtask build-ebpf` (needs nightly with rust-src and\n\
             bpf-linker; `scripts/setup.sh` installs both), or point FLOWEXPORT_EBPF_OBJECT\n\
             at a prebuilt object.\n",
            path.display()
        );
        std::process::exit(1);
    }
    let path = path
        .canonicalize()
        .expect("canonical path of the eBPF object");
    println!("cargo:rustc-env=FLOWEXPORT_EBPF_OBJECT={}", path.display());
}
