// Compiles the hand-written ext_authz protos with protox (pure Rust), so
// building needs no system protoc. Messages only: the one unary call is made
// over the waypoint's own HTTP/2 client.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/envoy/auth.proto"];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
