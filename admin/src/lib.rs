//! The three small HTTP endpoints every proxy serves: admin (localhost
//! 15000), metrics (15020), readiness (15021).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Reply = (StatusCode, &'static str, String);

/// Serves `route` on `addr` until `drain` flips; each request gets the path.
pub async fn serve<F>(
    addr: SocketAddr,
    route: F,
    drain: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    F: Fn(&str) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let route = Arc::new(route);
    Ok(tokio::spawn(async move {
        let mut drain = drain;
        loop {
            let (s, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                _ = drain.wait_for(|d| *d) => return,
            };
            let route = route.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (status, ctype, body) = route(req.uri().path());
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                        .expect("static response parts");
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    }))
}
