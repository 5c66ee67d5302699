//! Idle HTTP/1.1 connections are parked between requests (issue 18): hyper's state is
//! dropped while a keep-alive connection waits, and a new one serves its next request. A
//! client must never notice: over one TCP connection each, with pauses longer than the park
//! delay between requests, every request is answered in full and in order — a plain one, a
//! large answer read slowly, two pipelined in one write, a head split over two writes with a
//! pause between — and the connection stays open.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than sluice's park delay (100 ms): each pause lets the connection be parked.
const PAUSE: Duration = Duration::from_millis(300);

fn get_head(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: sluice.test\r\n\r\n")
}

/// Read from `stream` until `n` complete answers with a `content-length` have arrived; their
/// statuses and bodies' lengths.
async fn answers(stream: &mut TcpStream, n: usize) -> Vec<(u16, usize)> {
    let mut bytes = Vec::new();
    let read = async {
        loop {
            if let Some(parsed) = parse(&bytes, n) {
                return parsed;
            }
            let mut chunk = [0u8; 16 * 1024];
            let got = stream.read(&mut chunk).await.expect("read");
            assert!(
                got > 0,
                "sluice closed the connection: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            bytes.extend_from_slice(&chunk[..got]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the answers arrive")
}

/// `n` answers parsed from the front of `bytes`, if they are all there.
fn parse(mut bytes: &[u8], n: usize) -> Option<Vec<(u16, usize)>> {
    let mut out = Vec::new();
    while out.len() < n {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let status: u16 = head[9..12].parse().expect("a status");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("a length"))
            .expect("a content-length");
        if bytes.len() < end + length {
            return None;
        }
        out.push((status, length));
        bytes = &bytes[end + length..];
    }
    Some(out)
}

#[tokio::test]
async fn a_parked_connection_serves_every_later_request_on_the_same_socket() {
    let big = Bytes::from(vec![b'x'; 4 << 20]);
    let endpoint = mock()
        .reply(move |r| match r.uri.as_str() {
            "/big" => Reply::ok(big.clone()),
            _ => Reply::ok("ok"),
        })
        .start()
        .await;
    let sluice = start_sluice(&config(&service(&[endpoint.url()], ""))).await;
    let mut stream = TcpStream::connect(sluice.addr).await.unwrap();

    stream.write_all(get_head("/a").as_bytes()).await.unwrap();
    assert_eq!(answers(&mut stream, 1).await, [(200, 2)]);

    // Parked, then a plain request.
    tokio::time::sleep(PAUSE).await;
    stream.write_all(get_head("/b").as_bytes()).await.unwrap();
    assert_eq!(answers(&mut stream, 1).await, [(200, 2)]);

    // Parked, then a 4 MiB answer read slowly: it arrives whole (the connection is not parked
    // before the answer has left).
    tokio::time::sleep(PAUSE).await;
    stream.write_all(get_head("/big").as_bytes()).await.unwrap();
    tokio::time::sleep(PAUSE).await;
    assert_eq!(answers(&mut stream, 1).await, [(200, 4 << 20)]);

    // Parked, then two requests in one write.
    tokio::time::sleep(PAUSE).await;
    let two = format!("{}{}", get_head("/c"), get_head("/d"));
    stream.write_all(two.as_bytes()).await.unwrap();
    assert_eq!(answers(&mut stream, 2).await, [(200, 2), (200, 2)]);

    // Parked, then a head in two writes with a pause between.
    tokio::time::sleep(PAUSE).await;
    let head = get_head("/e");
    let (first, rest) = head.split_at(10);
    stream.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(PAUSE).await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(answers(&mut stream, 1).await, [(200, 2)]);

    let seen: Vec<String> = endpoint.received().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(seen, ["/a", "/b", "/big", "/c", "/d", "/e"]);
    sluice.stop().await;
}
