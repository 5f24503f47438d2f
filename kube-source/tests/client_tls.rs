//! The binaries link two rustls providers (aws-lc-rs for HBONE, ring for
//! the CA and other clients), and with two compiled in rustls cannot pick
//! a process default by itself. kube builds its TLS config with that
//! default, so a kube client must still be constructible: kube's own
//! aws-lc-rs feature installs the default when none is set.

#[tokio::test]
async fn kube_client_builds_its_tls_config() {
    let cfg = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    kube::Client::try_from(cfg).expect("kube client with TLS");
}
