// Link libtorch's directory for run time (tests and the extension find libtorch without
// LD_LIBRARY_PATH) and the OpenMP runtime the torch wheel ships, so that our parallel
// kernels share torch's thread pool (see src/pool.rs).
fn main() {
    if let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let dir = dir.to_string_lossy();
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-search=native={dir}");
        // The wheel has only the soname file, no libgomp.so linker name: link it verbatim.
        println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    }
}
