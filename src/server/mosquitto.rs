//! `boottorrent broker-config`: a mosquitto 2.0 configuration for running the server against
//! mosquitto (`serve --broker mqtts://...`).
//!
//! What it writes into the output directory: `mosquitto.conf` (one TLS listener that requires
//! a client certificate of the machine CA, takes the certificate's CN as the username and the
//! username as the client id, no anonymous clients), `acl` (each agent writes only its own
//! events and reads only its own, its zones' and the global commands; the orchestrator reads
//! every event and writes every command), `ca.crt` (the machine CA), and `broker.crt` /
//! `broker.key` (the broker's own TLS certificate, from the same CA). The orchestrator's client
//! certificate is made in the data directory, where `serve` finds it.
//!
//! Why these options, from mosquitto.conf(5): with `require_certificate` and
//! `use_identity_as_username` the CN is the username and the password is not used; with
//! `use_username_as_clientid` the client id is replaced by the username, so a client cannot
//! take over another's session by its client id; `pattern` lines apply to every user with
//! `%u` replaced by the username, and `topic` lines after a `user` line to that user only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::server::broker::ORCHESTRATOR_CLIENT_ID;
use crate::server::machine_ca::MachineCa;

/// What `broker-config` is asked for.
pub struct Request<'a> {
    /// The server's data directory (the machine CA lives there).
    pub data_dir: &'a Path,
    /// Where to write the files.
    pub out: &'a Path,
    /// The address mosquitto listens on.
    pub listen: SocketAddr,
    /// Names and addresses clients reach the broker by (its certificate's subject names).
    pub names: &'a [String],
    /// The user mosquitto runs as when started as root (its `user` option); it must be able
    /// to read `broker.key`. `None` leaves mosquitto's default (`mosquitto`).
    pub run_as: Option<&'a str>,
}

/// Writes the configuration; returns the files written.
pub fn write(request: &Request<'_>) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(request.out)
        .with_context(|| format!("creating {}", request.out.display()))?;
    // Absolute paths: mosquitto resolves relative ones against its working directory.
    let out = std::fs::canonicalize(request.out)
        .with_context(|| format!("resolving {}", request.out.display()))?;
    std::fs::create_dir_all(request.data_dir)
        .with_context(|| format!("creating {}", request.data_dir.display()))?;
    let ca = MachineCa::load_or_create(request.data_dir)?;
    crate::server::external_broker::orchestrator_certificate(request.data_dir)?;
    let mut names = request.names.to_vec();
    if names.is_empty() {
        names.push("localhost".into());
        names.push(request.listen.ip().to_string());
    }
    let server = ca.issue_server_with_key(&names, boottorrent_proto::now_ms())?;
    let files = [
        ("ca.crt", ca.cert_pem().to_owned(), false),
        ("broker.crt", server.cert_pem, false),
        ("broker.key", server.key_pem, true),
        ("acl", acl(), false),
        (
            "mosquitto.conf",
            conf(&out, request.listen, request.run_as),
            false,
        ),
    ];
    let mut written = Vec::new();
    for (name, contents, private) in files {
        let path = out.join(name);
        if private {
            let _ = std::fs::remove_file(&path);
            crate::server::credentials::write_private(&path, contents.trim_end())?;
        } else {
            std::fs::write(&path, contents)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        written.push(path);
    }
    Ok(written)
}

fn conf(out: &Path, listen: SocketAddr, run_as: Option<&str>) -> String {
    let path = |name: &str| out.join(name).display().to_string();
    let user = match run_as {
        Some(user) => format!("user {user}\n"),
        None => "# Started as root, mosquitto runs as user mosquitto, which must be able to read\n\
                 # broker.key (mode 0600): chown mosquitto broker.key, or set `user` here.\n"
            .to_owned(),
    };
    format!(
        "# mosquitto 2.0 configuration for BootTorrent, written by `boottorrent broker-config`.\n\
         # Run the server with: boottorrent serve --broker mqtts://<this broker>:{port}\n\
         # Agents log in with a certificate of the BootTorrent machine CA (agent option\n\
         # broker_login = \"certificate\"); its CN, the machine id, is the username and the\n\
         # client id, and the ACL keeps each agent to its own topics.\n\
         {user}\
         per_listener_settings false\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         set_tcp_nodelay true\n\
         # The orchestrator takes every machine's events at QoS 1 on one connection: more than\n\
         # mosquitto's default of 20 may be in flight to it, and a power-on burst (10,000\n\
         # startups) is queued rather than dropped past mosquitto's default 1,000.\n\
         max_inflight_messages 1000\n\
         max_queued_messages 100000\n\
         \n\
         listener {port} {ip}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         tls_version tlsv1.2\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n",
        port = listen.port(),
        ip = listen.ip(),
        acl = path("acl"),
        ca = path("ca.crt"),
        cert = path("broker.crt"),
        key = path("broker.key"),
    )
}

fn acl() -> String {
    format!(
        "# BootTorrent topic rules, written by `boottorrent broker-config`.\n\
         # Every client: %u is its username, the CN of its certificate (its machine id).\n\
         # (mosquitto warns that the zone and global lines have no %u: they are meant for all.)\n\
         pattern write boottorrent/evt/machine/%u/#\n\
         pattern read boottorrent/cmd/machine/%u/#\n\
         pattern read boottorrent/cmd/zone/+/#\n\
         pattern read boottorrent/cmd/global/#\n\
         \n\
         # The server's orchestrator: every machine's events in, commands out.\n\
         user {ORCHESTRATOR_CLIENT_ID}\n\
         topic read boottorrent/evt/#\n\
         topic write boottorrent/cmd/#\n"
    )
}
