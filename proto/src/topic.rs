//! The four MQTT topic forms and their strict parser.
//!
//! ```text
//! boottorrent/cmd/global/{type}
//! boottorrent/cmd/zone/{zoneId}/{type}
//! boottorrent/cmd/machine/{machineId}/{type}
//! boottorrent/evt/machine/{machineId}/{type}
//! ```
//!
//! The topic says what the payload is (its kind) and whom it concerns, so message bodies
//! carry neither; the envelope signature covers the topic string, which stops a valid
//! message from being replayed under another topic.

use std::fmt;
use std::str::FromStr;

use crate::id::{IdError, MachineId, ZoneId};

/// First segment of every BootTorrent topic.
pub const TOPIC_PREFIX: &str = "boottorrent";

/// Filter matching every event topic; the server subscribes to it.
pub const EVENTS_FILTER: &str = "boottorrent/evt/#";

/// Filter matching broadcast commands; every agent subscribes to it.
pub const GLOBAL_COMMANDS_FILTER: &str = "boottorrent/cmd/global/#";

/// Filter matching the commands addressed to one machine: `boottorrent/cmd/machine/{id}/#`.
pub fn machine_commands_filter(machine: &MachineId) -> String {
    format!("{TOPIC_PREFIX}/cmd/machine/{machine}/#")
}

/// Filter matching the commands addressed to one zone: `boottorrent/cmd/zone/{id}/#`.
pub fn zone_commands_filter(zone: &ZoneId) -> String {
    format!("{TOPIC_PREFIX}/cmd/zone/{zone}/#")
}

/// Which segment of a topic held an invalid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSegment {
    /// The `{zoneId}` of a zone command.
    Zone,
    /// The `{machineId}` of a machine command or an event.
    Machine,
}

impl fmt::Display for IdSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdSegment::Zone => "zone id",
            IdSegment::Machine => "machine id",
        })
    }
}

/// Why a string is not a BootTorrent topic (or a kind name is unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic is the empty string.
    #[error("topic is empty")]
    Empty,
    /// The first segment is not `boottorrent`.
    #[error("topic must start with \"boottorrent/\", found first segment {found:?}")]
    Prefix {
        /// The first segment as found.
        found: String,
    },
    /// The topic has too few or too many `/`-separated segments for its form.
    #[error("topic has {found} segments where its form has {expected}")]
    SegmentCount {
        /// Segments the form calls for (4 for global commands, else 5; 4 when the form
        /// could not be told because the topic ends too early).
        expected: usize,
        /// Segments found.
        found: usize,
    },
    /// The second segment is neither `cmd` nor `evt`.
    #[error("topic direction must be \"cmd\" or \"evt\", found {found:?}")]
    Direction {
        /// The second segment as found.
        found: String,
    },
    /// The scope segment is unknown for the direction: commands have `global`, `zone` or
    /// `machine`; events only `machine`.
    #[error("unknown topic scope {found:?}")]
    Scope {
        /// The scope segment as found.
        found: String,
    },
    /// The zone or machine id segment breaks the id rule.
    #[error("topic {segment} is invalid: {source}")]
    Id {
        /// Which segment held the id.
        segment: IdSegment,
        /// What is wrong with it.
        source: IdError,
    },
    /// The last segment names no known command or event kind.
    #[error("unknown message kind {found:?}")]
    UnknownKind {
        /// The kind segment as found.
        found: String,
    },
}

/// Defines a message-kind enum with its wire names.
macro_rules! kind_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every kind, in declaration order.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The kind's name as it appears in the last topic segment.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire),+
                }
            }
        }

        impl FromStr for $name {
            type Err = TopicError;

            fn from_str(s: &str) -> Result<Self, TopicError> {
                match s {
                    $($wire => Ok(Self::$variant),)+
                    _ => Err(TopicError::UnknownKind { found: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

kind_enum!(
    /// What a command topic carries; the last segment of `boottorrent/cmd/...`.
    CommandKind {
        /// Download an image (`artifact_assignment`).
        ArtifactAssignment => "artifact_assignment",
        /// Drop an image (`artifact_unassignment`).
        ArtifactUnassignment => "artifact_unassignment",
        /// The machine's configuration (`machine_configuration`).
        MachineConfiguration => "machine_configuration",
        /// Boot an image (`boot`).
        Boot => "boot",
        /// Reboot the machine (`reboot`).
        Reboot => "reboot",
    }
);

kind_enum!(
    /// What an event topic carries; the last segment of `boottorrent/evt/machine/{id}/...`.
    EventKind {
        /// The agent started (`startup`).
        Startup => "startup",
        /// Periodic liveness and images held (`heartbeat`).
        Heartbeat => "heartbeat",
        /// Download progress of one image (`progress`).
        Progress => "progress",
        /// Online or offline; retained, and the last will (`status`).
        Status => "status",
        /// Result of a boot action (`boot`).
        Boot => "boot",
        /// Something failed (`error`).
        Error => "error",
        /// The agent is stopping (`shutdown`).
        Shutdown => "shutdown",
    }
);

/// Whom a command is addressed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every machine.
    Global,
    /// Every machine in a zone.
    Zone(ZoneId),
    /// One machine.
    Machine(MachineId),
}

/// A parsed BootTorrent topic.
///
/// Parsing is strict (exact segment counts, validated ids, known kinds) and formatting is
/// canonical, so `t.to_string().parse() == Ok(t)` for every topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A command from the server: `boottorrent/cmd/...`.
    Command {
        /// Whom it is for.
        scope: Scope,
        /// What it is.
        kind: CommandKind,
    },
    /// An event from a machine: `boottorrent/evt/machine/{machine}/{kind}`.
    Event {
        /// The machine that sends it.
        machine: MachineId,
        /// What it is.
        kind: EventKind,
    },
}

impl Topic {
    /// The topic a machine publishes `kind` events on.
    pub fn event(machine: MachineId, kind: EventKind) -> Self {
        Topic::Event { machine, kind }
    }

    /// The topic the server publishes `kind` commands for `scope` on.
    pub fn command(scope: Scope, kind: CommandKind) -> Self {
        Topic::Command { scope, kind }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Command {
                scope: Scope::Global,
                kind,
            } => {
                write!(f, "{TOPIC_PREFIX}/cmd/global/{kind}")
            }
            Topic::Command {
                scope: Scope::Zone(zone),
                kind,
            } => {
                write!(f, "{TOPIC_PREFIX}/cmd/zone/{zone}/{kind}")
            }
            Topic::Command {
                scope: Scope::Machine(machine),
                kind,
            } => {
                write!(f, "{TOPIC_PREFIX}/cmd/machine/{machine}/{kind}")
            }
            Topic::Event { machine, kind } => {
                write!(f, "{TOPIC_PREFIX}/evt/machine/{machine}/{kind}")
            }
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        // No valid topic has more than 5 segments; splitting at most 6 ways keeps a hostile
        // topic of thousands of `/` from being collected, while still telling 5 from more.
        let mut parts = s.splitn(6, '/');
        let mut segments: [&str; 6] = [""; 6];
        let mut count = 0;
        for (slot, part) in segments.iter_mut().zip(&mut parts) {
            *slot = part;
            count += 1;
        }
        let [prefix, direction, scope, ..] = segments;
        // Only reached when the count is wrong; counting every segment is then worth it
        // for an accurate message.
        let wrong_count = |expected: usize| TopicError::SegmentCount {
            expected,
            found: s.split('/').count(),
        };

        if prefix != TOPIC_PREFIX {
            return Err(TopicError::Prefix {
                found: prefix.to_owned(),
            });
        }
        if count < 2 {
            return Err(wrong_count(4));
        }
        let is_command = match direction {
            "cmd" => true,
            "evt" => false,
            other => {
                return Err(TopicError::Direction {
                    found: other.to_owned(),
                });
            }
        };
        if count < 3 {
            return Err(wrong_count(4));
        }
        let expected = match (is_command, scope) {
            (true, "global") => 4,
            (true, "zone" | "machine") | (false, "machine") => 5,
            _ => {
                return Err(TopicError::Scope {
                    found: scope.to_owned(),
                });
            }
        };
        if count != expected {
            return Err(wrong_count(expected));
        }
        let kind = segments[expected - 1];
        let id = segments[3];
        let machine_id = || {
            MachineId::from_str(id).map_err(|source| TopicError::Id {
                segment: IdSegment::Machine,
                source,
            })
        };

        if !is_command {
            return Ok(Topic::Event {
                machine: machine_id()?,
                kind: kind.parse()?,
            });
        }
        let scope = match scope {
            "global" => Scope::Global,
            "zone" => Scope::Zone(ZoneId::from_str(id).map_err(|source| TopicError::Id {
                segment: IdSegment::Zone,
                source,
            })?),
            _ => Scope::Machine(machine_id()?),
        };
        Ok(Topic::Command {
            scope,
            kind: kind.parse()?,
        })
    }
}

/// Whether a machine's login may subscribe to `filter`: the commands meant for every
/// machine, for one zone (any zone: what a zone is deployed is not secret), and its own, with
/// every level up to the scope spelled out so that no wildcard reaches past it. Everything
/// else, `#` and `boottorrent/evt/...` above all, would let the holder of the enrollment token
/// (every golden image carries it) read the whole fleet.
///
/// The embedded broker enforces this in its front (rumqttd has no ACL hook); an external
/// broker gets the same rules from its ACL file.
pub fn machine_may_subscribe(machine: &MachineId, filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    let literal = |level: &str| !level.is_empty() && !level.contains(['+', '#']);
    match levels.as_slice() {
        [TOPIC_PREFIX, "cmd", "global", _, ..] => true,
        [TOPIC_PREFIX, "cmd", "zone", zone, _, ..] => {
            literal(zone) && zone.parse::<ZoneId>().is_ok()
        }
        [TOPIC_PREFIX, "cmd", "machine", id, _, ..] => *id == machine.as_str(),
        _ => false,
    }
}

/// Whether a machine's login may publish on `topic` (or leave it as its last will): only
/// its own events. Commands come from the server alone; a publish elsewhere, even an empty
/// retained one, could erase the commands other machines find when they connect.
pub fn machine_may_publish(machine: &MachineId, topic: &str) -> bool {
    matches!(topic.parse::<Topic>(), Ok(Topic::Event { machine: m, .. }) if m == *machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_formats_all_four_forms() {
        let cases = [
            (
                "boottorrent/cmd/global/reboot",
                Topic::command(Scope::Global, CommandKind::Reboot),
            ),
            (
                "boottorrent/cmd/zone/lab-1/artifact_assignment",
                Topic::command(
                    Scope::Zone("lab-1".parse().unwrap()),
                    CommandKind::ArtifactAssignment,
                ),
            ),
            (
                "boottorrent/cmd/machine/pc.07/machine_configuration",
                Topic::command(
                    Scope::Machine(machine("pc.07")),
                    CommandKind::MachineConfiguration,
                ),
            ),
            (
                "boottorrent/evt/machine/pc_07/heartbeat",
                Topic::event(machine("pc_07"), EventKind::Heartbeat),
            ),
        ];
        for (text, topic) in cases {
            assert_eq!(text.parse::<Topic>(), Ok(topic.clone()), "{text}");
            assert_eq!(topic.to_string(), text);
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for &kind in CommandKind::ALL {
            let t = Topic::command(Scope::Global, kind);
            assert_eq!(t.to_string().parse::<Topic>(), Ok(t));
            assert_eq!(kind.as_str().parse::<CommandKind>(), Ok(kind));
        }
        for &kind in EventKind::ALL {
            let t = Topic::event(machine("m"), kind);
            assert_eq!(t.to_string().parse::<Topic>(), Ok(t));
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        assert_eq!(CommandKind::ALL.len(), 5);
        assert_eq!(EventKind::ALL.len(), 7);
    }

    #[test]
    fn empty() {
        assert_eq!("".parse::<Topic>(), Err(TopicError::Empty));
    }

    #[test]
    fn prefix() {
        assert_eq!(
            "other/cmd/global/boot".parse::<Topic>(),
            Err(TopicError::Prefix {
                found: "other".into()
            })
        );
        assert_eq!(
            "/boottorrent/cmd/global/boot".parse::<Topic>(),
            Err(TopicError::Prefix { found: "".into() })
        );
        assert_eq!(
            "#".parse::<Topic>(),
            Err(TopicError::Prefix { found: "#".into() })
        );
    }

    #[test]
    fn segment_count() {
        let count = |s: &str| s.parse::<Topic>();
        assert_eq!(
            count("boottorrent"),
            Err(TopicError::SegmentCount {
                expected: 4,
                found: 1
            })
        );
        assert_eq!(
            count("boottorrent/cmd"),
            Err(TopicError::SegmentCount {
                expected: 4,
                found: 2
            })
        );
        assert_eq!(
            count("boottorrent/cmd/global"),
            Err(TopicError::SegmentCount {
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            count("boottorrent/cmd/global/boot/x"),
            Err(TopicError::SegmentCount {
                expected: 4,
                found: 5
            })
        );
        assert_eq!(
            count("boottorrent/cmd/zone/z/boot/"),
            Err(TopicError::SegmentCount {
                expected: 5,
                found: 6
            })
        );
        assert_eq!(
            count("boottorrent/evt/machine/m"),
            Err(TopicError::SegmentCount {
                expected: 5,
                found: 4
            })
        );
        let many = format!("boottorrent/evt/machine{}", "/".repeat(10_000));
        assert_eq!(
            count(&many),
            Err(TopicError::SegmentCount {
                expected: 5,
                found: 10_003
            })
        );
    }

    #[test]
    fn direction() {
        assert_eq!(
            "boottorrent/evts/machine/m/boot".parse::<Topic>(),
            Err(TopicError::Direction {
                found: "evts".into()
            })
        );
        assert_eq!(
            "boottorrent//machine/m/boot".parse::<Topic>(),
            Err(TopicError::Direction { found: "".into() })
        );
        assert_eq!(
            "boottorrent/+/global/boot".parse::<Topic>(),
            Err(TopicError::Direction { found: "+".into() })
        );
    }

    #[test]
    fn scope() {
        assert_eq!(
            "boottorrent/cmd/room/r/boot".parse::<Topic>(),
            Err(TopicError::Scope {
                found: "room".into()
            })
        );
        // Events are only ever sent by a machine.
        assert_eq!(
            "boottorrent/evt/zone/z/boot".parse::<Topic>(),
            Err(TopicError::Scope {
                found: "zone".into()
            })
        );
        assert_eq!(
            "boottorrent/evt/global/boot".parse::<Topic>(),
            Err(TopicError::Scope {
                found: "global".into()
            })
        );
    }

    #[test]
    fn id() {
        assert_eq!(
            "boottorrent/cmd/zone/+/boot".parse::<Topic>(),
            Err(TopicError::Id {
                segment: IdSegment::Zone,
                source: IdError::BadChar { ch: '+', index: 0 }
            })
        );
        assert_eq!(
            "boottorrent/evt/machine//boot".parse::<Topic>(),
            Err(TopicError::Id {
                segment: IdSegment::Machine,
                source: IdError::Empty
            })
        );
        let long = format!("boottorrent/cmd/machine/{}/boot", "m".repeat(65));
        assert_eq!(
            long.parse::<Topic>(),
            Err(TopicError::Id {
                segment: IdSegment::Machine,
                source: IdError::TooLong { len: 65 }
            })
        );
        let err = "boottorrent/evt/machine/pc\u{e9}/boot"
            .parse::<Topic>()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("topic machine id is invalid"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind() {
        assert_eq!(
            "boottorrent/cmd/global/startup".parse::<Topic>(),
            Err(TopicError::UnknownKind {
                found: "startup".into()
            })
        );
        assert_eq!(
            "boottorrent/evt/machine/m/reboot".parse::<Topic>(),
            Err(TopicError::UnknownKind {
                found: "reboot".into()
            })
        );
        assert_eq!(
            "boottorrent/evt/machine/m/#".parse::<Topic>(),
            Err(TopicError::UnknownKind { found: "#".into() })
        );
        assert_eq!(
            "boottorrent/cmd/global/".parse::<Topic>(),
            Err(TopicError::UnknownKind { found: "".into() })
        );
        assert_eq!(
            "Boot".parse::<CommandKind>(),
            Err(TopicError::UnknownKind {
                found: "Boot".into()
            })
        );
    }

    #[test]
    fn filters() {
        assert_eq!(
            machine_commands_filter(&machine("pc-1")),
            "boottorrent/cmd/machine/pc-1/#"
        );
        assert_eq!(
            zone_commands_filter(&"z".parse().unwrap()),
            "boottorrent/cmd/zone/z/#"
        );
        assert_eq!(EVENTS_FILTER, "boottorrent/evt/#");
        assert_eq!(GLOBAL_COMMANDS_FILTER, "boottorrent/cmd/global/#");
    }

    #[test]
    fn a_machine_may_read_only_commands_meant_for_it() {
        let m: MachineId = "pc-07".parse().unwrap();
        for allowed in [
            GLOBAL_COMMANDS_FILTER.to_owned(),
            machine_commands_filter(&m),
            zone_commands_filter(&"lab-1".parse().unwrap()),
            "boottorrent/cmd/global/boot".to_owned(),
            "boottorrent/cmd/machine/pc-07/+".to_owned(),
        ] {
            assert!(machine_may_subscribe(&m, &allowed), "{allowed}");
        }
        for refused in [
            "#",
            "+/#",
            "boottorrent/#",
            EVENTS_FILTER,
            "boottorrent/evt/machine/pc-07/#",
            "boottorrent/cmd/#",
            "boottorrent/cmd/+/#",
            "boottorrent/cmd/machine/+/#",
            "boottorrent/cmd/machine/#",
            "boottorrent/cmd/machine/pc-08/#",
            "boottorrent/cmd/zone/+/#",
            "boottorrent/cmd/zone/#",
            "boottorrent/cmd/global",
            "boottorrent/cmd/machine/pc-07",
            "$SYS/#",
            "",
        ] {
            assert!(!machine_may_subscribe(&m, refused), "{refused}");
        }
    }

    #[test]
    fn a_machine_may_publish_only_its_own_events() {
        let m: MachineId = "pc-07".parse().unwrap();
        assert!(machine_may_publish(
            &m,
            "boottorrent/evt/machine/pc-07/heartbeat"
        ));
        for refused in [
            "boottorrent/evt/machine/pc-08/heartbeat",
            "boottorrent/evt/machine/pc-07/nonsense",
            "boottorrent/evt/machine/+/heartbeat",
            "boottorrent/cmd/global/boot",
            "boottorrent/cmd/machine/pc-07/machine_configuration",
            "elsewhere",
        ] {
            assert!(!machine_may_publish(&m, refused), "{refused}");
        }
    }
}
