//! Peers without a certificate from the cluster CA are refused; the socket is private.

use std::os::unix::fs::PermissionsExt;

use crate::harness::{Cluster, Node, eventually, live_nodes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_never_joins() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let c1 = n1.client().await;
    // A rogue node with its own CA, seeded at n1.
    let rogue_base = cluster.dir.path().join("rogue");
    let rogue_ca = rogue_base.join("ca");
    konor_node::pki::ca::init_ca(&rogue_ca).unwrap();
    let rogue_tls = rogue_base.join("tls");
    konor_node::pki::ca::issue_node_cert(&rogue_ca, "rogue", &rogue_tls).unwrap();
    let mut rogue = Node::new("rogue", &rogue_base, rogue_tls, &[&n1]);
    rogue.start();
    let rogue_client = rogue.client().await;
    // A legitimate node seeded at n1 after the rogue: once n1 sees it, the rogue had as much
    // time to join as a real node needs.
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.start();
    let _c2 = n2.client().await;
    eventually("n2 joins n1", || async { live_nodes(&c1).await.contains(&"n2".to_owned()).then_some(()) }).await;
    assert!(!live_nodes(&c1).await.contains(&"rogue".to_owned()), "n1 must never list the rogue node");
    assert_eq!(live_nodes(&rogue_client).await, vec!["rogue".to_owned()], "the rogue sees nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_only_for_its_owner() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let _client = n1.client().await;
    let mode = std::fs::metadata(&n1.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// What `client`'s node says of n2: its state, its address, and its revision of `ev`.
async fn seen_of_n2(client: &konor_sdk::client::Client) -> Option<(String, String, Option<u64>)> {
    use konor_sdk::protocol::{Request, Response};
    let Ok(Response::Nodes { nodes }) = client.call(Request::Nodes).await else { return None };
    let n2 = nodes.into_iter().find(|node| node.id == "n2")?;
    let Ok(Response::Status { nodes, .. }) = client.call(Request::Status { group: "ev".into() }).await else {
        return None;
    };
    let revision = nodes.iter().find(|row| row.node == "n2").map(|row| row.revision);
    Some((n2.state, n2.address, revision))
}

/// Issue 12: a node with a valid certificate from the cluster CA (mallory) learns the mesh as
/// any peer can, then gossips forged state about n2: a newer generation of n2 at its own
/// address, n2's group summary claiming a revision n2 never reached (acks it never gave), n2
/// leaving, n2's genuine summary replayed under a newer version, and n2's heartbeat pushed far
/// ahead. The real n2 stays live at its own address on every other node, its summary stays its
/// own, and the forgeries are refused and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_valid_certificate_cannot_impersonate_another_or_forge_its_acks() {
    use crate::harness::{group_on_all, start_mesh};
    use konor_node::peer::gossip_seal::{BEAT_KEY, CERT_KEY, CertSeal, payload, seal_value};
    use konor_node::peer::gossip_wire::{DigestEntry, KeyValue, Message, NodeDelta, decode, encode};
    use konor_node::peer::transport::{Channel, PeerNetwork, QuicNetwork};
    use std::net::SocketAddr;

    const CLUSTER: &str = konor_node::settings::CLUSTER_DEFAULT;
    const FORGED_REVISION: u64 = 999_999;
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "ev", "eventual").await;
    let n2_addr = nodes[1].addr();
    let before = seen_of_n2(&clients[0]).await.expect("n1 sees n2");
    assert_eq!((before.0.as_str(), before.1.as_str()), ("live", n2_addr.as_str()));

    // Mallory: a certificate from the cluster's own CA.
    let mallory_tls = cluster.dir.path().join("mallory").join("tls");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "mallory", &mallory_tls).unwrap();
    let identity = konor_node::pki::identity::load_identity(&mallory_tls).unwrap();
    let mallory_seal = CertSeal::new(&identity).unwrap();
    let (network, mut inbox) = QuicNetwork::start(&identity, "127.0.0.1:0".parse().unwrap()).unwrap();
    let targets: Vec<(SocketAddr, &str)> =
        [&nodes[0], &nodes[2]].iter().map(|node| (node.addr().parse().unwrap(), node.id.as_str())).collect();

    // Learn n2's state as any peer can: a SYN with an empty digest gets everything back.
    let syn = encode(&Message::Syn { digest: vec![], cluster_id: CLUSTER.into() });
    let learned = tokio::time::timeout(std::time::Duration::from_secs(15), async {
        loop {
            network.send(targets[0].0, Some(targets[0].1), Channel::Gossip, syn.clone());
            let Ok(Some(incoming)) =
                tokio::time::timeout(std::time::Duration::from_millis(300), inbox.gossip.recv()).await
            else {
                continue;
            };
            let Ok(Message::SynAck { delta, .. }) = decode(&incoming.bytes) else { continue };
            // n2's whole state, once its summary of ev has spread to n1.
            let found = delta.into_iter().find(|node| {
                &*node.id.node_id == "n2"
                    && node.from_version_excluded == 0
                    && node.key_values.iter().any(|kv| kv.key == "grp:ev")
            });
            if let Some(n2) = found {
                break n2;
            }
        }
    })
    .await;
    let n2 = learned.expect("n1 answers mallory's SYN with n2's state");
    let version_of = |key: &str| n2.key_values.iter().find(|kv| kv.key == key).cloned();
    let cert = version_of(CERT_KEY).expect("n2 gossips its certificate");
    let summary = version_of("grp:ev").expect("n2 gossips its summary of ev");
    let max_version = n2.key_values.iter().map(|kv| kv.version).max().unwrap_or(0);
    let mut forged_summary: Vec<String> = payload(&summary.value).split(';').map(str::to_owned).collect();
    forged_summary[1] = FORGED_REVISION.to_string();
    let forged_summary = forged_summary.join(";");

    let signed = |id: &chitchat::ChitchatId, key: &str, version: u64, value: &str| KeyValue {
        key: key.to_owned(),
        value: seal_value(&mallory_seal, CLUSTER, id, key, version, value),
        version,
        status: 0,
    };
    // 1. A newer generation of n2 at mallory's address, with n2's certificate copied.
    let taken = chitchat::ChitchatId::new("n2".to_owned(), n2.id.generation_id + 1, network.local_addr());
    let takeover = Message::SynAck {
        digest: vec![DigestEntry { id: taken.clone(), heartbeat: 1_000, last_gc_version: 0, max_version: 4 }],
        delta: vec![NodeDelta {
            id: taken.clone(),
            last_gc_version: 0,
            from_version_excluded: 0,
            key_values: vec![
                signed(&taken, CERT_KEY, 1, payload(&cert.value)),
                signed(&taken, "leaving", 2, "0"),
                signed(&taken, BEAT_KEY, 3, "1000"),
                signed(&taken, "grp:ev", 4, &forged_summary),
            ],
            set_max_version: None,
        }],
    };
    // 2. Forged acks and a leave on the real n2, with its heartbeat pushed far ahead.
    let forged = Message::SynAck {
        digest: vec![DigestEntry {
            id: n2.id.clone(),
            heartbeat: u64::MAX / 4,
            last_gc_version: 0,
            max_version: max_version + 2,
        }],
        delta: vec![NodeDelta {
            id: n2.id.clone(),
            last_gc_version: 0,
            from_version_excluded: max_version,
            key_values: vec![
                signed(&n2.id, "grp:ev", max_version + 1, &forged_summary),
                signed(&n2.id, "leaving", max_version + 2, "1"),
            ],
            set_max_version: None,
        }],
    };
    // 3. n2's genuine summary, signature and all, replayed under a newer version.
    let replayed = Message::Ack {
        delta: vec![NodeDelta {
            id: n2.id.clone(),
            last_gc_version: 0,
            from_version_excluded: max_version + 40,
            key_values: vec![KeyValue { version: max_version + 50, ..summary.clone() }],
            set_max_version: None,
        }],
    };

    // Keep at it for well over the detection bound (800 ms at the tests' 100 ms gossip), and
    // watch what n1 and n3 say of n2 all along.
    let attack_until = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    let mut looks = 0;
    while tokio::time::Instant::now() < attack_until {
        for (addr, id) in &targets {
            for message in [&takeover, &forged, &replayed] {
                network.send(*addr, Some(id), Channel::Gossip, encode(message));
            }
        }
        for client in [&clients[0], &clients[2]] {
            let Some((state, address, revision)) = seen_of_n2(client).await else { continue };
            looks += 1;
            assert_eq!(state, "live", "n2 must stay live");
            assert_eq!(address, n2_addr, "n2 must stay at its own address");
            assert_ne!(revision, Some(FORGED_REVISION), "n2's summary must stay its own (no forged acks)");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(looks > 20, "the nodes answered while under attack ({looks} looks)");
    // The groups go on: a write on n1 is acknowledged by n2 itself.
    let written = clients[0]
        .call(konor_sdk::protocol::Request::Set {
            group: "ev".into(),
            entries: std::collections::BTreeMap::from([("k".to_owned(), serde_json::json!(1))]),
            meta: konor_sdk::protocol::WriteMeta { author: "it".into(), message: String::new(), ..Default::default() },
        })
        .await
        .unwrap();
    assert!(matches!(written, konor_sdk::protocol::Response::Committed { .. }), "{written:?}");
    for node in [&nodes[0], &nodes[2]] {
        let log = std::fs::read_to_string(&node.log).unwrap();
        assert!(log.contains("forged gossip refused"), "{} logs the forgeries", node.id);
        assert!(log.contains("relayed_by=mallory"), "{} names who relayed them", node.id);
    }
    network.close().await;
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Issue 12: a peer with a valid certificate opens as many streams as it may, announces a
/// 65 MiB replica frame on each, sends a little of it and stalls. The node allocates only what
/// arrived, cuts the peer off once a frame stops making progress (a live peer's keep-alives
/// would hold QUIC's idle timeout off for ever), and keeps serving its mesh meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_announces_huge_frames_and_stalls_is_cut_off_without_costing_memory() {
    use crate::harness::start_mesh;
    use konor_node::peer::tls::PEER_STREAMS_MAX;
    use konor_node::peer::transport::FRAME_PROGRESS_TIMEOUT;

    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 2).await;
    let pid = nodes[0].child.as_ref().unwrap().id();
    let rss_before = rss_kib(pid);
    let mallory_tls = cluster.dir.path().join("mallory").join("tls");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "mallory", &mallory_tls).unwrap();
    let identity = konor_node::pki::identity::load_identity(&mallory_tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(konor_node::peer::tls::client_config(&identity).unwrap());
    let n1: std::net::SocketAddr = nodes[0].addr().parse().unwrap();
    let connection =
        endpoint.connect(n1, konor_node::pki::SERVER_NAME).unwrap().await.expect("a valid certificate connects");
    let mut header = b"KNR1".to_vec();
    header.push(2); // the replica channel, whose frames may be 65 MiB
    header.push(7);
    header.extend_from_slice(b"mallory");
    header.extend_from_slice(&1u64.to_be_bytes());
    let announced = konor_crdt::limits::PEER_MESSAGE_BYTES_MAX as u32;
    let sent_each = 512 * 1024;
    let mut streams = Vec::new();
    for _ in 0..PEER_STREAMS_MAX {
        let mut stream = connection.open_uni().await.unwrap();
        stream.write_all(&header).await.unwrap();
        stream.write_all(&announced.to_be_bytes()).await.unwrap();
        stream.write_all(&vec![0u8; sent_each]).await.unwrap();
        streams.push(stream);
    }
    // Then nothing more. The node closes the connection once the frames stall.
    let started = tokio::time::Instant::now();
    let closed = tokio::time::timeout(FRAME_PROGRESS_TIMEOUT * 3, connection.closed()).await;
    assert!(closed.is_ok(), "a stalled peer must be cut off within {FRAME_PROGRESS_TIMEOUT:?} or so");
    assert!(started.elapsed() >= FRAME_PROGRESS_TIMEOUT / 2, "cut off for stalling, not at once");
    let grown_kib = rss_kib(pid).saturating_sub(rss_before);
    // Announced: 8 x 65 MiB. Sent: 8 x 512 KiB. Allowed: what was sent, and room for noise.
    assert!(grown_kib < 32 * 1024, "konord grew by {grown_kib} KiB for frames that never came");
    // The node kept serving: n2 is live on it and a write commits.
    assert_eq!(live_nodes(&clients[0]).await, ["n1", "n2"]);
    drop(streams);
    endpoint.close(0u32.into(), b"");
}

/// Issue 12: a slow loris on the socket. 300 connections that never say Hello must not lock out
/// a client that does: silent connections hold at most a few slots, the oldest making room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_silent_connections_do_not_lock_clients_out() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let _first = n1.client().await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::UnixStream::connect(&n1.socket).await.unwrap());
    }
    // A client arriving after them is served at once, every time.
    for _ in 0..5 {
        let client =
            tokio::time::timeout(std::time::Duration::from_secs(2), konor_sdk::client::Client::connect(&n1.socket))
                .await
                .expect("a client behind 300 silent connections connects in time")
                .expect("a client behind 300 silent connections is served");
        assert_eq!(live_nodes(&client).await, ["n1"]);
    }
    drop(silent);
}

/// Issue 12: a process's apply reports (F16) are live as long as its connection, then history
/// (bounded: `reports::REPORT_HISTORY_MAX` rows a group, unit-tested), and only for groups the
/// node holds: reconnecting clients and made-up group names cannot grow the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_rows_die_with_their_connection_and_need_a_held_group() {
    use crate::harness::{eventually, group_on_all};
    use konor_sdk::protocol::{ApplyResult, ErrorCode, Request, Response};
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;
    let rows = |client: konor_sdk::client::Client| async move {
        match client.call(Request::Status { group: "app".into() }).await {
            Ok(Response::Status { processes, .. }) => Some(processes.iter().filter(|p| p.gone_ms.is_none()).count()),
            _ => None,
        }
    };
    let report = |group: &str| Request::ReportApply {
        group: group.into(),
        version: "v1".into(),
        revision: 1,
        result: ApplyResult::Error { message: "x".repeat(100_000) },
    };
    for _ in 0..5 {
        let reporter = konor_sdk::client::Client::connect(&n1.socket).await.unwrap();
        assert_eq!(reporter.call(report("app")).await.unwrap(), Response::Done);
        assert_eq!(rows(client.clone()).await, Some(1), "the open connection's row is shown");
        let Ok(Response::Status { processes, .. }) = client.call(Request::Status { group: "app".into() }).await else {
            panic!("status")
        };
        let ApplyResult::Error { message } = &processes[0].result else { panic!("{processes:?}") };
        assert!(message.len() <= 1024 + 3, "a report keeps at most 1 KiB of its message, not {}", message.len());
        let refused = reporter.call(report("made-up")).await;
        assert!(
            matches!(refused, Err(konor_sdk::client::SdkError::Daemon { code: ErrorCode::UnknownGroup, .. })),
            "{refused:?}"
        );
        drop(reporter);
        eventually("the row stops being live with its connection", || async {
            (rows(client.clone()).await == Some(0)).then_some(())
        })
        .await;
    }
    let Ok(Response::Status { processes, .. }) = client.call(Request::Status { group: "app".into() }).await else {
        panic!("status")
    };
    assert_eq!(processes.len(), 5, "five rows of history: {processes:?}");
    assert!(processes.iter().all(|p| p.gone_ms.is_some()), "none live: {processes:?}");
}
