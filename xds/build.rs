// Compiles our hand-written protos with protox (pure Rust), so building needs
// no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/envoy/discovery.proto",
        "proto/istio/workload.proto",
        "proto/istio/authorization.proto",
        "proto/istio/ca.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto/google/status.proto");
    Ok(())
}
