// No build steps of our own. The file exists so that the `aya-build = "=0.2.0"`
// pin in [build-dependencies] takes effect: it keeps aya-ebpf's build script
// on the aya-build release that this toolchain can compile.
fn main() {}
