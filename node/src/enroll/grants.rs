//! The grants a signer made, by token: on disk before a certificate is answered, so a token's
//! uses hold across a restart, and read back at start. A token's record goes once it expires.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pki::join_token::JOIN_TOKEN_USES_MAX;

/// The file in the data dir.
pub const GRANTS_FILE: &str = "join-grants.json";

/// Most unexpired tokens one signer keeps a record for: a token is short-lived and a fleet
/// enrolls with few at a time; a signer asked for more refuses until some expire. With
/// [`JOIN_TOKEN_USES_MAX`] grants each the file stays under 3 MB.
pub const GRANTED_TOKENS_MAX: usize = 256;

/// Largest grants file read back at start (see [`GRANTED_TOKENS_MAX`]).
const GRANTS_FILE_BYTES_MAX: u64 = 8 << 20;

/// One host enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Its node id.
    pub node: String,
    /// SHA-256 (hex) of its public key.
    pub key: String,
    /// When (Unix milliseconds).
    pub at_ms: u64,
}

/// The grants under one token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenGrants {
    /// When the token expires: the record goes then.
    pub expires_ms: u64,
    /// The hosts it enrolled here.
    pub grants: Vec<Grant>,
}

/// The record, kept in memory and on disk.
#[derive(Debug)]
pub struct Grants {
    path: PathBuf,
    by_token: BTreeMap<String, TokenGrants>,
}

impl Grants {
    /// Reads the record in `data_dir` (none yet: empty).
    pub fn load(data_dir: &Path) -> Result<Grants, String> {
        let path = data_dir.join(GRANTS_FILE);
        let by_token = match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
            Ok(meta) if meta.len() > GRANTS_FILE_BYTES_MAX => {
                return Err(format!("{} is larger than {GRANTS_FILE_BYTES_MAX} bytes", path.display()));
            }
            Ok(_) => {
                let bytes = std::fs::read(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                serde_json::from_slice(&bytes).map_err(|error| format!("{} does not read: {error}", path.display()))?
            }
        };
        Ok(Grants { path, by_token })
    }

    /// The grants under `token_id`.
    pub fn of(&self, token_id: &str) -> &[Grant] {
        self.by_token.get(token_id).map(|record| record.grants.as_slice()).unwrap_or_default()
    }

    /// Whether a token other than `token_id` enrolled `node` here.
    pub fn granted_elsewhere(&self, node: &str, token_id: &str) -> bool {
        self.by_token
            .iter()
            .filter(|(id, _)| id.as_str() != token_id)
            .any(|(_, record)| record.grants.iter().any(|grant| grant.node == node))
    }

    /// Every unexpired token's grant count, for gossip.
    pub fn counts(&self, now_ms: u64) -> impl Iterator<Item = (&str, usize, u64)> {
        self.by_token
            .iter()
            .filter(move |(_, record)| record.expires_ms > now_ms)
            .map(|(id, record)| (id.as_str(), record.grants.len(), record.expires_ms))
    }

    /// Records `grant` under `token_id` durably; expired records go first. Nothing changes
    /// when it fails.
    pub fn record(&mut self, token_id: &str, expires_ms: u64, grant: Grant, now_ms: u64) -> Result<(), String> {
        let mut next = self.by_token.clone();
        next.retain(|_, record| record.expires_ms > now_ms);
        if !next.contains_key(token_id) && next.len() >= GRANTED_TOKENS_MAX {
            return Err(format!(
                "it holds the grants of {GRANTED_TOKENS_MAX} unexpired tokens; enroll with one of them or wait for some to expire"
            ));
        }
        let record = next.entry(token_id.to_owned()).or_insert_with(|| TokenGrants { expires_ms, grants: Vec::new() });
        if record.grants.len() >= JOIN_TOKEN_USES_MAX as usize {
            return Err(format!("token {token_id} already enrolled {JOIN_TOKEN_USES_MAX} hosts here"));
        }
        record.grants.push(grant);
        let bytes = serde_json::to_vec(&next).map_err(|error| error.to_string())?;
        crate::storage::replace_file::replace_durably(&self.path, &bytes)
            .map_err(|error| format!("cannot write {}: {error}", self.path.display()))?;
        self.by_token = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(node: &str) -> Grant {
        Grant { node: node.to_owned(), key: format!("key-{node}"), at_ms: 1 }
    }

    #[test]
    fn grants_survive_a_restart_and_expired_tokens_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut grants = Grants::load(dir.path()).unwrap();
        grants.record("t1", 100, grant("a"), 10).unwrap();
        grants.record("t1", 100, grant("b"), 10).unwrap();
        grants.record("t2", 50, grant("c"), 10).unwrap();
        let grants_back = Grants::load(dir.path()).unwrap();
        assert_eq!(grants_back.of("t1"), &[grant("a"), grant("b")]);
        assert_eq!(
            grants_back.counts(60).map(|(id, n, _)| (id.to_owned(), n)).collect::<Vec<_>>(),
            [("t1".to_owned(), 2)]
        );
        let mut grants = grants_back;
        grants.record("t3", 200, grant("d"), 60).unwrap();
        assert!(Grants::load(dir.path()).unwrap().of("t2").is_empty(), "expired record dropped on the next write");
    }

    #[test]
    fn a_full_record_refuses_a_new_token_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut grants = Grants::load(dir.path()).unwrap();
        for i in 0..GRANTED_TOKENS_MAX {
            grants.by_token.insert(format!("t{i}"), TokenGrants { expires_ms: 100, grants: vec![grant("x")] });
        }
        let error = grants.record("new", 100, grant("a"), 10).unwrap_err();
        assert!(error.contains("256 unexpired tokens"), "{error}");
        assert!(grants.of("new").is_empty());
        grants.record("new", 100, grant("a"), 100).unwrap();

        std::fs::write(dir.path().join(GRANTS_FILE), b"{not json").unwrap();
        assert!(Grants::load(dir.path()).unwrap_err().contains("does not read"));
    }
}
