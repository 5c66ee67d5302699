//! The default proxy listener (`[listen] proxy`'s default, `[::]`) is dual-stack: IPv6 and
//! IPv4 clients both reach it.

mod support;

use std::net::SocketAddr;

use sluice::config::DEFAULT_PROXY_LISTEN;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_proxy_listener_answers_on_ipv6_and_ipv4_loopback() {
    // The default address, on an ephemeral port so the test cannot collide with anything.
    let mut default: SocketAddr = DEFAULT_PROXY_LISTEN.parse().unwrap();
    default.set_port(0);
    let endpoint = mock().start().await;
    let toml = format!(
        "[listen]\nproxy = \"{default}\"\nadmin = \"\"\n\n{}",
        service(&[endpoint.url()], "")
    );
    let sluice = start_sluice(&toml).await;
    let port = sluice.addr.port();

    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let answer = once(v4, get(v4, "/score")).await;
    assert_eq!(answer.status, 200, "over IPv4: {}", answer.text());

    // The IPv6 half needs a host with ::1 (a container may have no IPv6 at all).
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED the IPv6 half: this host has no ::1");
    } else {
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let answer = once(v6, get(v6, "/score")).await;
        assert_eq!(answer.status, 200, "over IPv6: {}", answer.text());
        assert_eq!(endpoint.requests(), 2);
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_the_dual_stack_listener_is_seen_as_its_ipv4_address() {
    // The kernel hands sluice `::ffff:127.0.0.1`: the endpoint must see `127.0.0.1` in
    // X-Forwarded-For, and the admin API (on `[::]` too) must count it as loopback.
    let endpoint = mock().start().await;
    let toml = format!(
        "[listen]\nproxy = \"[::]:0\"\nadmin = \"[::]:0\"\n\n{}",
        service(&[endpoint.url()], "")
    );
    let sluice = start_sluice(&toml).await;
    let v4 = SocketAddr::from(([127, 0, 0, 1], sluice.addr.port()));
    let answer = once(v4, get(v4, "/score")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let received = endpoint.received();
    assert_eq!(
        received[0].header("x-forwarded-for"),
        Some("127.0.0.1"),
        "{:?}",
        received[0]
    );

    let admin = SocketAddr::from(([127, 0, 0, 1], sluice.admin.expect("admin").port()));
    let capacity = once(admin, get(admin, "/admin/capacity")).await;
    assert_eq!(
        capacity.status,
        200,
        "a loopback client without a token reads the admin API: {}",
        capacity.text()
    );
    sluice.stop().await;
}
