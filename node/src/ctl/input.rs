//! What a person hands `konorctl`: `KEY=VALUE` assignments and config files, checked before
//! anything is sent to konord.

use std::io::Read;
use std::path::Path;

use konor_crdt::FileFormat;
use konor_crdt::limits::CONFIG_FILE_BYTES_MAX;
use konor_crdt::value::parse_cli_value;
use serde_json::Value;

/// One `KEY=VALUE` from the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Everything before the first `=`.
    pub key: String,
    /// Everything after it, parsed as JSON when it is JSON, else the text as a string.
    pub value: Value,
}

/// Parses `KEY=VALUE`, splitting at the first `=` so values may contain `=`; `KEY=` sets the
/// empty string. The key itself is checked by konord, which knows the rules.
pub fn parse_assignment(text: &str) -> Result<Assignment, String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("expected KEY=VALUE, got `{text}` (to set an empty string, write `{text}=`)"));
    };
    if key.is_empty() {
        return Err(format!("the key before `=` is empty in `{text}`"));
    }
    let value = parse_cli_value(value).map_err(|refused| format!("{key}: {refused}"))?;
    Ok(Assignment { key: key.to_owned(), value })
}

/// A config file that cannot be sent; nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be opened or read.
    #[error("cannot read {origin}: {source}")]
    Read {
        /// The file's path, or "stdin".
        origin: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is over [`CONFIG_FILE_BYTES_MAX`].
    #[error(
        "{origin} holds more than {max} bytes, the limit for a config file; split the settings into several groups"
    )]
    TooLarge {
        /// The file's path, or "stdin".
        origin: String,
        /// The limit.
        max: usize,
    },
    /// The file is not UTF-8 text.
    #[error("{origin} is not UTF-8 text; config files must be TOML, YAML or JSON in UTF-8")]
    NotText {
        /// The file's path, or "stdin".
        origin: String,
    },
    /// Neither the name nor `--format` tells the file's syntax.
    #[error("cannot tell the format of {origin} from its name: pass --format toml, yaml or json")]
    UnknownFormat {
        /// The file's path, or "stdin".
        origin: String,
    },
}

/// A config file read into memory, with the syntax it is written in.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigInput {
    /// The file's text.
    pub text: String,
    /// Its syntax.
    pub format: FileFormat,
}

/// Reads the config file at `path` (`-`: stdin) for `apply`. An explicit `--format` wins over the
/// file name's extension; one of the two must say what the syntax is. The size is checked
/// against [`CONFIG_FILE_BYTES_MAX`] before reading the whole file.
pub fn read_config(path: &str, format: Option<FileFormat>) -> Result<ConfigInput, InputError> {
    let from_stdin = path == "-";
    let origin = if from_stdin { "stdin".to_owned() } else { path.to_owned() };
    // Checked before reading, so a typo in --format does not cost a read of a large file.
    let format = match format.or_else(|| if from_stdin { None } else { FileFormat::from_path(path) }) {
        Some(format) => format,
        None => return Err(InputError::UnknownFormat { origin }),
    };
    let text = if from_stdin {
        read_limited(std::io::stdin().lock(), &origin, CONFIG_FILE_BYTES_MAX)?
    } else {
        let file = std::fs::File::open(Path::new(path))
            .map_err(|source| InputError::Read { origin: origin.clone(), source })?;
        let bytes = file.metadata().map_err(|source| InputError::Read { origin: origin.clone(), source })?.len();
        if bytes > CONFIG_FILE_BYTES_MAX as u64 {
            return Err(InputError::TooLarge { origin, max: CONFIG_FILE_BYTES_MAX });
        }
        // Read through the limit as well: the file may grow, or be a pipe that reports no size.
        read_limited(file, &origin, CONFIG_FILE_BYTES_MAX)?
    };
    Ok(ConfigInput { text, format })
}

/// Reads a secret value from stdin for `set --secret`: its text less one trailing newline (as
/// `echo` and editors leave), as a string, or parsed as JSON with `json`. At most a value's
/// limit of text is read.
pub fn read_secret_value(json: bool) -> anyhow::Result<Value> {
    use std::io::IsTerminal as _;
    let stdin = std::io::stdin();
    let text = if stdin.is_terminal() {
        read_from_terminal(&stdin)?
    } else {
        read_limited(stdin.lock(), "stdin", konor_crdt::limits::VALUE_BYTES_MAX).map_err(|error| match error {
            InputError::TooLarge { max, .. } => {
                anyhow::anyhow!("stdin holds more than {max} bytes, the limit for a value")
            }
            other => other.into(),
        })?
    };
    secret_value(text, json)
}

/// One line typed at the terminal, not echoed (a secret on the screen is a secret shown).
fn read_from_terminal(stdin: &std::io::Stdin) -> anyhow::Result<String> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    /// Puts the terminal's settings back however the read ends.
    struct Restore(rustix::termios::Termios);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.0);
            eprintln!();
        }
    }
    let saved = tcgetattr(stdin).map_err(|error| anyhow::anyhow!("cannot read the terminal's settings: {error}"))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    eprint!("secret value (not shown): ");
    tcsetattr(stdin, OptionalActions::Now, &quiet)
        .map_err(|error| anyhow::anyhow!("cannot turn the terminal's echo off: {error}"))?;
    let _restore = Restore(saved);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdin.lock().take(konor_crdt::limits::VALUE_BYTES_MAX as u64 + 1), &mut line)?;
    if line.len() > konor_crdt::limits::VALUE_BYTES_MAX {
        anyhow::bail!("the value is more than {} bytes, the limit for a value", konor_crdt::limits::VALUE_BYTES_MAX);
    }
    Ok(line)
}

/// The value of a secret's text (see [`read_secret_value`]).
fn secret_value(mut text: String, json: bool) -> anyhow::Result<Value> {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        // Most likely nothing was piped in (`< /dev/null`, a script's empty variable): never
        // store that as the secret.
        anyhow::bail!(
            "stdin gave an empty value; pipe the secret in (konorctl set GROUP --secret KEY < file), or give \
             --json-value and '\"\"' for an empty string"
        );
    }
    if !json {
        return Ok(Value::String(text));
    }
    // Never quote the text back: it is a secret.
    konor_crdt::json_strict::parse(&text)
        .map_err(|_| anyhow::anyhow!("the value read is not valid JSON (drop --json-value to store it as a string)"))
}

/// Reads at most `max` bytes of UTF-8 text; more than that is an error, found after reading only
/// one byte past the limit.
pub fn read_limited(reader: impl Read, origin: &str, max: usize) -> Result<String, InputError> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|source| InputError::Read { origin: origin.to_owned(), source })?;
    if bytes.len() > max {
        return Err(InputError::TooLarge { origin: origin.to_owned(), max });
    }
    String::from_utf8(bytes).map_err(|_| InputError::NotText { origin: origin.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_secret_is_its_text_less_one_newline_and_bad_json_is_not_quoted_back() {
        assert_eq!(secret_value("hunter2\n".into(), false).unwrap(), json!("hunter2"));
        assert_eq!(secret_value("a b\r\n\n".into(), false).unwrap(), json!("a b\r\n"));
        assert_eq!(secret_value("8080".into(), false).unwrap(), json!("8080"), "a string unless asked");
        assert_eq!(secret_value("{\"k\": 1}\n".into(), true).unwrap(), json!({"k": 1}));
        let error = secret_value("hunter2".into(), true).unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        for empty in ["", "\n"] {
            assert!(secret_value(empty.into(), false).unwrap_err().to_string().contains("empty value"));
        }
        assert_eq!(secret_value("\"\"\n".into(), true).unwrap(), json!(""), "asked for, on purpose");
    }

    #[test]
    fn value_may_contain_equals_signs() {
        let assignment = parse_assignment("db.url=postgres://h/db?sslmode=require").unwrap();
        assert_eq!(assignment.key, "db.url");
        assert_eq!(assignment.value, json!("postgres://h/db?sslmode=require"));
    }

    #[test]
    fn empty_value_is_the_empty_string() {
        assert_eq!(parse_assignment("name=").unwrap(), Assignment { key: "name".into(), value: json!("") });
    }

    #[test]
    fn values_are_json_when_they_parse_as_json() {
        assert_eq!(parse_assignment("port=8080").unwrap().value, json!(8080));
        assert_eq!(parse_assignment("on=true").unwrap().value, json!(true));
        assert_eq!(parse_assignment("hosts=[\"a\",\"b\"]").unwrap().value, json!(["a", "b"]));
        assert_eq!(parse_assignment("quoted=\"8080\"").unwrap().value, json!("8080"));
        assert_eq!(parse_assignment("region=eu-west").unwrap().value, json!("eu-west"));
    }

    #[test]
    fn rejects_assignment_without_equals_sign() {
        expect_test::expect!["expected KEY=VALUE, got `db.pool` (to set an empty string, write `db.pool=`)"]
            .assert_eq(&parse_assignment("db.pool").unwrap_err());
    }

    #[test]
    fn rejects_assignment_with_empty_key() {
        expect_test::expect!["the key before `=` is empty in `=5`"].assert_eq(&parse_assignment("=5").unwrap_err());
    }

    #[test]
    fn reads_up_to_the_limit_and_refuses_one_byte_more() {
        assert_eq!(read_limited(&b"a = 1"[..], "f.toml", 5).unwrap(), "a = 1");
        let error = read_limited(&b"a = 10"[..], "f.toml", 5).unwrap_err();
        expect_test::expect![
            "f.toml holds more than 5 bytes, the limit for a config file; split the settings into several groups"
        ]
        .assert_eq(&error.to_string());
        assert!(matches!(read_limited(&b"\xff\xfe"[..], "f.toml", 5), Err(InputError::NotText { .. })));
    }

    #[test]
    fn format_comes_from_the_flag_then_the_extension() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("app.yml");
        std::fs::write(&path, "a: 1\n").unwrap();
        let path = path.to_str().unwrap();
        assert_eq!(read_config(path, None).unwrap().format, FileFormat::Yaml);
        assert_eq!(read_config(path, Some(FileFormat::Json)).unwrap().format, FileFormat::Json);
        let plain = directory.path().join("app.conf");
        std::fs::write(&plain, "a = 1\n").unwrap();
        let error = read_config(plain.to_str().unwrap(), None).unwrap_err();
        assert!(matches!(error, InputError::UnknownFormat { .. }), "{error:?}");
        assert!(matches!(read_config("-", None), Err(InputError::UnknownFormat { .. })));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let error = read_config("/nonexistent/app.toml", None).unwrap_err();
        assert!(error.to_string().starts_with("cannot read /nonexistent/app.toml: "), "{error}");
    }
}
