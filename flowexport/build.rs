//! Generates the protobuf types, and locates the kernel object built by
//! `cargo xtask build-ebpf` so the agent can embed it. A missing object or
//! `protoc` is a build error that says what to run.
use std::path::PathBuf;

fn main() {
    compile_protos();
    embed_ebpf_object();
}

/// Generates the `FlowMessage` types from proto/flow.proto (needs `protoc`,
/// from Debian's protobuf-compiler; `scripts/setup.sh` installs it).
fn compile_protos() {
    let proto_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../proto");
    println!(
        "cargo:rerun-if-changed={}",
        proto_dir.join("flow.proto").display()
    );
    if let Err(e) = prost_build::compile_protos(&[proto_dir.join("flow.proto")], &[proto_dir]) {
        eprintln!(
            "\nerror: compiling proto/flow.proto failed: {e}\n\
             prost-build needs `protoc` (apt-get install protobuf-compiler, or run scripts/setup.sh).\n"
        );
        std::process::exit(1);
    }
}

fn embed_ebpf_object() {
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
