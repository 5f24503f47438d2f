//! HBONE: each proxied TCP connection is one HTTP/2 CONNECT stream
//! inside a mutual-TLS 1.3 connection to port 15008. This crate holds the
//! client pool, the server side, and the byte pump between a TCP socket and a
//! stream; callers bring sockets (so they can be made inside a pod's netns)
//! and TLS configs (from `identity`).

mod client;
mod copy;
mod io;
mod keepalive;
mod server;

pub use client::{Pool, PoolKey, StreamGuard};
pub use copy::{pump, ReadReady, Transfer};
pub use io::StreamIo;
pub use keepalive::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
pub use server::{
    log_end, serve, terminate, Inbound, InboundError, ServeError, TerminateError, TlsConn,
};

/// HTTP/2 settings sized for throughput: 64 KiB defaults starve a tunnel.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per pooled connection before the pool opens another (as upstream).
pub const MAX_STREAMS_PER_CONN: usize = 100;
pub const HBONE_PORT: u16 = 15008;
/// A peer that connects and then says nothing is cut off rather than held.
/// The dialing side spends it on TCP connect, TLS and the HTTP/2 preface
/// together; the accepting side on TLS, and again on the preface (`serve`
/// receives the stream after TLS).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// rustls pulls one TLS record (~16 KiB) per read; a large read buffer under
/// it turns a dozen recv syscalls into one.
pub(crate) fn read_buffered<IO: tokio::io::AsyncRead>(io: IO) -> tokio::io::BufReader<IO> {
    tokio::io::BufReader::with_capacity(256 * 1024, io)
}

/// How much encrypted data rustls holds for the socket before it takes no
/// more plaintext. Its default (64 KiB) made each bulk write to the socket
/// ~50 KiB; h2 hands over up to a 1 MiB frame at a time.
const TLS_SEND_BUFFER: usize = 512 * 1024;

/// Sets what an HBONE TLS connection buffers (both ends).
pub(crate) fn tune_tls<D>(
    conn: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake with {addr} timed out after {:?}", crate::HANDSHAKE_TIMEOUT)]
    HandshakeTimeout { addr: std::net::SocketAddr },
    #[error("connection to {addr} failed while this tunnel waited for it: {reason}")]
    DialFailed {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("peer {addr} is {got}, expected {want}")]
    WrongPeer {
        addr: std::net::SocketAddr,
        got: String,
        want: String,
    },
    #[error("peer {addr}: {source}")]
    PeerIdentity {
        addr: std::net::SocketAddr,
        source: identity::TlsError,
    },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT {authority} refused with status {status}")]
    Refused {
        authority: String,
        status: http::StatusCode,
    },
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// Whether binding an IPv6 socket failed because the network namespace has
/// IPv6 turned off (no `[::]` to bind, or no IPv6 at all). Listeners bound
/// per family skip their v6 socket then: such a pod gets no v6 traffic.
pub fn no_ipv6(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let errno = Errno::from_raw(e.raw_os_error().unwrap_or_default());
    matches!(errno, Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL)
}

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    #[test]
    fn no_ipv6_is_only_the_missing_family_or_address() {
        let os = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        assert!(super::no_ipv6(&os(Errno::EAFNOSUPPORT)));
        assert!(super::no_ipv6(&os(Errno::EADDRNOTAVAIL)));
        // A port in use, or no permission, is a real failure to report.
        assert!(!super::no_ipv6(&os(Errno::EADDRINUSE)));
        assert!(!super::no_ipv6(&os(Errno::EACCES)));
        assert!(!super::no_ipv6(&std::io::Error::other("not an OS error")));
    }
}
