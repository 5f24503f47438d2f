//! The namespace-scoped L7 proxy. Not built yet: see the waypoint issue.
fn main() {
    eprintln!("waypoint: not implemented yet (L7 proxy is tracked by its own issue)");
    std::process::exit(2);
}
