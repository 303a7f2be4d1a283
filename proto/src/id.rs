//! Validated identifiers for machines, zones, images, deployments and envelope senders.
//!
//! Every id that reaches a topic, the store or a log line is one of these newtypes, so the
//! rule `[A-Za-z0-9._-]{1,64}` is checked once, where the id enters (a config file, the HTTP
//! API, a topic, a message body), and nowhere else. The rule keeps ids safe to splice into an
//! MQTT topic (no `/`, `+` or `#`), a file name or a URL path without escaping.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, de};

/// The longest id accepted, in bytes (ids are ASCII, so also in characters).
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("id is empty; ids must match [A-Za-z0-9._-]{{1,64}}")]
    Empty,
    /// The string is longer than [`MAX_ID_LEN`].
    #[error("id is {len} bytes long; ids must match [A-Za-z0-9._-]{{1,64}}")]
    TooLong {
        /// Length of the rejected string in bytes.
        len: usize,
    },
    /// The string holds a character outside `[A-Za-z0-9._-]`.
    #[error("id has {ch:?} at index {index}; ids must match [A-Za-z0-9._-]{{1,64}}")]
    BadChar {
        /// The first offending character.
        ch: char,
        /// Its position; every character before it is ASCII, so this is both the byte and
        /// the character index.
        index: usize,
    },
}

/// Checks `s` against the id rule `[A-Za-z0-9._-]{1,64}`.
///
/// The length is checked before the characters so that a huge hostile string is refused
/// without being scanned.
pub fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    match s.char_indices().find(|&(_, ch)| !is_id_char(ch)) {
        Some((index, ch)) => Err(IdError::BadChar { ch, index }),
        None => Ok(()),
    }
}

fn is_id_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')
}

/// Defines a validated id newtype; `$what` names the id in error messages.
macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        ///
        /// Holds a string matching `[A-Za-z0-9._-]{1,64}`; construct it with
        /// [`FromStr`], [`TryFrom`] or by deserializing, all of which validate.
        /// It serializes as a plain string.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                validate_id(s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(s: String) -> Result<Self, IdError> {
                validate_id(&s)?;
                Ok(Self(s))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;

            fn try_from(s: &str) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Sound because Eq, Ord and Hash are derived from the single `String` field, so
        // they agree with `str`'s; lets maps keyed by id be queried with a `&str`.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct IdVisitor;

                impl de::Visitor<'_> for IdVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a ", $what, " matching [A-Za-z0-9._-]{1,64}"))
                    }

                    // Validating the borrowed string before copying it means a rejected
                    // id costs no allocation.
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse()
                            .map_err(|e: IdError| E::custom(format_args!("invalid {}: {e}", $what)))
                    }
                }

                deserializer.deserialize_str(IdVisitor)
            }
        }
    };
}

id_type!(
    /// Identifies one lab machine (one agent). Appears in event and command topics.
    MachineId,
    "machine id"
);
id_type!(
    /// Identifies a zone: a named group of machines that commands can address at once.
    ZoneId,
    "zone id"
);
id_type!(
    /// Identifies a catalogued disk image.
    ImageId,
    "image id"
);
id_type!(
    /// Identifies one deployment: an image pushed to a target with an action.
    DeploymentId,
    "deployment id"
);
id_type!(
    /// Names the signer of an envelope: a machine id for events, [`SenderId::server()`]
    /// for commands. Replay state is kept per sender.
    SenderId,
    "sender id"
);

/// The sender id the server signs commands with.
pub const SERVER_SENDER: &str = "server";

impl SenderId {
    /// The reserved sender id `"server"`, used by the server when it signs commands.
    pub fn server() -> Self {
        Self(SERVER_SENDER.to_owned())
    }

    /// Whether this is the server's sender id.
    pub fn is_server(&self) -> bool {
        self.0 == SERVER_SENDER
    }
}

// An agent signs its events as itself; the id rule is the same, so no check is needed.
impl From<MachineId> for SenderId {
    fn from(machine: MachineId) -> Self {
        Self(machine.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let id: MachineId = "AZaz09._-".parse().unwrap();
        assert_eq!(id.as_str(), "AZaz09._-");
        assert_eq!(id.to_string(), "AZaz09._-");
        assert_eq!(MachineId::try_from("a").unwrap().as_ref(), "a");
    }

    #[test]
    fn length_limit_is_64() {
        let ok = "a".repeat(64);
        assert_eq!(ImageId::try_from(ok.clone()).unwrap().as_str(), ok);
        assert_eq!(
            ImageId::try_from("a".repeat(65)),
            Err(IdError::TooLong { len: 65 })
        );
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(ZoneId::from_str(""), Err(IdError::Empty));
    }

    #[test]
    fn rejects_topic_separators_and_wildcards() {
        assert_eq!(
            MachineId::from_str("a/b"),
            Err(IdError::BadChar { ch: '/', index: 1 })
        );
        assert_eq!(
            MachineId::from_str("+"),
            Err(IdError::BadChar { ch: '+', index: 0 })
        );
        assert_eq!(
            MachineId::from_str("ab#"),
            Err(IdError::BadChar { ch: '#', index: 2 })
        );
        assert_eq!(
            MachineId::from_str("a b"),
            Err(IdError::BadChar { ch: ' ', index: 1 })
        );
    }

    #[test]
    fn rejects_unicode() {
        assert_eq!(
            MachineId::from_str("pcé"),
            Err(IdError::BadChar { ch: 'é', index: 2 })
        );
        // 32 two-byte characters are 64 bytes: within the length limit, so the character
        // check is what rejects them.
        let wide = "é".repeat(32);
        assert_eq!(
            MachineId::from_str(&wide),
            Err(IdError::BadChar { ch: 'é', index: 0 })
        );
        // 33 of them are 66 bytes: the length check comes first.
        let wider = "é".repeat(33);
        assert_eq!(
            MachineId::from_str(&wider),
            Err(IdError::TooLong { len: 66 })
        );
    }

    #[test]
    fn error_messages_quote_the_rule() {
        let msg = IdError::BadChar { ch: '/', index: 3 }.to_string();
        assert!(msg.contains("'/'") && msg.contains("index 3"), "{msg}");
        assert!(msg.contains("[A-Za-z0-9._-]{1,64}"), "{msg}");
        assert!(IdError::Empty.to_string().contains("[A-Za-z0-9._-]{1,64}"));
        assert!(IdError::TooLong { len: 70 }.to_string().contains("70"));
    }

    #[test]
    fn serde_is_a_plain_string_and_validates() {
        let id: DeploymentId = "dep-1".parse().unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"dep-1\"");
        assert_eq!(
            serde_json::from_str::<DeploymentId>("\"dep-1\"").unwrap(),
            id
        );
        let err = serde_json::from_str::<DeploymentId>("\"dep/1\"").unwrap_err();
        assert!(err.to_string().contains("invalid deployment id"), "{err}");
        assert!(serde_json::from_str::<DeploymentId>("\"\"").is_err());
        assert!(serde_json::from_str::<DeploymentId>("7").is_err());
    }

    #[test]
    fn sender_ids() {
        assert_eq!(SenderId::server().as_str(), "server");
        assert!(SenderId::server().is_server());
        let machine: MachineId = "pc-01".parse().unwrap();
        let sender = SenderId::from(machine);
        assert_eq!(sender.as_str(), "pc-01");
        assert!(!sender.is_server());
    }

    #[test]
    fn borrow_allows_str_lookups() {
        let mut set = std::collections::HashSet::new();
        set.insert(MachineId::from_str("pc-01").unwrap());
        assert!(set.contains("pc-01"));
    }
}
