//! TLS to endpoints: an `https://` endpoint behind a private CA (made here with the `openssl`
//! CLI) is reached when `[upstream] ca_file` names that CA and refused (502, nothing reaches
//! it) without; `sluice check` names the key when the file cannot be used.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use support::process::{check, start_binary_with_env, write_config};
use support::*;

/// A CA and a certificate for 127.0.0.1 it signed, as PEM files in a fresh directory.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn private_pki(name: &str) -> Pki {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sluice-tls")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=sluice test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "endpoint.key", "-out", "endpoint.csr"]);
    openssl(&dir, &csr);
    std::fs::write(
        dir.join("endpoint.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "endpoint.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "endpoint.ext",
            "-out",
            "endpoint.pem",
        ],
    );
    Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("endpoint.pem"),
        key: dir.join("endpoint.key"),
    }
}

/// An HTTPS endpoint on 127.0.0.1 with `pki`'s certificate, answering `secure`; counts the
/// requests that got through the handshake.
async fn https_endpoint(pki: &Pki) -> (SocketAddr, Arc<AtomicUsize>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                // A client that does not trust the CA aborts the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |_req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("secure")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_behind_a_private_ca_is_reached_with_its_ca_file_and_refused_without() {
    let pki = private_pki("endpoint");
    let (endpoint, requests) = https_endpoint(&pki).await;
    let url = format!("https://{endpoint}");

    // Without the CA file, the system's roots do not vouch for the endpoint: 502, and no
    // request reached it.
    let without = start_sluice(&config(&service(std::slice::from_ref(&url), ""))).await;
    let answer = once(without.addr, get(without.addr, "/score")).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(requests.load(Ordering::SeqCst), 0);
    without.stop().await;

    let upstream = format!(
        "[upstream]\nca_file = {:?}\n\n",
        pki.ca.display().to_string()
    );
    let with = start_sluice(&config(&format!("{upstream}{}", service(&[url], "")))).await;
    let answer = once(with.addr, get(with.addr, "/score")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secure");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    with.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systems_roots_are_trusted_as_ssl_cert_file_names_them() {
    // The system's bundle is what `ca-certificates` installs, or what SSL_CERT_FILE names (as
    // for OpenSSL): a CA in it is trusted with no `ca_file`. The roots compiled into the
    // binary knew nothing of this CA.
    let pki = private_pki("system");
    let (endpoint, requests) = https_endpoint(&pki).await;
    let path = write_config(
        "system-roots",
        &config(&service(&[format!("https://{endpoint}")], "")),
    );
    let ca = pki.ca.display().to_string();
    let mut sluice = start_binary_with_env(
        &["run", "--config", path.to_str().unwrap()],
        &[("SSL_CERT_FILE", &ca), ("SSL_CERT_DIR", "/nonexistent")],
    )
    .await;
    let answer = once(sluice.addr, get(sluice.addr, "/score")).await;
    assert_eq!(answer.status, 200, "{}\n{}", answer.text(), sluice.output());
    assert_eq!(answer.text(), "secure");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    sluice.signal("TERM");
    assert_eq!(sluice.wait_exit(DEADLINE).await.code(), Some(0));
}

#[test]
fn check_names_upstream_ca_file_when_it_is_missing_unreadable_or_not_pem() {
    let pki = private_pki("check");
    let dir = pki.ca.parent().unwrap().to_owned();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let cases: [(&Path, &str); 5] = [
        (&dir.join("missing.pem"), "cannot read"),
        (&dir, "cannot read"),
        (&pki.key, "no \"BEGIN CERTIFICATE\" block"),
        (&garbage, "no \"BEGIN CERTIFICATE\" block"),
        (&broken, "certificate 1 cannot be parsed"),
    ];
    for (file, why) in cases {
        let text = format!(
            "[upstream]\nca_file = {:?}\n\n{}",
            file.display().to_string(),
            service(&["https://127.0.0.1:9".to_owned()], "")
        );
        let out = check(&write_config("ca-file", &text));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file:?}: {stderr}");
        assert!(
            stderr.contains("upstream.ca_file: ") && stderr.contains(why),
            "{file:?}: expected {why:?} in: {stderr}"
        );
    }
    let text = format!(
        "[upstream]\nca_file = {:?}\n\n{}",
        pki.ca.display().to_string(),
        service(&["https://127.0.0.1:9".to_owned()], "")
    );
    let out = check(&write_config("ca-file", &text));
    assert!(out.status.success(), "{out:?}");
}
