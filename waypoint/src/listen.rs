//! The HBONE listener(s): `--listen` on an unspecified address means every
//! family, one socket each as ztunnel binds its own (the v6 one IPv6-only, so
//! a v4 peer is never seen as a v4-mapped address). The v6 socket is skipped
//! when the pod's netns has IPv6 turned off: it can then get no v6 traffic.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// One socket to bind: its address, and whether failing for want of IPv6
/// may be skipped.
#[derive(Debug, PartialEq, Eq)]
pub struct Bind {
    pub addr: SocketAddr,
    pub optional: bool,
}

/// What `--listen` asks for: an unspecified address (`0.0.0.0` or `[::]`) is
/// both families, v4 required; a specific one is just that one.
pub fn plan(listen: SocketAddr) -> Vec<Bind> {
    if !listen.ip().is_unspecified() {
        return vec![Bind {
            addr: listen,
            optional: false,
        }];
    }
    let port = listen.port();
    vec![
        Bind {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            optional: false,
        },
        Bind {
            addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            optional: true,
        },
    ]
}

/// Binds `plan(listen)`; must run inside the runtime.
pub fn bind(listen: SocketAddr) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for b in plan(listen) {
        match socket(b.addr) {
            Ok(l) => out.push(l),
            Err(e) if b.optional && hbone::no_ipv6(&e) => {
                tracing::debug!(addr = %b.addr, error = %e, "no IPv6 in the pod; IPv4 only")
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", b.addr))),
        }
    }
    Ok(out)
}

fn socket(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // A restarted waypoint binds while the old one's connections linger.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_is_both_families_v6_optional() {
        let b = |a: &str, optional| Bind {
            addr: a.parse().unwrap(),
            optional,
        };
        let cases: &[(&str, Vec<Bind>)] = &[
            (
                "0.0.0.0:15008",
                vec![b("0.0.0.0:15008", false), b("[::]:15008", true)],
            ),
            (
                "[::]:15008",
                vec![b("0.0.0.0:15008", false), b("[::]:15008", true)],
            ),
            ("10.0.0.1:15008", vec![b("10.0.0.1:15008", false)]),
            ("[fd00::1]:15008", vec![b("[fd00::1]:15008", false)]),
            ("127.0.0.1:0", vec![b("127.0.0.1:0", false)]),
        ];
        for (listen, want) in cases {
            assert_eq!(&plan(listen.parse().unwrap()), want, "{listen}");
        }
    }

    #[tokio::test]
    async fn a_specific_v6_address_binds_alone_and_sees_v6_peers() {
        let ls = bind("[::1]:0".parse().unwrap()).unwrap();
        assert_eq!(ls.len(), 1);
        let at = ls[0].local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(at).await.unwrap();
        let (_, peer) = ls[0].accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert!(peer.is_ipv6());
    }
}
