//! konor-node: the I/O shell around konor-crdt (the daemon `konord` and the CLI `konorctl`).
pub mod api;
pub mod audit;
pub mod ctl;
pub mod daemon;
pub mod enroll;
pub mod fault_layer;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod peer;
pub mod pki;
pub mod reports;
pub mod settings;
pub mod storage;
pub mod wall_clock;

/// Issue 12: no secret reaches `Debug` (and so no log line): formats every structure that holds
/// a group key or private key material and looks for the secret's bytes in the text.
#[cfg(test)]
mod secret_redaction_tests {
    use clap::Parser;
    use konor_sdk::protocol::Request;

    use crate::api::socket::{ClientInfo, LocalCall};
    use crate::ctl::cli::Cli;
    use crate::peer::gossip_seal;
    use crate::pki;

    const GROUP_KEY: &str = "5ec2e7b1a9d04c3f8e6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";

    /// Fails if `text` holds `secret` or a 16-character run of it (a base64 or hex fragment).
    fn assert_redacted(what: &str, text: &str, secret: &str) {
        let secret: Vec<char> = secret.chars().filter(|c| !c.is_whitespace()).collect();
        for window in secret.windows(16) {
            let fragment: String = window.iter().collect();
            assert!(!text.contains(&fragment), "{what} shows secret bytes {fragment:?}: {text}");
        }
    }

    /// The base64 body of a PEM file, without its header lines.
    fn pem_body(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).unwrap().lines().filter(|line| !line.starts_with("-----")).collect()
    }

    #[test]
    fn structures_holding_keys_format_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        pki::ca::init_ca(&ca).unwrap();
        pki::ca::issue_node_cert(&ca, "n1", &dir.path().join("n1")).unwrap();
        let node_key = pem_body(&dir.path().join("n1").join(pki::NODE_KEY_FILE));
        let identity = pki::identity::load_identity(&dir.path().join("n1")).unwrap();
        assert_redacted("TlsIdentity", &format!("{identity:?} {identity:#?}"), &node_key);
        let seal = gossip_seal::CertSeal::new(&identity).unwrap();
        assert_redacted("CertSeal", &format!("{seal:?} {seal:#?}"), &node_key);

        let mut store = crate::storage::store::Store::open(&dir.path().join("data"), "n1").unwrap();
        store.write_group_key("app", &GROUP_KEY.into()).unwrap();
        let read = store.read_group_key("app").unwrap();
        assert_redacted("a group key read from its file", &format!("{read:?}"), GROUP_KEY);

        let (reply, _answer) = tokio::sync::oneshot::channel();
        let client = ClientInfo { connection: 1, pid: 1, process: "app".into(), uid: None, user: None, reveal: true };
        let call = LocalCall::Request {
            client,
            request: Request::GroupJoin { name: "app".into(), key: GROUP_KEY.into() },
            reply,
        };
        assert_redacted("LocalCall", &format!("{call:?}"), GROUP_KEY);

        // A join token on its way to the daemon (the HTTP door's enrollment).
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let ask = crate::enroll::EnrollAsk {
            token: GROUP_KEY.into(),
            node: None,
            public_key: String::new(),
            proof: String::new(),
        };
        let call = LocalCall::Enroll { ask, remote: "127.0.0.1:1".parse().unwrap(), reply };
        assert_redacted("LocalCall::Enroll", &format!("{call:?}"), GROUP_KEY);

        // A key given on the command line is refused, and not echoed by the parsed command.
        for subcommand in ["join", "create"] {
            let mut argv = vec!["konorctl", "group", subcommand, "app", "--key", GROUP_KEY];
            if subcommand == "create" {
                argv.extend(["--mode", "eventual"]);
            }
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_redacted("konorctl's parsed command line", &format!("{cli:?}"), GROUP_KEY);
        }
    }
}
