//! `Secret`: a value that must never reach a log line, such as a group key or a private key
//! (issue 12). Its `Debug` prints `Secret(..)`, it has no `Display`, and the value comes out only
//! through [`Secret::expose`], so every place that reads it is named in the code. On the wire it
//! is the plain value (serde is transparent).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A secret value: redacted in `Debug`, no `Display`, read with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T = String>(T);

impl<T> Secret<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    /// The value itself: only where it is used (sent, written to its private file, parsed).
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value itself, to fill in place (a key read from a file).
    pub fn expose_mut(&mut self) -> &mut T {
        &mut self.0
    }

    /// The value, unwrapped.
    pub fn into_exposed(self) -> T {
        self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

/// For command-line parsers (clap): any text is a secret string.
impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(text.to_owned()))
    }
}

impl<T: Serialize> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret<T>, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const KEY: &str = "5ec2e7b1a9d04c3f8e6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6a";

    #[test]
    fn debug_never_shows_the_value_and_the_wire_carries_it_plain() {
        let secret = Secret::from(KEY);
        assert_eq!(format!("{secret:?}"), "Secret(..)");
        assert_eq!(format!("{secret:#?}"), "Secret(..)");
        assert_eq!(secret.expose(), KEY);
        assert_eq!(serde_json::to_string(&secret).unwrap(), format!("\"{KEY}\""));
        let back: Secret = serde_json::from_str(&format!("\"{KEY}\"")).unwrap();
        assert_eq!(back, secret);
    }
}
