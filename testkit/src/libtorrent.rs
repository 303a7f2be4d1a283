//! libtorrent as the standard BitTorrent client the tests measure our servers against.

use std::process::Command;

use crate::require_tool;

/// Whether libtorrent may talk plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// libtorrent's defaults: either.
    Any,
    /// Encryption disabled both ways: libtorrent speaks plaintext BitTorrent only.
    Disabled,
    /// Message stream encryption forced both ways, RC4 the only level allowed: libtorrent
    /// never exchanges a plaintext byte with any peer.
    Forced,
}

/// Runs a libtorrent session bound to `bind_ip` for `secs` on `torrent`, dialling `peer`
/// (`-`: none) besides whatever its tracker hands out, and returns the payload bytes it
/// downloaded.
pub fn libtorrent_download(
    dir: &std::path::Path,
    torrent: &std::path::Path,
    bind_ip: &str,
    peer: &str,
    secs: u32,
    encryption: Encryption,
) -> u64 {
    require_tool("/usr/bin/python3", "python3-libtorrent");
    let script = dir.join("lt_fetch.py");
    std::fs::write(
        &script,
        r#"
import sys, time
import libtorrent as lt
torrent, bind_ip, peer, secs, save, encryption = sys.argv[1:7]
settings = {"listen_interfaces": bind_ip + ":0", "outgoing_interfaces": bind_ip,
            "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
            "enable_natpmp": False, "enable_incoming_utp": False,
            "enable_outgoing_utp": False}
if encryption == "forced":
    settings.update({"out_enc_policy": lt.enc_policy.forced,
                     "in_enc_policy": lt.enc_policy.forced,
                     "allowed_enc_level": lt.enc_level.rc4})
elif encryption == "disabled":
    settings.update({"out_enc_policy": lt.enc_policy.disabled,
                     "in_enc_policy": lt.enc_policy.disabled})
s = lt.session(settings)
p = lt.add_torrent_params()
p.ti = lt.torrent_info(torrent)
p.save_path = save
h = s.add_torrent(p)
deadline = time.time() + float(secs)
while time.time() < deadline and not h.status().is_seeding:
    if peer != "-":
        ip, port = peer.rsplit(":", 1)
        h.connect_peer((ip, int(port)))
    time.sleep(0.5)
print(h.status().total_payload_download, flush=True)
"#,
    )
    .unwrap();
    let save = dir.join(format!("lt-{bind_ip}"));
    std::fs::create_dir_all(&save).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(torrent)
        .args([bind_ip, peer, &secs.to_string()])
        .arg(&save)
        .arg(match encryption {
            Encryption::Any => "any",
            Encryption::Disabled => "disabled",
            Encryption::Forced => "forced",
        })
        .output()
        .expect("running python3 with libtorrent (Debian python3-libtorrent)");
    assert!(
        out.status.success(),
        "libtorrent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `torrent` with its announce URL replaced by `url`, as a host that learnt the info dict but
/// holds no passkey would make it.
pub fn torrent_announcing_to(torrent: &[u8], url: &str) -> Vec<u8> {
    let at = torrent.windows(6).position(|w| w == b"4:info").unwrap();
    let mut out = format!("d8:announce{}:{url}", url.len()).into_bytes();
    out.extend_from_slice(&torrent[at..]);
    out
}
