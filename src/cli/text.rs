//! How the client commands put the API's answers into words: counts, rates, times, targets
//! and aligned tables.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use indicatif::HumanBytes;

use crate::api::{MachineState, Target};
use crate::cli::view::{Deployment, Word};

/// "win11 to zone lab, action set_boot".
pub(crate) fn describe(d: &Deployment) -> String {
    format!(
        "{} to {}, action {}",
        d.image_name,
        target_text(&d.target),
        d.action
    )
}

/// "zone lab", "machines pc-01, pc-02", "every machine".
pub(crate) fn target_text(target: &Word<Target, serde_json::Value>) -> String {
    match target {
        Word::Known(Target::Zone(zone)) => format!("zone {zone}"),
        Word::Known(Target::Global(_)) => "every machine".to_owned(),
        Word::Known(Target::Machines(list)) => {
            const SHOWN: usize = 3;
            let ids: Vec<&str> = list.iter().map(|id| id.as_str()).collect();
            let mut text = format!(
                "{} {}",
                if ids.len() == 1 {
                    "machine"
                } else {
                    "machines"
                },
                ids[..ids.len().min(SHOWN)].join(", ")
            );
            if ids.len() > SHOWN {
                text += &format!(" and {} more", ids.len() - SHOWN);
            }
            text
        }
        Word::Unknown(other) => other.to_string(),
    }
}

/// Machine states from the furthest along to the ones that need attention, the order counts
/// are listed in.
const STATE_ORDER: [MachineState; 9] = [
    MachineState::Booted,
    MachineState::Booting,
    MachineState::Staged,
    MachineState::Verifying,
    MachineState::Downloading,
    MachineState::Pending,
    MachineState::Stalled,
    MachineState::Failed,
    MachineState::Cancelled,
];

/// "3 booted, 1 downloading"; `note` may add a remark after a state's count ("(pc-03: disk
/// full)"). States this client does not know come last, by name.
pub(crate) fn counts_text(
    counts: &BTreeMap<Word<MachineState>, u64>,
    note: impl Fn(&Word<MachineState>) -> Option<String>,
) -> String {
    let rank = |state: &Word<MachineState>| {
        STATE_ORDER
            .iter()
            .position(|s| state.is(*s))
            .unwrap_or(STATE_ORDER.len())
    };
    let mut present: Vec<(&Word<MachineState>, u64)> = counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (s, *n))
        .collect();
    present.sort_by_key(|(state, _)| rank(state));
    if present.is_empty() {
        return "no machines".to_owned();
    }
    present
        .iter()
        .map(|(state, n)| match note(state) {
            Some(note) => format!("{n} {state} {note}"),
            None => format!("{n} {state}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "4 machines: 3 booted, 1 downloading".
pub(crate) fn counts_line(counts: &BTreeMap<Word<MachineState>, u64>) -> String {
    let total = counts.values().sum();
    if total == 0 {
        return "no machines".to_owned();
    }
    format!(
        "{}: {}",
        machines_text(total),
        counts_text(counts, |_| None)
    )
}

pub(crate) fn machines_text(n: u64) -> String {
    plural(n, "machine")
}

pub(crate) fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Whole percent, rounded down so that 100% means done; `None` when the size is unknown.
pub(crate) fn percent_text(done: u64, total: u64) -> Option<String> {
    (total > 0).then(|| format!("{}%", u128::from(done.min(total)) * 100 / u128::from(total)))
}

pub(crate) fn rate_text(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "-".to_owned()
    } else {
        format!("{}/s", HumanBytes(bytes_per_sec))
    }
}

/// The time left at the current rate, if there is a rate.
pub(crate) fn eta_text(done: u64, total: u64, bytes_per_sec: u64) -> Option<String> {
    (bytes_per_sec > 0 && total > done).then(|| {
        let secs = (total - done) / bytes_per_sec;
        format!(
            "{} left",
            indicatif::HumanDuration(Duration::from_secs(secs))
        )
    })
}

/// A Unix-millisecond time as RFC 3339 in UTC, to the second.
pub(crate) fn time_text(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms > 0 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        _ => "-".to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    Right,
}

/// Columns two spaces apart, each as wide as its widest cell; no trailing spaces.
pub(crate) fn table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = columns.iter().map(|(name, _)| (*name).to_owned()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            std::iter::once(&header)
                .chain(rows)
                .map(|row| row.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(c, (_, align))| {
                let cell = row.get(c).map_or("", String::as_str);
                let width = widths[c];
                match align {
                    Align::Left => format!("{cell:<width$}"),
                    Align::Right => format!("{cell:>width$}"),
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<Word<MachineState>, u64> {
        pairs.iter().map(|(s, n)| (Word::from(*s), *n)).collect()
    }

    #[test]
    fn counts_go_from_furthest_along_to_trouble() {
        assert_eq!(
            counts_text(&counts(&[("downloading", 1), ("booted", 3)]), |_| None),
            "3 booted, 1 downloading"
        );
        assert_eq!(
            counts_text(
                &counts(&[
                    ("failed", 1),
                    ("pending", 2),
                    ("staged", 1),
                    ("zapped", 1),
                    ("stalled", 1),
                    ("booting", 0)
                ]),
                |_| None
            ),
            "1 staged, 2 pending, 1 stalled, 1 failed, 1 zapped"
        );
        assert_eq!(counts_text(&counts(&[]), |_| None), "no machines");
        assert_eq!(
            counts_text(&counts(&[("failed", 1), ("booted", 1)]), |s| {
                s.is(MachineState::Failed)
                    .then(|| "(pc-03: disk full)".to_owned())
            }),
            "1 booted, 1 failed (pc-03: disk full)"
        );
        assert_eq!(
            counts_line(&counts(&[("booted", 1)])),
            "1 machine: 1 booted"
        );
        assert_eq!(
            counts_line(&counts(&[("booted", 2), ("verifying", 1)])),
            "3 machines: 2 booted, 1 verifying"
        );
    }

    fn target(json: serde_json::Value) -> Word<Target, serde_json::Value> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn targets_read_as_words() {
        assert_eq!(target_text(&target(json!({"zone": "lab"}))), "zone lab");
        assert_eq!(
            target_text(&target(json!({"global": true}))),
            "every machine"
        );
        assert_eq!(
            target_text(&target(json!({"machines": ["pc-01"]}))),
            "machine pc-01"
        );
        assert_eq!(
            target_text(&target(json!({"machines": ["a", "b", "c", "d", "e"]}))),
            "machines a, b, c and 2 more"
        );
        assert_eq!(target_text(&target(json!({"other": 1}))), r#"{"other":1}"#);
    }

    #[test]
    fn percentages_round_down_and_need_a_size() {
        assert_eq!(percent_text(999, 1000).as_deref(), Some("99%"));
        assert_eq!(percent_text(1000, 1000).as_deref(), Some("100%"));
        assert_eq!(percent_text(u64::MAX, u64::MAX).as_deref(), Some("100%"));
        assert_eq!(percent_text(5, 0), None);
        assert_eq!(rate_text(0), "-");
        assert_eq!(rate_text(2048), "2.00 KiB/s");
        assert_eq!(eta_text(0, 100, 0), None);
        assert_eq!(eta_text(0, 120, 1).as_deref(), Some("2 minutes left"));
    }

    #[test]
    fn times_are_utc_to_the_second() {
        assert_eq!(time_text(1_764_028_800_123), "2025-11-25T00:00:00Z");
        assert_eq!(time_text(0), "-");
    }

    #[test]
    fn tables_align_without_trailing_spaces() {
        let rows = vec![
            vec!["pc-01".to_owned(), "5%".to_owned(), "".to_owned()],
            vec!["a".to_owned(), "100%".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            table(
                &[
                    ("ID", Align::Left),
                    ("DONE", Align::Right),
                    ("E", Align::Left)
                ],
                &rows
            ),
            "ID     DONE  E\npc-01    5%\na      100%  x\n"
        );
    }
}
