//! A token that never appears in logs or `Debug` output: the enrollment and admin tokens, on the
//! server and in the agent's config.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string. `Debug` prints `Secret(..)`; only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token.
    pub fn new(token: String) -> Self {
        Secret(token)
    }

    /// The token itself, for a login, a comparison, or writing it where the operator asked.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_token() {
        let s = Secret::new("hunter2-hunter2-hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret(..)");
        assert_eq!(s.expose(), "hunter2-hunter2-hunter2");
    }
}
