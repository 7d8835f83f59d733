//! Setting keys and group names: validated dotted paths with documented limits.
//!
//! A key is one or more segments joined by `.` (`db.pool.max_size`). Each segment is 1 to
//! [`KEY_SEGMENT_BYTES_MAX`] bytes of ASCII letters, digits, `_` or `-`. Keys are stored flat:
//! the dots are part of the key, nesting is only a reading of it (for files and snapshots).

use std::fmt;

use crate::error::KeyError;
use crate::limits::{GROUP_NAME_BYTES_MAX, KEY_BYTES_MAX, KEY_SEGMENT_BYTES_MAX, KEY_SEGMENTS_MAX};

/// A validated setting key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Validates `text` as a key.
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        validate_key(text)?;
        Ok(Key(text.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Takes the text back.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn is_segment_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// Checks `text` against the key rules without allocating.
pub fn validate_key(text: &str) -> Result<(), KeyError> {
    let key = || text.chars().take(KEY_BYTES_MAX).collect::<String>();
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if text.len() > KEY_BYTES_MAX {
        return Err(KeyError::TooLong { key: key(), bytes: text.len(), max: KEY_BYTES_MAX });
    }
    let mut segments = 0usize;
    for segment in text.split('.') {
        segments += 1;
        if segment.is_empty() {
            return Err(KeyError::EmptySegment { key: key() });
        }
        if segment.len() > KEY_SEGMENT_BYTES_MAX {
            return Err(KeyError::SegmentTooLong {
                key: key(),
                segment: segment.to_owned(),
                max: KEY_SEGMENT_BYTES_MAX,
            });
        }
        if let Some(bad) = segment.chars().find(|c| !c.is_ascii() || !is_segment_byte(*c as u8)) {
            return Err(KeyError::BadCharacter { key: key(), character: bad });
        }
    }
    if segments > KEY_SEGMENTS_MAX {
        return Err(KeyError::TooDeep { key: key(), segments, max: KEY_SEGMENTS_MAX });
    }
    Ok(())
}

/// Checks a group name: 1 to [`GROUP_NAME_BYTES_MAX`] bytes of ASCII letters, digits, `_` or
/// `-`, starting with a letter or digit. Names appear in file names and gossip keys.
pub fn validate_group_name(name: &str) -> Result<(), KeyError> {
    let first_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX || !first_ok {
        return Err(KeyError::BadGroupName { name: name.chars().take(80).collect() });
    }
    if let Some(bad) = name.chars().find(|c| !c.is_ascii() || !is_segment_byte(*c as u8)) {
        return Err(KeyError::BadGroupName { name: format!("{name} (character {bad:?})") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn accepts_dotted_paths() {
        for ok in ["a", "db.pool.max_size", "feature-flags.new_checkout", "x1.2.y"] {
            assert!(Key::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_keys_with_clear_text() {
        let messages: Vec<String> = [
            "",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a/b",
            "ключ",
            &"x".repeat(65),
            &["a"; 17].join("."),
            &["abcdefgh"; 40].join("."),
        ]
        .iter()
        .map(|k| Key::parse(k).err().map(|e| e.to_string()).unwrap_or_default())
        .collect();
        expect![[r#"
            [
                "invalid key: a key may not be empty",
                "invalid key \"a..b\": empty segment (keys look like \"db.pool.size\")",
                "invalid key \".a\": empty segment (keys look like \"db.pool.size\")",
                "invalid key \"a.\": empty segment (keys look like \"db.pool.size\")",
                "invalid key \"a b\": character ' ' not allowed (use letters, digits, '_' or '-' between dots)",
                "invalid key \"a/b\": character '/' not allowed (use letters, digits, '_' or '-' between dots)",
                "invalid key \"ключ\": character 'к' not allowed (use letters, digits, '_' or '-' between dots)",
                "invalid key \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\": segment \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\" is longer than 64 bytes",
                "invalid key \"a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a\": 17 segments, at most 16 allowed",
                "invalid key: 359 bytes, at most 256 allowed",
            ]
        "#]]
        .assert_debug_eq(&messages);
    }

    #[test]
    fn group_names_are_short_and_plain() {
        assert!(validate_group_name("checkout").is_ok());
        assert!(validate_group_name("payments-eu_1").is_ok());
        for bad in ["", "-x", "a b", "a.b", &"g".repeat(65)] {
            assert!(validate_group_name(bad).is_err(), "{bad}");
        }
    }
}
