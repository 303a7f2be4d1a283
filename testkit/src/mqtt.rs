//! The server's broker from the outside: the standard `mosquitto_pub` and `mosquitto_sub`
//! clients, as an operator's tools or a hostile client would talk to it.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdout, Command, Output, Stdio};

use crate::process::{Proc, sigterm};
use crate::{PATIENCE, Server, admin_client_id};

impl Server {
    /// Sends one message with `mosquitto_pub` as `user` (QoS 1), payload on stdin. The client
    /// id is the username, as the server requires (`admin-*` for the operator).
    pub fn publish_as(&self, user: &str, password: &str, topic: &str, payload: &[u8]) -> Output {
        let client_id = if user == "admin" {
            admin_client_id()
        } else {
            user.to_owned()
        };
        self.publish_with(&client_id, Some((user, password)), topic, payload)
    }

    /// Sends one message with `mosquitto_pub` (QoS 1) with any client id and login, or none.
    pub fn publish_with(
        &self,
        client_id: &str,
        login: Option<(&str, &str)>,
        topic: &str,
        payload: &[u8],
    ) -> Output {
        let mut command = Command::new("mosquitto_pub");
        command
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", client_id]);
        if let Some((user, password)) = login {
            command.args(["-u", user, "-P", password]);
        }
        let mut child = command
            .args(["-q", "1", "-t", topic, "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_pub");
        child.stdin.take().unwrap().write_all(payload).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Publishes as the operator (`admin` with the admin token) and asserts the broker took
    /// it: how a test hands agents a command it signed.
    pub fn publish_admin(&self, topic: &str, payload: &[u8]) {
        let out = self.publish_as("admin", &self.admin_token(), topic, payload);
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `mosquitto_sub -d` as the machine `user` on `filters` for `secs` seconds (or until
    /// it gives up) and returns everything it printed: "Subscribed (mid: 1): 128" is a
    /// refusal, received messages are lines `<topic> <hex payload>`.
    pub fn sniff_as(&self, user: &str, password: &str, filters: &[&str], secs: u32) -> String {
        let mut command = Command::new("mosquitto_sub");
        command
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", user, "-u", user, "-P", password])
            .args(["-q", "1", "-d", "-F", "%t %x", "-W", &secs.to_string()]);
        for filter in filters {
            command.args(["-t", filter]);
        }
        let out = command.output().expect("running mosquitto_sub");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Subscribes as `admin` and returns once the broker confirmed the subscription.
    pub fn subscribe(&self, topic: &str) -> Subscription {
        // mosquitto_sub block-buffers its debug lines on a pipe; line-buffer them so that the
        // SUBACK line arrives when it happens, not when the process exits. stdbuf execs, so
        // the child's pid stays mosquitto_sub's.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &self.mqtt_port.to_string()])
            .args(["-i", &admin_client_id()])
            .args(["-u", "admin", "-P", &self.admin_token()])
            .args(["-t", topic, "-q", "1", "-d", "-F", "%t %x"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_sub");
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let proc = Proc::adopt(child, "mosquitto_sub");
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines.read_line(&mut line).unwrap();
            assert!(n > 0, "mosquitto_sub exited before subscribing");
            // With -d, "Subscribed (mid: 1): 1" follows the SUBACK line.
            if line.starts_with("Subscribed (") {
                break;
            }
        }
        Subscription { proc, lines }
    }
}

/// A running `mosquitto_sub` as the operator, stopped when dropped.
pub struct Subscription {
    proc: Proc,
    lines: BufReader<ChildStdout>,
}

impl Subscription {
    /// The next message as (topic, payload), skipping mosquitto_sub's debug lines.
    // Not an iterator's `next`: there is no end, a message that does not come fails the test.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> (String, Vec<u8>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut line = String::new();
        // Read on this thread but bound the wait: the client is stopped on timeout, which
        // ends the read with EOF.
        let pid = self.proc.pid();
        let watchdog = std::thread::spawn(move || {
            if rx.recv_timeout(PATIENCE).is_err() {
                sigterm(pid);
            }
        });
        let result = loop {
            line.clear();
            let n = self.lines.read_line(&mut line).unwrap();
            if n == 0 {
                break None;
            }
            if line.starts_with("Client ") || line.trim().is_empty() {
                continue;
            }
            let (topic, hex_payload) = line
                .trim_end()
                .split_once(' ')
                .unwrap_or((line.trim_end(), ""));
            break Some((
                topic.to_owned(),
                hex::decode(hex_payload).expect("hex payload"),
            ));
        };
        let _ = tx.send(());
        watchdog.join().unwrap();
        result.expect("no message arrived within the patience limit")
    }
}
