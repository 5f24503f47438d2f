//! Sockets inside a pod's network namespace: setns into the pod,
//! create the socket, setns back, all on the calling thread. A socket keeps
//! the namespace it was created in, so tokio can drive it from any thread.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

/// Marks every socket ztunnel opens in a pod so the capture rules skip it.
pub const ZTUNNEL_MARK: u32 = 0x539;

static HOST_NETNS: OnceLock<OwnedFd> = OnceLock::new();

/// Remembers the namespace ztunnel itself runs in. Call once, first thing.
pub fn init_host_netns() -> io::Result<()> {
    let fd: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")?.into();
    let _ = HOST_NETNS.set(fd);
    Ok(())
}

#[derive(Debug)]
pub struct PodNetns {
    fd: OwnedFd,
    /// (device, inode) of the namespace: equal ids are the same netns.
    pub id: (u64, u64),
}

impl PodNetns {
    /// The `ip netns` name of this namespace, if it has one (standalone
    /// pods): `/etc/netns/<name>/` holds its own resolv.conf.
    pub fn name(&self) -> Option<String> {
        std::fs::read_dir("/run/netns")
            .ok()?
            .flatten()
            .find_map(|e| {
                let st = nix::sys::stat::stat(&e.path()).ok()?;
                ((st.st_dev as u64, st.st_ino as u64) == self.id)
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
    }

    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let st = nix::sys::stat::fstat(&fd)?;
        Ok(PodNetns {
            fd,
            id: (st.st_dev as u64, st.st_ino as u64),
        })
    }

    fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let host = HOST_NETNS.get().expect("init_host_netns not called");
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let r = f();
        if let Err(e) = setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread stuck in a pod's netns would open sockets in the
            // wrong place: stopping is the only safe answer.
            eprintln!("fatal: cannot return to host netns: {e}");
            std::process::abort();
        }
        r
    }

    /// A listener on `port` in the pod for one family (0.0.0.0, or [::]
    /// IPv6-only so addresses never come v4-mapped): marked, reuse-port (old
    /// and new ztunnel overlap in upgrades), transparent.
    fn listener(&self, port: u16, v6: bool) -> io::Result<TcpListener> {
        let sock = self.run(|| tcp_socket(v6))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        let any = match v6 {
            true => {
                sock.set_only_v6(true)?;
                sock.set_ip_transparent_v6(true)?;
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
            }
            false => {
                sock.set_ip_transparent_v4(true)?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
        };
        sock.bind(&any.into())?;
        sock.listen(1024)?;
        TcpListener::from_std(sock.into())
    }

    /// The listeners on `port` for both families.
    pub fn listeners(&self, port: u16) -> io::Result<Vec<TcpListener>> {
        both_families(port, |v6| self.listener(port, v6))
    }

    /// The DNS proxy's sockets (UDP and TCP) on 127.0.0.1:`port` and
    /// [::1]:`port` in the pod, where the capture rules REDIRECT port 53.
    pub fn dns_listeners(&self, port: u16) -> io::Result<Vec<(UdpSocket, TcpListener)>> {
        both_families(port, |v6| self.dns_listener(port, v6))
    }

    fn dns_listener(&self, port: u16, v6: bool) -> io::Result<(UdpSocket, TcpListener)> {
        let addr: SocketAddr = match v6 {
            true => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            false => SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let (udp, tcp) = self.run(|| Ok((udp_socket(v6)?, tcp_socket(v6)?)))?;
        for s in [&udp, &tcp] {
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            if v6 {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
        }
        tcp.listen(256)?;
        Ok((
            UdpSocket::from_std(udp.into())?,
            TcpListener::from_std(tcp.into())?,
        ))
    }

    /// A marked UDP socket in the pod bound to `local` (upstream DNS: it
    /// leaves by the pod's own routes, skipping the capture rules).
    pub fn udp_bind(&self, local: SocketAddr) -> io::Result<UdpSocket> {
        let s = self.run(|| udp_socket(local.is_ipv6()))?;
        s.bind(&local.into())?;
        UdpSocket::from_std(s.into())
    }

    /// Connects from inside the pod. With `as_source`, the socket is bound to
    /// that (foreign) address first, so the application sees the original
    /// client IP (IP_TRANSPARENT + IP_FREEBIND, or their IPv6 twins).
    pub async fn connect(
        &self,
        dst: SocketAddr,
        as_source: Option<SocketAddr>,
    ) -> io::Result<TcpStream> {
        let sock = self.run(|| tcp_socket(dst.is_ipv6()))?;
        if let Some(src) = as_source {
            if dst.is_ipv6() {
                sock.set_ip_transparent_v6(true)?;
                sock.set_freebind_v6(true)?;
            } else {
                sock.set_ip_transparent_v4(true)?;
                sock.set_freebind_v4(true)?;
            }
            sock.bind(&SocketAddr::new(src.ip(), 0).into())?;
        }
        let s = TcpSocket::from_std_stream(sock.into()).connect(dst).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// `open(false)`, and `open(true)` unless the pod's netns has IPv6 turned
/// off (it can then have no v6 traffic to serve).
fn both_families<T>(port: u16, open: impl Fn(bool) -> io::Result<T>) -> io::Result<Vec<T>> {
    let mut out = vec![open(false)?];
    match open(true) {
        Ok(l) => out.push(l),
        Err(e) if hbone::no_ipv6(&e) => {
            tracing::debug!(port, error = %e, "no IPv6 in the pod; IPv4 only")
        }
        Err(e) => return Err(e),
    }
    Ok(out)
}

fn domain(v6: bool) -> Domain {
    if v6 {
        Domain::IPV6
    } else {
        Domain::IPV4
    }
}

fn udp_socket(v6: bool) -> io::Result<Socket> {
    let s = Socket::new(
        domain(v6),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    s.set_mark(ZTUNNEL_MARK)?;
    Ok(s)
}

fn tcp_socket(v6: bool) -> io::Result<Socket> {
    let s = Socket::new(
        domain(v6),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_mark(ZTUNNEL_MARK)?;
    Ok(s)
}

/// The destination a REDIRECTed connection was headed to: SO_ORIGINAL_DST
/// for IPv4, IP6T_SO_ORIGINAL_DST for IPv6 (listeners are one family each).
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    if s.local_addr()?.is_ipv6() {
        let a = getsockopt(s, sockopt::Ip6tOriginalDst)?;
        let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
        return Ok(SocketAddr::from((ip, u16::from_be(a.sin6_port))));
    }
    let a = getsockopt(s, sockopt::OriginalDst)?;
    let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(a.sin_port))))
}
