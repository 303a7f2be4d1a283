//! The BootTorrent MQTT protocol, shared by the server and the agents.
//!
//! The server and the lab machines talk over MQTT. The topic says who a message concerns
//! and what it is: commands go out on `boottorrent/cmd/{global | zone/{zoneId} |
//! machine/{machineId}}/{type}`, events come back on
//! `boottorrent/evt/machine/{machineId}/{type}` ([`Topic`]). Every id in a topic or a
//! message is validated against `[A-Za-z0-9._-]{1,64}` ([`MachineId`] and friends).
//!
//! A payload is an [`Envelope`] `{v, from, ts, seq, body, sig}` whose body is one of the
//! message structs in [`message`]; bodies carry no kind tag, since the topic names it
//! ([`decode_event`], [`decode_command`]). Payloads are MessagePack with named fields by
//! default and JSON on request; a reader tells them apart by the first byte ([`detect`]),
//! and refuses anything over [`MAX_PAYLOAD_BYTES`].
//!
//! The broker cannot restrict who publishes where, so authenticity lives in the messages:
//! commands are signed with the server's Ed25519 key, events with the sending machine's
//! key. The signature covers the topic and a canonical encoding of the envelope, so it
//! holds in either wire encoding and fails under any other topic. Freshness is separate:
//! a receiver drops envelopes outside a clock window or whose per-sender `seq` does not
//! increase ([`ReplayGuard`]); senders draw seqs from [`SeqCounter`].
//!
//! This crate is pure: types, encoding and checks, no I/O and no async runtime.

#![warn(missing_docs)]

pub mod codec;
pub mod envelope;
pub mod host;
pub mod id;
pub mod keys;
pub mod login;
pub mod machine;
pub mod message;
pub mod replay;
pub mod secret;
pub mod signer;
pub mod topic;

pub use codec::*;
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use envelope::*;
pub use host::hostname;
pub use id::*;
pub use keys::*;
pub use login::{
    Admission, CertificateAnswer, CertificateRequest, LoginError, LoginPassword, LoginProof,
    PasskeyAnswer, Purpose, certificate_request, login_password, passkey_request,
};
pub use machine::{CommandRefused, MachineSigner, accept_command, zone_filter_changes};
pub use message::*;
pub use replay::*;
pub use secret::Secret;
pub use signer::{Signer, now_ms};
pub use topic::*;
