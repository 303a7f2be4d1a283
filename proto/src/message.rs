//! Message bodies: what travels inside an envelope's `body`.
//!
//! Bodies carry no kind tag: the topic names the kind, and [`crate::decode_event`] /
//! [`crate::decode_command`] pick the body type from it. There are no floats anywhere, and
//! no maps with unordered keys, so re-encoding a decoded body gives the same bytes, which
//! the envelope signature relies on.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::id::{DeploymentId, ImageId, ZoneId};
use crate::topic::{CommandKind, EventKind};

/// A fixed-size byte array: lowercase hex in JSON, a MessagePack `bin` otherwise.
///
/// Deserializing accepts a hex string, a byte string, or a sequence of integers, in any
/// format, as long as it yields exactly `N` bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bytes<const N: usize>(pub [u8; N]);

/// An Ed25519 public key.
pub type PublicKeyBytes = Bytes<32>;
/// An Ed25519 signature.
pub type SignatureBytes = Bytes<64>;
/// A BitTorrent v1 info hash (SHA-1).
pub type InfoHash = Bytes<20>;
/// A SHA-256 digest.
pub type Sha256 = Bytes<32>;

impl<const N: usize> Bytes<N> {
    /// The bytes as lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly `2 * N` hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, hex::FromHexError> {
        let mut out = [0u8; N];
        hex::decode_to_slice(s, &mut out)?;
        Ok(Self(out))
    }
}

impl<const N: usize> From<[u8; N]> for Bytes<N> {
    fn from(bytes: [u8; N]) -> Self {
        Self(bytes)
    }
}

impl<const N: usize> AsRef<[u8]> for Bytes<N> {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

// Hex, because a list of 32 decimal numbers is unreadable in a log line.
impl<const N: usize> fmt::Debug for Bytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes<{N}>({})", self.to_hex())
    }
}

impl<const N: usize> fmt::Display for Bytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl<const N: usize> Serialize for Bytes<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_hex())
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de, const N: usize> Deserialize<'de> for Bytes<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // JSON and MessagePack are self-describing, so any accepted shape can be taken in
        // either; binary formats that are not get asked for bytes, which is what we wrote.
        if deserializer.is_human_readable() {
            deserializer.deserialize_any(BytesVisitor::<N>)
        } else {
            deserializer.deserialize_bytes(BytesVisitor::<N>)
        }
    }
}

struct BytesVisitor<const N: usize>;

impl<'de, const N: usize> de::Visitor<'de> for BytesVisitor<N> {
    type Value = Bytes<N>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{N} bytes as {} hex digits, a byte string or a sequence",
            2 * N
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes<N>, E> {
        Bytes::from_hex(v).map_err(|e| {
            // The offending text is echoed only when short; it is attacker-supplied.
            if v.len() <= 2 * N + 2 {
                E::custom(format_args!(
                    "expected {} hex digits, found {v:?}: {e}",
                    2 * N
                ))
            } else {
                E::custom(format_args!(
                    "expected {} hex digits, found {} characters",
                    2 * N,
                    v.len()
                ))
            }
        })
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes<N>, E> {
        <[u8; N]>::try_from(v)
            .map(Bytes)
            .map_err(|_| E::invalid_length(v.len(), &self))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes<N>, A::Error> {
        let mut out = [0u8; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(i, &self))?;
        }
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(N + 1, &self));
        }
        Ok(Bytes(out))
    }
}

/// IP addresses as their text form in every encoding.
///
/// Serde's own binary form for `IpAddr` is an enum map (`{"V4": [192, 168, 1, 7]}`) that
/// tools outside Rust would have to special-case; text is what every MessagePack reader
/// understands, and it is canonical (`Display` writes RFC 5952 form), so re-encoding stays
/// deterministic.
mod ip_strings {
    use super::*;

    struct IpText(IpAddr);

    impl<'de> Deserialize<'de> for IpText {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct IpVisitor;

            impl de::Visitor<'_> for IpVisitor {
                type Value = IpText;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an IPv4 or IPv6 address as text")
                }

                fn visit_str<E: de::Error>(self, v: &str) -> Result<IpText, E> {
                    v.parse().map(IpText).map_err(|_| {
                        // Addresses are short; cap the echo of attacker-supplied text.
                        let shown: String = v.chars().take(48).collect();
                        E::custom(format_args!("invalid IP address {shown:?}"))
                    })
                }
            }

            deserializer.deserialize_str(IpVisitor)
        }
    }

    pub(super) fn serialize<S: Serializer>(
        ips: &[IpAddr],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(ips.iter().map(|ip| ip.to_string()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<IpAddr>, D::Error> {
        let ips = Vec::<IpText>::deserialize(deserializer)?;
        Ok(ips.into_iter().map(|IpText(ip)| ip).collect())
    }
}

/// Where an image held by an agent stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Pieces are still arriving.
    Downloading,
    /// All pieces are in; the whole-file SHA-256 is being checked.
    Verifying,
    /// Complete and verified, ready to boot.
    Staged,
    /// Complete and uploading to other peers.
    Seeding,
    /// Download or verification failed.
    Failed,
}

impl ImageState {
    /// The state as the protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Downloading => "downloading",
            ImageState::Verifying => "verifying",
            ImageState::Staged => "staged",
            ImageState::Seeding => "seeding",
            ImageState::Failed => "failed",
        }
    }
}

/// An image an agent holds, in any state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldImage {
    /// Which image.
    pub image: ImageId,
    /// Its torrent's info hash.
    pub info_hash: InfoHash,
    /// Where it stands.
    pub state: ImageState,
    /// Bytes downloaded and verified so far.
    pub bytes_done: u64,
    /// The image's size in bytes.
    pub bytes_total: u64,
}

/// Event `startup`: an agent (re)started. Carries everything the server needs to
/// register the machine and reconcile its images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Startup {
    /// The agent's version string.
    pub agent_version: String,
    /// The machine's host name.
    pub hostname: String,
    /// Operating system name and version.
    pub os: String,
    /// The machine's IP addresses; strings on the wire in both encodings.
    #[serde(with = "ip_strings")]
    pub ips: Vec<IpAddr>,
    /// The machine's MAC addresses, as the agent formats them.
    pub macs: Vec<String>,
    /// Free space where images are stored, in bytes.
    pub free_disk_bytes: u64,
    /// Images held.
    pub images: Vec<HeldImage>,
    /// The machine's Ed25519 public key, which the operator approves on first contact.
    pub public_key: PublicKeyBytes,
    /// The image the machine runs now, when it runs one that BootTorrent booted; `None`
    /// when it runs anything else (its installed system) or the agent cannot tell.
    ///
    /// Left out of the encoding when `None`, and `None` when absent, so both directions of a
    /// mixed fleet keep working as far as they can: a new server takes an old agent's startup
    /// (no field: runs nothing known), and a new agent that runs no booted image sends the
    /// very bytes an old agent sends, which an old server takes. An old server refuses a
    /// startup that carries the field: the signature covers a re-encoding of what was
    /// decoded, so no reader can skip a field it does not know. Upgrade the server first;
    /// the agent also leaves the field out after the server ignored it three times
    /// (see the agent's `link` module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<RunningImage>,
}

/// Which image a machine runs, as its agent determined it from inside that image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningImage {
    /// The image.
    pub image: ImageId,
    /// The deployment that booted it, when the agent recorded one.
    pub deployment: Option<DeploymentId>,
}

/// Event `heartbeat`: the agent is alive; also what it holds, so the server can notice
/// a difference from the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Images held.
    pub images: Vec<HeldImage>,
}

/// Event `progress`: download progress of one image for one deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// The deployment being served.
    pub deployment: DeploymentId,
    /// The image being downloaded.
    pub image: ImageId,
    /// Bytes downloaded and verified so far.
    pub bytes_done: u64,
    /// The image's size in bytes.
    pub bytes_total: u64,
    /// Download rate, bytes per second.
    pub download_bps: u64,
    /// Upload rate, bytes per second.
    pub upload_bps: u64,
    /// Peers connected.
    pub peers: u32,
    /// Where the image stands.
    pub state: ImageState,
}

/// Whether an agent is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Published (retained) when the agent connects.
    Online,
    /// The agent's last will, published by the broker when the agent disappears.
    Offline,
}

/// Event `status`: presence, retained by the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Online or offline.
    pub presence: Presence,
}

/// Event `boot`: the result of a boot action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootReport {
    /// The deployment that asked for the boot, if any.
    pub deployment: Option<DeploymentId>,
    /// The image booted or set to boot, if any.
    pub image: Option<ImageId>,
    /// Whether it worked.
    pub ok: bool,
    /// What happened, for the operator.
    pub message: String,
}

/// Event `error`: something failed on the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReport {
    /// A stable, machine-readable code.
    pub code: String,
    /// What happened, for the operator.
    pub message: String,
    /// The deployment concerned, if any.
    pub deployment: Option<DeploymentId>,
}

/// Event `shutdown`: the agent is stopping on purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// Why.
    pub reason: String,
}

/// What an agent does once an assigned image is downloaded and verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterDownload {
    /// Keep it ready (`stage`).
    Stage,
    /// Make it the next boot entry (`set-boot`).
    SetBoot,
    /// Make it the next boot entry and reboot into it (`reboot`).
    Reboot,
}

/// What becomes of the writes a booted image makes into its boot child.
///
/// Sent in `artifact_assignment` only when it is `reset`, so an agent that predates it still
/// reads every `keep` assignment; an older agent refuses a `reset` one as malformed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistence {
    /// One child, kept across reboots and later deployments of the image.
    #[default]
    Keep,
    /// A fresh child at every boot: the agent in the running image makes the next one.
    Reset,
}

impl Persistence {
    /// True for the default, which is left out of an assignment.
    pub fn is_keep(&self) -> bool {
        *self == Persistence::Keep
    }
}

/// Command `artifact_assignment`: download an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactAssignment {
    /// The deployment this serves.
    pub deployment: DeploymentId,
    /// The image to fetch.
    pub image: ImageId,
    /// The image's human-readable name.
    pub name: String,
    /// Its torrent's info hash.
    pub info_hash: InfoHash,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of the whole image, checked after download.
    pub sha256: Sha256,
    /// Where to fetch the `.torrent` from.
    pub torrent_url: String,
    /// Where to store the image on the machine.
    pub save_path: String,
    /// What to do once it is verified.
    pub action: AfterDownload,
    /// What becomes of the booted system's writes.
    #[serde(default, skip_serializing_if = "Persistence::is_keep")]
    pub persistence: Persistence,
}

/// Command `artifact_unassignment`: stop downloading or seeding an image and drop it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactUnassignment {
    /// The deployment withdrawn.
    pub deployment: DeploymentId,
    /// The image to drop.
    pub image: ImageId,
}

/// Command `machine_configuration`: the settings a machine should run with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Zones the machine belongs to; it subscribes to their command topics.
    pub zones: Vec<ZoneId>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_secs: u32,
    /// Download cap in bytes per second; `None` for none.
    pub download_limit_bps: Option<u64>,
    /// Upload cap in bytes per second; `None` for none.
    pub upload_limit_bps: Option<u64>,
    /// Digest of the rest, so either side can tell whether a machine is up to date.
    pub config_hash: String,
}

/// Command `boot`: boot an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootCommand {
    /// The image to boot.
    pub image: ImageId,
    /// The deployment that asks for it, if any.
    pub deployment: Option<DeploymentId>,
}

/// Command `reboot`: reboot the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reboot {
    /// Seconds to wait first.
    pub delay_secs: u32,
}

/// Defines a body sum type whose variants each wrap one body struct, with `kind()`,
/// `From<Body>` and an untagged `Serialize`.
macro_rules! body_enum {
    (
        $(#[$meta:meta])*
        $name:ident : $kind:ident {
            $($(#[$vmeta:meta])* $variant:ident($body:ident)),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant($body)),+
        }

        impl $name {
            /// The kind that names this body in its topic.
            pub fn kind(&self) -> $kind {
                match self {
                    $($name::$variant(_) => $kind::$variant),+
                }
            }
        }

        // Untagged: the topic carries the kind, so the wire body is just the inner struct.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self {
                    $($name::$variant(body) => body.serialize(serializer)),+
                }
            }
        }

        $(
            impl From<$body> for $name {
                fn from(body: $body) -> Self {
                    $name::$variant(body)
                }
            }
        )+
    };
}

body_enum!(
    /// Any event body; the variant matches the topic's [`EventKind`].
    Event: EventKind {
        /// `startup`.
        Startup(Startup),
        /// `heartbeat`.
        Heartbeat(Heartbeat),
        /// `progress`.
        Progress(Progress),
        /// `status`.
        Status(Status),
        /// `boot`.
        Boot(BootReport),
        /// `error`.
        Error(ErrorReport),
        /// `shutdown`.
        Shutdown(Shutdown),
    }
);

body_enum!(
    /// Any command body; the variant matches the topic's [`CommandKind`].
    Command: CommandKind {
        /// `artifact_assignment`.
        ArtifactAssignment(ArtifactAssignment),
        /// `artifact_unassignment`.
        ArtifactUnassignment(ArtifactUnassignment),
        /// `machine_configuration`.
        MachineConfiguration(MachineConfiguration),
        /// `boot`.
        Boot(BootCommand),
        /// `reboot`.
        Reboot(Reboot),
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_hex_in_json() {
        let b = Bytes([0xab; 4]);
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"abababab\"");
        assert_eq!(serde_json::from_str::<Bytes<4>>("\"ABabABab\"").unwrap(), b);
        assert_eq!(
            serde_json::from_str::<Bytes<4>>("[171,171,171,171]").unwrap(),
            b
        );
        assert_eq!(format!("{b:?}"), "Bytes<4>(abababab)");
        assert_eq!(b.to_string(), "abababab");
    }

    #[test]
    fn bytes_are_bin_in_messagepack() {
        let b = Bytes([1, 2, 3]);
        let packed = rmp_serde::to_vec(&b).unwrap();
        assert_eq!(packed, [0xc4, 3, 1, 2, 3]);
        assert_eq!(rmp_serde::from_slice::<Bytes<3>>(&packed).unwrap(), b);
        // A hex string or an array is accepted too.
        let as_str = rmp_serde::to_vec(&"010203").unwrap();
        assert_eq!(rmp_serde::from_slice::<Bytes<3>>(&as_str).unwrap(), b);
        let as_seq = rmp_serde::to_vec(&[1u8, 2, 3]).unwrap();
        assert_eq!(rmp_serde::from_slice::<Bytes<3>>(&as_seq).unwrap(), b);
    }

    #[test]
    fn bytes_refuse_wrong_lengths() {
        assert!(serde_json::from_str::<Bytes<4>>("\"ababab\"").is_err());
        assert!(serde_json::from_str::<Bytes<4>>("\"ababababab\"").is_err());
        assert!(serde_json::from_str::<Bytes<4>>("\"abababzz\"").is_err());
        assert!(serde_json::from_str::<Bytes<4>>("[1,2,3]").is_err());
        assert!(serde_json::from_str::<Bytes<4>>("[1,2,3,4,5]").is_err());
        assert!(serde_json::from_str::<Bytes<4>>("[1,2,3,256]").is_err());
        assert!(rmp_serde::from_slice::<Bytes<4>>(&[0xc4, 3, 1, 2, 3]).is_err());
        assert!(rmp_serde::from_slice::<Bytes<4>>(&[0xc4, 5, 1, 2, 3, 4, 5]).is_err());
        let err = serde_json::from_str::<Bytes<2>>("\"xyz1\"").unwrap_err();
        assert!(err.to_string().contains("\"xyz1\""), "{err}");
    }

    #[test]
    fn enums_use_wire_names() {
        assert_eq!(
            serde_json::to_string(&AfterDownload::SetBoot).unwrap(),
            "\"set-boot\""
        );
        assert_eq!(
            serde_json::to_string(&AfterDownload::Stage).unwrap(),
            "\"stage\""
        );
        assert_eq!(
            serde_json::to_string(&ImageState::Downloading).unwrap(),
            "\"downloading\""
        );
        assert_eq!(
            serde_json::to_string(&Presence::Offline).unwrap(),
            "\"offline\""
        );
    }

    #[test]
    fn sum_types_serialize_untagged_and_know_their_kind() {
        let reboot = Command::from(Reboot { delay_secs: 5 });
        assert_eq!(reboot.kind(), CommandKind::Reboot);
        assert_eq!(
            serde_json::to_string(&reboot).unwrap(),
            r#"{"delay_secs":5}"#
        );
        let status = Event::from(Status {
            presence: Presence::Online,
        });
        assert_eq!(status.kind(), EventKind::Status);
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"presence":"online"}"#
        );
    }

    #[test]
    fn ips_are_text_in_both_encodings() {
        let startup = Startup {
            agent_version: String::new(),
            hostname: String::new(),
            os: String::new(),
            ips: vec![
                "10.0.0.1".parse().unwrap(),
                "::ffff:10.0.0.1".parse().unwrap(),
            ],
            macs: vec![],
            free_disk_bytes: 0,
            images: vec![],
            public_key: Bytes([0; 32]),
            running: None,
        };
        let json = serde_json::to_value(&startup).unwrap();
        assert_eq!(
            json["ips"],
            serde_json::json!(["10.0.0.1", "::ffff:10.0.0.1"])
        );
        let packed = rmp_serde::to_vec_named(&startup).unwrap();
        assert!(packed.windows(9).any(|w| w == b"\xa810.0.0.1"));
        assert_eq!(rmp_serde::from_slice::<Startup>(&packed).unwrap(), startup);

        let mut bad = json;
        bad["ips"] = serde_json::json!(["10.0.0.256"]);
        let err = serde_json::from_value::<Startup>(bad).unwrap_err();
        assert!(err.to_string().contains("\"10.0.0.256\""), "{err}");
    }

    #[test]
    fn running_is_optional_both_ways() {
        let mut startup = Startup {
            agent_version: "0.1.0".into(),
            hostname: "pc".into(),
            os: "Linux".into(),
            ips: vec![],
            macs: vec![],
            free_disk_bytes: 0,
            images: vec![],
            public_key: Bytes([0; 32]),
            running: None,
        };
        // Nothing running: the encoding an older agent wrote, which an older server reads.
        let old = serde_json::to_value(&startup).unwrap();
        assert!(old.get("running").is_none(), "{old}");
        assert_eq!(serde_json::from_value::<Startup>(old).unwrap(), startup);
        startup.running = Some(RunningImage {
            image: "win11".parse().unwrap(),
            deployment: Some("d-1".parse().unwrap()),
        });
        for packed in [
            rmp_serde::to_vec_named(&startup).unwrap(),
            serde_json::to_vec(&startup).unwrap(),
        ] {
            let back: Startup = crate::codec::decode(&packed).unwrap();
            assert_eq!(back, startup);
        }
        let json = serde_json::to_value(&startup).unwrap();
        assert_eq!(
            json["running"],
            serde_json::json!({"image": "win11", "deployment": "d-1"})
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<Reboot>(r#"{"delay_secs":5,"now":true}"#).is_err());
    }
}
