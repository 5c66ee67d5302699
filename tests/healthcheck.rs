//! `sluice healthcheck` (the image's HEALTHCHECK) against a running sluice: exit 0 while
//! `/readyz` answers 200 (ready, or degraded), exit 1 with the reason on stderr when it answers
//! 503, when nothing listens, when the admin listener is off, and, bounded by `--timeout`,
//! when a listener accepts but never answers.

mod support;

use std::net::SocketAddr;
use std::process::Output;

use support::process::write_config;
use support::*;

/// A config whose admin listener is `admin` (the address a running sluice actually bound),
/// as the healthcheck reads it.
fn config_naming(admin: &str, endpoint: &str) -> std::path::PathBuf {
    let text = format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"{admin}\"\n\n{}",
        service(&[endpoint.to_owned()], "")
    );
    write_config("healthcheck", &text)
}

/// `sluice healthcheck --config PATH ARGS...`, failing the test if it runs past the deadline.
async fn healthcheck(path: &std::path::Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::from(support::process::sluice_bin());
    command
        .arg("healthcheck")
        .arg("--config")
        .arg(path)
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("sluice healthcheck exits within the deadline")
        .expect("run sluice healthcheck")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_while_readyz_answers_200() {
    let endpoint = mock().start().await;
    let sluice = start_sluice(&config(&service(&[endpoint.url()], ""))).await;
    let port = sluice.admin.expect("admin listener").port();
    // The address as configured: a listener on every address is asked on 127.0.0.1, which
    // answers for 0.0.0.0, for a dual-stack [::], and for the 0.0.0.0 it falls back to.
    for admin in [
        format!("127.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
    ] {
        let out = healthcheck(&config_naming(&admin, &endpoint.url()), &[]).await;
        assert_eq!(out.status.code(), Some(0), "{admin}: {}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
    }
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_while_degraded_because_200_degraded_still_serves() {
    // A fleet whose Redis is unreachable, with on_error = "local": /readyz answers 200
    // `degraded` (the replica serves with its share of every limit).
    let endpoint = mock().start().await;
    let redis = DeadPort::new();
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"redis://{}\"\non_error = \"local\"\n\n",
        redis.addr
    );
    let toml = config(&format!("{store}{}", service(&[endpoint.url()], "")));
    let sluice = start_sluice(&toml).await;
    let admin = sluice.admin.expect("admin listener");
    let readyz = once(admin, get(admin, "/readyz")).await;
    assert_eq!(readyz.status, 200, "{}", readyz.text());
    assert_eq!(readyz.json()["status"], "degraded", "{}", readyz.text());

    let out = healthcheck(&config_naming(&admin.to_string(), &endpoint.url()), &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("degraded: store unreachable"),
        "{}",
        describe(&out)
    );
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_with_the_reason_while_draining_on_shutdown() {
    let endpoint = mock().gated().start().await;
    let mut sluice = start_sluice(&config(&service(&[endpoint.url()], ""))).await;
    let admin = sluice.admin.expect("admin listener");
    let addr = sluice.addr;
    let in_flight = tokio::spawn(async move { once(addr, get(addr, "/score")).await });
    endpoint.wait_current(1).await;
    sluice.begin_shutdown();
    // The admin API keeps answering while the proxy drains: /readyz says 503.
    readyz_until(admin, 503).await;

    let out = healthcheck(&config_naming(&admin.to_string(), &endpoint.url()), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("answered 503") && stderr.contains("shutting down"),
        "{}",
        describe(&out)
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));

    endpoint.open_gate();
    let answer = in_flight.await.expect("the request in flight");
    assert_eq!(answer.status, 200, "the drained request is answered");
    sluice.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_when_nothing_listens_or_the_admin_listener_is_off() {
    let nothing = DeadPort::new();
    let out = healthcheck(
        &config_naming(&nothing.addr.to_string(), "http://127.0.0.1:9"),
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "cannot connect to the admin listener at {}",
            nothing.addr
        )),
        "{}",
        describe(&out)
    );

    let out = healthcheck(&config_naming("", "http://127.0.0.1:9"), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin listener is disabled"),
        "{}",
        describe(&out)
    );

    // A config that cannot be read is "not ready" too, not a crash.
    let out = healthcheck(std::path::Path::new("/nonexistent/sluice.toml"), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_after_its_timeout_when_the_listener_never_answers() {
    // Accepts connections and reads nothing: a hung sluice, as a check sees it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let started = tokio::time::Instant::now();
    let out = healthcheck(
        &config_naming(&addr.to_string(), "http://127.0.0.1:9"),
        &["--timeout", "300ms"],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("no answer from {addr}/readyz within 300ms")),
        "{}",
        describe(&out)
    );
    // It gave up on its own timeout, not on the test's deadline.
    assert!(
        took >= std::time::Duration::from_millis(300),
        "exited after {took:?}"
    );
    held.abort();
}
