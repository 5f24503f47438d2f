//! HTTP/2 PING keepalive on every HBONE connection, both ends. A peer that
//! vanishes without FIN or RST (node lost, packets dropped) would otherwise
//! hold every tunnel on the connection until TCP gives up, which on an idle
//! connection is never.

use std::time::Duration;

/// How often a PING goes out, and how long its answer may take before the
/// connection is declared dead: a blackholed peer is found within ~30 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Resolves only when a PING goes unanswered for KEEPALIVE_TIMEOUT. If the
/// connection closes first, the PING fails and this never resolves: the
/// connection's own future reports that ending.
pub(crate) async fn unanswered(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
