//! Enrollment with join tokens on real konords (issue 17, item 1): a host with no certificate
//! starts with `--join` and a token file, gets its certificate from a signer while another
//! signer is down, joins the mesh and serves a group; hosts with an expired, forged,
//! another cluster's, used-up token or a taken node id are refused, write no credentials and
//! never join; every outcome is counted in the signer's `/metrics`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use konor_node::pki::join_token::{TokenPolicy, mint};
use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::json;

use crate::harness::{Cluster, Node, eventually, group_on_all, konorctl, live_nodes, start_mesh_with};

/// A joining host (not started): no certificate, its token in a file, the signers' HTTP API
/// addresses to enroll through.
fn joiner(cluster: &Cluster, id: &str, token: &str, join: &[String]) -> Node {
    let base = cluster.dir.path().join(format!("join-{id}"));
    std::fs::create_dir_all(&base).unwrap();
    let token_file = base.join("token");
    std::fs::write(&token_file, token).unwrap();
    let mut node = Node::new(id, &base, base.join("tls"), &[]);
    for addr in join {
        node.extra_args.extend(["--join".to_owned(), addr.clone()]);
    }
    node.extra_args.extend(["--token-file".to_owned(), token_file.display().to_string()]);
    node
}

/// Starts `node` and waits for konord to give up: its exit code and its log.
async fn refused(node: &mut Node) -> (Option<i32>, String) {
    node.start();
    let mut child = node.child.take().unwrap();
    let status = eventually("the refused host's konord exits", || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(!node.tls_dir.join("node.crt").exists(), "a refused host holds no certificate");
    assert!(!node.tls_dir.join("node.key").exists(), "a refused host keeps no key");
    (status.code(), std::fs::read_to_string(&node.log).unwrap())
}

/// The signer's `/metrics` (open without a certificate), read as a client checking the CA.
async fn metrics(http_addr: &str, ca_dir: &Path) -> String {
    let ca = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    let ca: rustls_pki_types::CertificateDer<'static> = rustls_pki_types::pem::PemObject::from_pem_slice(&ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(konor_node::pki::SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("/metrics").header("host", http_addr).body(Empty::<Bytes>::new()).unwrap();
    let answer = sender.send_request(request).await.unwrap();
    String::from_utf8(answer.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn count(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("konord_enrollments_total{{outcome=\"{outcome}\"}} ");
    let line = metrics.lines().find(|line| line.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}: {metrics}"));
    line[prefix.len()..].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_enrolls_with_a_token_while_a_signer_is_down_and_bad_tokens_are_refused() {
    let cluster = Cluster::new();
    // n1 and n2 hold the CA key and serve their HTTP APIs; n3 is a plain member.
    let (mut nodes, clients) = start_mesh_with(&cluster, 3, |node| {
        if node.id != "n3" {
            konor_node::pki::ca::delegate_signing(&cluster.ca_dir, &node.tls_dir).unwrap();
            node.http = true;
        }
    })
    .await;
    let key = group_on_all(&clients, "app", "eventual").await;
    let http_addr = |node: &Node| node.http_endpoint().trim_start_matches("https://").to_owned();
    let (n1_http, n2_http) = (http_addr(&nodes[0]), http_addr(&nodes[1]));

    // A token from konorctl, into a 0600 file; the labels it gives win over the host's.
    let token_file = cluster.dir.path().join("web.token");
    let ca_dir = cluster.ca_dir.to_str().unwrap();
    let created = konorctl(&[
        "token",
        "create",
        "--ca-dir",
        ca_dir,
        "--ttl",
        "10m",
        "--uses",
        "2",
        "--label",
        "role=web",
        "--out",
        token_file.to_str().unwrap(),
    ]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();

    // n1 is down: the host tries it, then enrolls through n2.
    nodes[0].stop();
    let mut web1 = joiner(&cluster, "web1", &token, &[n1_http.clone(), n2_http.clone()]);
    web1.extra_args.extend(["--label".to_owned(), "role=db".to_owned(), "--label".to_owned(), "zone=a".to_owned()]);
    web1.start();
    let web1_client = web1.client().await;
    let enrollment: serde_json::Value =
        serde_json::from_slice(&std::fs::read(web1.data_dir.join("enrollment.json")).unwrap()).unwrap();
    assert_eq!(enrollment["signer"], "n2");
    assert_eq!(enrollment["labels"], json!({"role": "web"}));
    eventually("n2 and n3 see web1 live", || async {
        let (n2, n3) = (live_nodes(&clients[1]).await, live_nodes(&clients[2]).await);
        (n2.contains(&"web1".to_owned()) && n3.contains(&"web1".to_owned())).then_some(())
    })
    .await;

    // web1 joins the group and serves what n2 writes.
    let joined = web1_client.call(Request::GroupJoin { name: "app".into(), key: key.clone() }).await.unwrap();
    assert!(matches!(joined, Response::Joined { .. }), "{joined:?}");
    let set = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([("port".to_owned(), json!(8080))]),
        meta: WriteMeta { author: "it".into(), message: "m".into(), ..WriteMeta::default() },
    };
    assert!(matches!(clients[1].call(set).await.unwrap(), Response::Committed { .. }));
    eventually("web1 serves the value n2 wrote", || {
        let client = &web1_client;
        async move {
            match client.call(Request::Get { group: "app".into(), key: "port".into() }).await.ok()? {
                Response::Value { value: Some(value), .. } if value == json!(8080) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    // Restarted with the same flags (the token file gone), it runs on what it enrolled with.
    std::fs::remove_file(web1.data_dir.parent().unwrap().join("token")).unwrap();
    web1.stop();
    web1.start();
    web1.client().await;

    // The refusals, each on a fresh host through n2.
    let signer = konor_node::pki::ca::Signer::load(&cluster.ca_dir).unwrap().unwrap();
    let now_ms = konor_node::wall_clock::unix_millis();
    let policy = TokenPolicy { ttl: Duration::from_secs(600), uses: 1, ..TokenPolicy::default() };
    let (_, expired) = mint(
        signer.ca_cert(),
        &signer.token_key(),
        &TokenPolicy { ttl: Duration::from_secs(60), ..policy.clone() },
        now_ms - 3_600_000,
    )
    .unwrap();
    // The uses raised in the claims, the MAC kept.
    let (_, honest) = mint(signer.ca_cert(), &signer.token_key(), &policy, now_ms).unwrap();
    let parts: Vec<&str> = honest.expose().split('.').collect();
    let mut claims = konor_node::pki::join_token::read_claims(honest.expose()).unwrap();
    claims.uses = 100;
    use base64::Engine;
    let altered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let forged = format!("{}.{altered}.{}", parts[0], parts[2]);
    let other_ca = tempfile::tempdir().unwrap();
    konor_node::pki::ca::init_ca(other_ca.path()).unwrap();
    let other = konor_node::pki::ca::Signer::load(other_ca.path()).unwrap().unwrap();
    let (_, foreign) = mint(other.ca_cert(), &other.token_key(), &policy, now_ms).unwrap();

    let cases = [
        ("late", expired.expose().clone(), "token_expired"),
        ("forger", forged, "token_forged"),
        ("stranger", foreign.expose().clone(), "another cluster"),
        // A member's id, with a good token.
        ("n3", token.clone(), "node_id"),
    ];
    for (id, text, expected) in &cases {
        let mut host = joiner(&cluster, id, text, std::slice::from_ref(&n2_http));
        let (code, log) = refused(&mut host).await;
        assert_eq!(code, Some(2), "{id}: {log}");
        assert!(log.contains(expected), "{id}: expected {expected:?} in: {log}");
    }
    // The token's second use, then none left.
    let mut web2 = joiner(&cluster, "web2", &token, std::slice::from_ref(&n2_http));
    web2.start();
    web2.client().await;
    let mut web3 = joiner(&cluster, "web3", &token, std::slice::from_ref(&n2_http));
    let (code, log) = refused(&mut web3).await;
    assert_eq!(code, Some(2));
    assert!(log.contains("token_used_up"), "{log}");

    // Every outcome counted at the signer; the wrong-cluster host never reached it (its TLS
    // check failed before it sent the token).
    let text = metrics(&n2_http, &cluster.ca_dir).await;
    let counted: Vec<(&str, u64)> =
        ["issued", "token_expired", "token_forged", "wrong_cluster", "node_id", "token_used_up"]
            .into_iter()
            .map(|outcome| (outcome, count(&text, outcome)))
            .collect();
    assert_eq!(
        counted,
        [
            ("issued", 2),
            ("token_expired", 1),
            ("token_forged", 1),
            ("wrong_cluster", 0),
            ("node_id", 1),
            ("token_used_up", 1)
        ]
    );
    // The refused hosts never joined.
    let live = live_nodes(&clients[2]).await;
    for (id, _, _) in &cases[..3] {
        assert!(!live.contains(&id.to_string()), "{id} in {live:?}");
    }
}

/// A member of the cluster posing as a signer: its certificate passes the host's TLS check
/// (same CA), and it answers the challenge with a signature by its own node key. The host must
/// not send it the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_posing_as_a_signer_never_receives_the_token() {
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicBool, Ordering};

    let cluster = Cluster::new();
    let member = cluster.dir.path().join("member");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "member", &member).unwrap();
    let identity = konor_node::pki::identity::load_identity(&member).unwrap();
    let tls = konor_node::api::http::server_config(&identity).unwrap();
    let node_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(member.join("node.key")).unwrap()).unwrap();
    let node_key = Arc::new(node_key);
    let own_cert: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&std::fs::read(member.join("node.crt")).unwrap()).unwrap();
    let token_seen = Arc::new(AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = token_seen.clone();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(stream) = acceptor.accept(tcp).await else { continue };
            let (node_key, own_cert, seen) = (node_key.clone(), own_cert.clone(), seen.clone());
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (node_key, own_cert, seen) = (node_key.clone(), own_cert.clone(), seen.clone());
                async move {
                    let path = request.uri().path().to_owned();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let answer = if path == konor_node::enroll::CHALLENGE_ROUTE {
                        use base64::Engine;
                        let asked: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let b64 = base64::engine::general_purpose::STANDARD;
                        let nonce = b64.decode(asked["nonce"].as_str().unwrap()).unwrap();
                        let message = konor_node::enroll::signer_proof_message(&nonce, own_cert.as_ref());
                        let signature = rcgen::SigningKey::sign(node_key.as_ref(), &message).unwrap();
                        json!({"type": "signer_proof", "signature": b64.encode(signature)})
                    } else {
                        seen.store(true, Ordering::SeqCst);
                        json!({"type": "error", "code": "internal", "message": "stolen"})
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(Bytes::from(
                        answer.to_string(),
                    ))))
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });

    let signer = konor_node::pki::ca::Signer::load(&cluster.ca_dir).unwrap().unwrap();
    let policy = TokenPolicy { ttl: Duration::from_secs(600), uses: 1, ..TokenPolicy::default() };
    let (_, token) =
        mint(signer.ca_cert(), &signer.token_key(), &policy, konor_node::wall_clock::unix_millis()).unwrap();
    let host = cluster.dir.path().join("host");
    let error = konor_node::enroll::client::enroll(
        std::slice::from_ref(&addr),
        &token,
        Some("host"),
        None,
        &host.join("tls"),
        &host.join("data"),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("does not prove it holds the CA key"), "{error}");
    assert!(!token_seen.load(Ordering::SeqCst), "the token reached a node that is not a signer");
    assert!(!host.join("tls").join("node.crt").exists());
}
