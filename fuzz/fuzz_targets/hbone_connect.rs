//! The HBONE server (15008 after TLS) on arbitrary HTTP/2 from the peer: the
//! client preface is prepended so the fuzzer spends its time in frames and
//! CONNECT requests (authority, headers). Malformed input is refused; nothing
//! panics or hangs.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    });
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (_tx, drain) = tokio::sync::watch::channel(false);
        let input = [PREFACE, data].concat();
        let writer = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let serve = hbone::serve(server, drain, |inbound: hbone::Inbound| async move {
            if inbound.authority.port() % 2 == 0 {
                let _ = inbound.accept();
            } else {
                inbound.refuse(http::StatusCode::FORBIDDEN);
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::join!(writer, serve)
        })
        .await;
    });
});
