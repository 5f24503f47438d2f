//! Forwarding to the pod's own resolvers with hickory-resolver, over sockets
//! made inside the pod netns (marked, so capture skips them): the query leaves
//! exactly as the pod's would have, by the pod's routes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{RuntimeProvider, TokioHandle, TokioTime};
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::Resolver;
use tokio::net::{TcpStream, UdpSocket};

use super::answer;
use crate::proxy::Pod;

/// Sockets for hickory, made in one pod's netns.
#[derive(Clone)]
pub struct PodRuntime {
    pod: Arc<Pod>,
    handle: TokioHandle,
}

type BoxFut<T> = Pin<Box<dyn Send + Future<Output = io::Result<T>>>>;

impl RuntimeProvider for PodRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> TokioHandle {
        self.handle.clone()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        _bind: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> BoxFut<Self::Tcp> {
        let pod = self.pod.clone();
        Box::pin(async move {
            let wait = timeout.unwrap_or(Duration::from_secs(5));
            match tokio::time::timeout(wait, pod.netns.connect(server, None)).await {
                Ok(s) => s.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "DNS TCP connect timed out",
                )),
            }
        })
    }

    fn bind_udp(&self, local: SocketAddr, _server: SocketAddr) -> BoxFut<Self::Udp> {
        let r = self.pod.netns.udp_bind(local);
        Box::pin(async move { r })
    }
}

pub struct Upstream {
    resolver: Resolver<PodRuntime>,
    /// The pod's search domains (lowercase, no trailing dot), for answering
    /// partly qualified mesh names.
    pub search: Vec<String>,
}

impl Upstream {
    /// Reads the pod's resolv.conf: `/etc/netns/<name>/resolv.conf` for a
    /// named netns (what `ip netns exec` shows the pod), else ztunnel's own.
    pub fn for_pod(pod: Arc<Pod>) -> Upstream {
        let path = pod
            .netns
            .name()
            .map(|n| format!("/etc/netns/{n}/resolv.conf"))
            .filter(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "/etc/resolv.conf".into());
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                hickory_resolver::system_conf::parse_resolv_conf(b).map_err(|e| e.to_string())
            });
        let (servers, mut search) = match parsed {
            Ok((cfg, _)) => {
                let search = cfg
                    .search()
                    .iter()
                    .map(|n| n.to_ascii().trim_end_matches('.').to_ascii_lowercase())
                    .collect();
                (cfg.name_servers().to_vec(), search)
            }
            Err(e) => {
                tracing::warn!(pod = %pod.uid, path, error = e, "no usable resolv.conf: names outside the mesh get SERVFAIL");
                (Vec::new(), Vec::new())
            }
        };
        if search.is_empty() {
            search = vec![
                format!("{}.svc.{}", pod.namespace, mesh::CLUSTER_DOMAIN),
                format!("svc.{}", mesh::CLUSTER_DOMAIN),
                mesh::CLUSTER_DOMAIN.to_string(),
            ];
        }
        tracing::debug!(pod = %pod.uid, path, servers = servers.len(), "DNS upstreams");
        let mut opts = ResolverOpts::default();
        // The pod's stub already applied its search list: forward names as asked.
        opts.ndots = 0;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        let provider = PodRuntime {
            pod,
            handle: TokioHandle::default(),
        };
        let mut b =
            Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider);
        *b.options_mut() = opts;
        let resolver = b.build().expect("resolver from parsed config");
        Upstream { resolver, search }
    }

    /// Forwards and rebuilds the answer: records and TTLs as the upstream
    /// gave them, NXDOMAIN/NODATA with their SOA, other error codes as is.
    pub async fn forward(
        &self,
        req: &Message,
        name: Name,
        qtype: RecordType,
    ) -> Result<Message, NetError> {
        match self.resolver.lookup(name, qtype).await {
            Ok(l) => {
                let mut m = answer::response(req, ResponseCode::NoError);
                m.add_answers(l.answers().iter().cloned());
                m.add_authorities(l.authorities().iter().cloned());
                Ok(m)
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
                let mut m = answer::response(req, nr.response_code);
                if let Some(auth) = nr.authorities {
                    m.add_authorities(auth.iter().cloned());
                }
                Ok(m)
            }
            Err(NetError::Dns(DnsError::ResponseCode(code))) => Ok(answer::response(req, code)),
            Err(e) => Err(e),
        }
    }
}
