//! Values exactly as written (issue 12), through a real konord and the real socket: floats come
//! back bit for bit, integers past 64 bits and repeated keys are refused, and `get` tells a key
//! set to `null` from a key that is not set.

use std::collections::BTreeMap;

use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Cluster, group_on_all};

fn set(entries: &[(&str, Value)]) -> Request {
    Request::Set {
        group: "app".into(),
        entries: entries.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<BTreeMap<_, _>>(),
        meta: WriteMeta { author: "it".into(), message: String::new(), ..WriteMeta::default() },
    }
}

/// Sends one raw frame (after Hello) and returns the answer's text.
async fn raw_call(socket: &std::path::Path, payload: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    for frame in [r#"{"id":1,"request":{"type":"hello","protocol":1,"pid":1,"process":"raw"}}"#, payload] {
        stream.write_all(&(frame.len() as u32).to_be_bytes()).await.unwrap();
        stream.write_all(frame.as_bytes()).await.unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..2 {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.unwrap();
        let mut bytes = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut bytes).await.unwrap();
        answers.push(String::from_utf8(bytes).unwrap());
    }
    answers.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_come_back_exactly_as_written() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;

    let float: f64 = "95535577795.73523".parse().unwrap();
    let written = client
        .call(set(&[("f", json!(float)), ("n", Value::Null), ("big", json!(u64::MAX)), ("neg", json!(i64::MIN))]))
        .await
        .unwrap();
    assert!(matches!(written, Response::Committed { .. }), "{written:?}");
    let back = client.get("app", "f").await.unwrap().unwrap();
    assert_eq!(back.as_f64().unwrap().to_bits(), float.to_bits(), "the float comes back bit for bit: {back}");
    assert_eq!(back.to_string(), "95535577795.73523");
    assert_eq!(client.get("app", "big").await.unwrap(), Some(json!(u64::MAX)));
    assert_eq!(client.get("app", "neg").await.unwrap(), Some(json!(i64::MIN)));
    // null is a value; an unset key is not.
    assert_eq!(client.get("app", "n").await.unwrap(), Some(Value::Null));
    assert_eq!(client.get("app", "unset").await.unwrap(), None);

    // What the SDK never sends, a hand-written client might: refused, with the reason.
    let too_big = raw_call(
        &n1.socket,
        r#"{"id":2,"request":{"type":"set","group":"app","entries":{"id":12345678901234567890123},"meta":{"author":"it","message":""}}}"#,
    )
    .await;
    assert!(too_big.contains("bad_request") && too_big.contains("does not fit in 64 bits"), "{too_big}");
    let twice = raw_call(
        &n1.socket,
        r#"{"id":2,"request":{"type":"set","group":"app","entries":{"k":1,"k":2},"meta":{"author":"it","message":""}}}"#,
    )
    .await;
    assert!(twice.contains("bad_request") && twice.contains("given twice"), "{twice}");
    assert_eq!(client.get("app", "id").await.unwrap(), None, "nothing of a refused write is applied");
    assert_eq!(client.get("app", "k").await.unwrap(), None, "nothing of a refused write is applied");
}

/// The content hash a real konord serves is the one docs/protocol.md defines (its example
/// snapshot, also a golden vector in sdk/spec/content_hash.json), and the SDK computes the same
/// from the settings it received. A double without a fraction is served as its canonical text
/// reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_content_hash_is_the_documented_one() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;

    let empty = client.snapshot("app").await.unwrap();
    assert_eq!(empty.content_hash, "ee007d05d10bcf5b45eb4ddd26f8ee9487d0e4cbea5071e5d291ce5160663d27");
    let written = client.call(set(&[("db.pool", json!(20.0)), ("feature.beta", json!(true))])).await.unwrap();
    let Response::Committed { content_hash, .. } = written else { panic!("{written:?}") };
    let snapshot = client.snapshot("app").await.unwrap();
    assert_eq!(snapshot.content_hash, "1501894d75f799ec6b913a4b8017e889a2800b03b782f797cdfc646c1bfd8252");
    assert_eq!(content_hash, snapshot.content_hash[..12], "the committed version records it");
    assert_eq!(konor_sdk::protocol::content_hash(&snapshot.settings), snapshot.content_hash);
    assert_eq!(serde_json::to_string(&snapshot.settings).unwrap(), r#"{"db.pool":20,"feature.beta":true}"#);
}
