//! The API's answers as the client commands read them.
//!
//! States, actions and targets are the server's own types from [`crate::api`], so client and
//! server cannot disagree on a word. What the client reads is still lenient: a field it does
//! not know is ignored, a missing one takes its default, and a word it does not know (a newer
//! server's state, say) is kept as [`Word::Unknown`] and shown as sent, so that an older client
//! keeps working against a newer server.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use boottorrent_proto::Persistence;

use crate::api::{
    Action, ImageStatus, KeyState, MachineOutcome, MachineState, OverallState, Target, ZoneSource,
};

/// One of the API's words (a state, an action, a target) as read: one this client knows, or
/// what a newer server sent instead, kept to be shown.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(untagged)]
pub(crate) enum Word<T, Raw = String> {
    Known(T),
    Unknown(Raw),
}

impl<T: PartialEq, Raw> Word<T, Raw> {
    /// Whether it is the known word `word`.
    pub(crate) fn is(&self, word: T) -> bool {
        matches!(self, Word::Known(known) if *known == word)
    }
}

impl<T, Raw: Default> Default for Word<T, Raw> {
    fn default() -> Self {
        Word::Unknown(Raw::default())
    }
}

/// As the API spells it: `set_boot`, `downloading`, `{"zone":"lab"}`.
impl<T: Serialize, Raw: fmt::Display> fmt::Display for Word<T, Raw> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Word::Known(known) => match serde_json::to_value(known) {
                Ok(Value::String(word)) => f.write_str(&word),
                Ok(other) => write!(f, "{other}"),
                Err(_) => f.write_str("?"),
            },
            Word::Unknown(raw) => raw.fmt(f),
        }
    }
}

/// Reads a word as the API would send it; for tests and for words typed by an operator.
impl<T: for<'de> Deserialize<'de>> From<&str> for Word<T> {
    fn from(word: &str) -> Self {
        serde_json::from_value(Value::String(word.to_owned()))
            .map_or_else(|_| Word::Unknown(word.to_owned()), Word::Known)
    }
}

/// A deployment (`Deployment` in docs/api.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Deployment {
    pub id: String,
    pub image: String,
    pub image_name: String,
    pub target: Word<Target, Value>,
    pub action: Word<Action>,
    /// `None` from a server that predates the choice (which kept every child).
    pub persistence: Option<Word<Persistence>>,
    pub created_ms: i64,
    pub state: Word<OverallState>,
    pub counts: BTreeMap<Word<MachineState>, u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub download_bps: u64,
    pub machines: Vec<MachineProgress>,
    /// The server's JSON as received, for `--json`.
    #[serde(skip)]
    pub raw: Value,
}

/// Where one machine of a deployment stands (`MachineProgress` in the API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct MachineProgress {
    pub id: String,
    pub state: Word<MachineState>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub download_bps: u64,
    pub error: Option<String>,
    pub updated_ms: i64,
    pub transitions: Vec<Transition>,
    /// What the machine ran at its last startup.
    pub running: Option<Running>,
}

/// The image a machine runs (`running` in the API); `None` where it is shown means none
/// BootTorrent booted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct Running {
    pub image: String,
    pub deployment: Option<String>,
}

/// "win11 (d-1)", "win11", or "-" for no image BootTorrent booted.
pub(crate) fn running_text(running: Option<&Running>) -> String {
    match running {
        Some(Running {
            image,
            deployment: Some(d),
        }) => format!("{image} ({d})"),
        Some(r) => r.image.clone(),
        None => "-".into(),
    }
}

/// One state change of one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct Transition {
    pub state: Word<MachineState>,
    pub at_ms: i64,
}

impl MachineProgress {
    /// The download rate, if it is downloading: agents' last report lingers after they stop,
    /// and the API's total counts only machines that download.
    pub(crate) fn current_download_bps(&self) -> u64 {
        if self.state.is(MachineState::Downloading) {
            self.download_bps
        } else {
            0
        }
    }
}

impl Deployment {
    pub(crate) fn from_json(raw: Value) -> anyhow::Result<Deployment> {
        let mut deployment = Deployment::deserialize(&raw)
            .context("the server's deployment does not have the shape of docs/api.md")?;
        deployment.raw = raw;
        Ok(deployment)
    }

    /// Whether it reached an end: nothing more will happen to it.
    pub(crate) fn is_finished(&self) -> bool {
        matches!(
            self.state,
            Word::Known(OverallState::Completed | OverallState::Failed | OverallState::Cancelled)
        )
    }

    /// How many machines are in each state: counted from `machines` where the API gave them,
    /// so that the numbers agree with the per-machine lines printed next to them.
    pub(crate) fn state_counts(&self) -> BTreeMap<Word<MachineState>, u64> {
        if self.machines.is_empty() {
            return self.counts.clone();
        }
        let mut counts = BTreeMap::new();
        for m in &self.machines {
            *counts.entry(m.state.clone()).or_default() += 1;
        }
        counts
    }
}

/// A zone and its members (`Zone` in docs/api.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Zone {
    pub id: String,
    pub machines: Vec<String>,
    pub subnets: Vec<String>,
    pub images: Vec<String>,
    pub source: Word<ZoneSource>,
    pub members: Vec<String>,
}

/// A machine (`GET /api/v1/machines`), the fields the commands show.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Machine {
    pub id: String,
    pub online: bool,
    pub key_state: Word<KeyState>,
    pub last_seen: String,
    pub hostname: String,
    pub images: Vec<Value>,
    pub zones: Vec<String>,
    /// The image it runs now.
    pub running: Option<Running>,
    /// The fingerprint of the key that waits for approval, if one does.
    pub pending_fingerprint: Option<String>,
}

/// The answer to approving or deleting a machine.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct MachineChange {
    pub outcome: Word<MachineOutcome>,
    pub fingerprint: Option<String>,
}

/// An entry of the machines' event log (`GET /api/v1/log`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LogEntry {
    pub at: String,
    pub machine: Option<String>,
    pub kind: String,
    pub detail: String,
}

/// A catalogued image (`GET /api/v1/images`), the fields the commands show.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Image {
    pub id: String,
    pub name: String,
    pub state: Word<ImageStatus>,
    pub size: u64,
    pub info_hash: Option<String>,
    pub peers: u64,
    pub error: Option<String>,
    pub same_as: Option<String>,
    /// Bytes hashed so far by an import.
    pub import_done: u64,
}

/// Reads an answer of the server into the type the command expects, saying which answer did
/// not fit when it does not.
pub(crate) fn read<T: for<'de> Deserialize<'de>>(answer: &Value, what: &str) -> anyhow::Result<T> {
    T::deserialize(answer)
        .with_context(|| format!("the server's {what} does not have the shape of docs/api.md"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn known_words_are_typed_and_unknown_ones_kept() {
        let d = Deployment::from_json(json!({
            "id": "d-1", "state": "running", "action": "set_boot", "future_field": [1, 2],
            "target": {"zone": "lab"},
            "counts": {"pending": 1, "zapped": 2},
            "machines": [{"id": "pc-01", "state": "hibernating", "extra": true}]
        }))
        .unwrap();
        assert!(d.state.is(OverallState::Running));
        assert!(d.action.is(Action::SetBoot));
        assert!(matches!(d.target, Word::Known(Target::Zone(_))));
        assert_eq!(d.counts[&Word::Known(MachineState::Pending)], 1);
        assert_eq!(d.counts[&Word::Unknown("zapped".into())], 2);
        assert_eq!(d.machines[0].state, Word::Unknown("hibernating".into()));
        assert_eq!(d.machines[0].state.to_string(), "hibernating");
        assert_eq!(d.action.to_string(), "set_boot");
        assert_eq!(d.raw["future_field"], json!([1, 2]));

        let odd = Deployment::from_json(json!({"target": {"building": "B"}})).unwrap();
        assert_eq!(odd.target.to_string(), r#"{"building":"B"}"#);
        assert_eq!(
            Word::<MachineState>::from("booted"),
            Word::Known(MachineState::Booted)
        );
    }

    #[test]
    fn unknown_words_sort_after_known_ones() {
        let mut words: Vec<Word<MachineState>> = vec!["zapped".into(), "failed".into()];
        words.sort();
        assert_eq!(words[0], Word::Known(MachineState::Failed));
    }

    #[test]
    fn deployments_parse_leniently() {
        let d = Deployment::from_json(json!({
            "id": "d-1", "state": "running", "action": "stage", "future_field": [1, 2],
            "machines": [{"id": "pc-01", "state": "pending", "extra": true}]
        }))
        .unwrap();
        assert_eq!(d.machines[0].id, "pc-01");
        assert_eq!(d.raw["future_field"], json!([1, 2]));
        assert!(!d.is_finished());
        assert_eq!(
            d.state_counts(),
            BTreeMap::from([(Word::Known(MachineState::Pending), 1)])
        );
    }
}
