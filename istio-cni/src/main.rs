//! The CNI plugin and node agent. Not built yet: see the istio-cni issue.
fn main() {
    eprintln!("istio-cni: not implemented yet (capture is tracked by its own issue)");
    std::process::exit(2);
}
