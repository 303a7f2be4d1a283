//! Deployments: an image sent to a target (global, a zone, a list of machines) with an action,
//! and where each machine of the target stands.
//!
//! This module is the state machine only: it turns agents' reports into per-machine
//! transitions and never does I/O. The orchestrator feeds it, stores every changed deployment
//! in the same transaction as the events that changed it, and publishes the commands.
//!
//! Per machine: `pending → downloading → verifying → staged`, and for `set_boot` / `reboot` on
//! `→ booting → booted`; or `failed` with the agent's reason; or `stalled` when no progress
//! arrived for a while, which new progress undoes. A cancelled deployment accepts nothing.
//!
//! What `booted` means depends on the action. For `set_boot` it is the boot entry set: the
//! agent's boot backend succeeded, and the machine boots the image whenever it next restarts.
//! For `reboot` it is the machine running the image: the backend's success only starts the
//! wait (`booting`, with [`MachineProgress::rebooted_ms`] set), and the machine is `booted`
//! when its agent, started inside the new system, says in its `startup` that it runs the
//! deployment's image ([`Deployment::on_running`]). One that comes back running anything
//! else is `failed` naming what it runs; one that does not come back within the reboot
//! timeout is `failed` too ([`Deployment::reboot_overdue`]).

use std::collections::BTreeMap;

use boottorrent_proto::{
    ArtifactAssignment, DeploymentId, ImageId, ImageState, InfoHash, MachineId, Persistence,
    RunningImage, Sha256,
};
use serde::{Deserialize, Serialize};

use crate::api::{Action, MachineState, OverallState, Target};

/// One state change of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: MachineState,
    pub at_ms: i64,
}

/// One machine of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineProgress {
    pub id: MachineId,
    pub state: MachineState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub download_bps: u64,
    pub upload_bps: u64,
    pub peers: u32,
    /// The agent's reason when failed, or why stalled.
    pub error: Option<String>,
    /// When progress last moved (bytes or state): what `stalled` measures from.
    pub updated_ms: i64,
    pub transitions: Vec<Transition>,
    /// For `reboot`: when the agent reported the reboot under way; set while the deployment
    /// waits for the machine to come back running the image, `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebooted_ms: Option<i64>,
    /// What the machine's agent said it runs in its last startup; `None` for no image
    /// BootTorrent booted (or an agent too old to say).
    #[serde(default)]
    pub running: Option<RunningImage>,
}

/// A transition that just happened, for the live event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub deployment: DeploymentId,
    pub machine: MachineId,
    pub state: MachineState,
    pub at_ms: i64,
    pub error: Option<String>,
}

/// What agents need to know about the deployed image, copied into the deployment so that a
/// machine that comes back days later gets the same bytes even if the catalog changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub id: ImageId,
    pub name: String,
    pub info_hash: InfoHash,
    pub sha256: Sha256,
    pub size: u64,
    pub torrent_url: String,
}

#[cfg(test)]
impl ImageRef {
    /// A 100-byte image for tests of deployments and their storage.
    pub fn sample() -> ImageRef {
        ImageRef {
            id: "img".parse().unwrap(),
            name: "img.vhdx".into(),
            info_hash: boottorrent_proto::Bytes([1; 20]),
            sha256: boottorrent_proto::Bytes([2; 32]),
            size: 100,
            torrent_url: "http://server/torrents/01.torrent".into(),
        }
    }
}

/// A deployment as stored: its record, and a row per machine beside it (see `store`), so
/// that the fleet writes, in an event batch's second transaction (after the registry's),
/// the records of the deployments the batch touched and the rows of the machines it moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: DeploymentId,
    pub image: ImageRef,
    pub target: Target,
    pub action: Action,
    pub created_ms: i64,
    pub cancelled_ms: Option<i64>,
    /// Made by a zone's `images` (desired state) rather than by an operator's request.
    #[serde(default)]
    pub zone_image: bool,
    /// Records from before the choice existed kept their child: `keep`.
    #[serde(default)]
    pub persistence: Persistence,
    /// Stored as rows of their own (see `store`), so a machine's progress does not rewrite
    /// the whole fleet's; read here from a record written before that.
    #[serde(default, skip_serializing)]
    pub machines: BTreeMap<MachineId, MachineProgress>,
}

impl Deployment {
    pub fn new(
        id: DeploymentId,
        image: ImageRef,
        target: Target,
        action: Action,
        now_ms: i64,
    ) -> Deployment {
        Deployment {
            id,
            image,
            target,
            action,
            created_ms: now_ms,
            cancelled_ms: None,
            zone_image: false,
            persistence: Persistence::Keep,
            machines: BTreeMap::new(),
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled_ms.is_some()
    }

    /// The command that tells agents to fetch the image.
    pub fn assignment(&self) -> ArtifactAssignment {
        ArtifactAssignment {
            deployment: self.id.clone(),
            image: self.image.id.clone(),
            name: self.image.name.clone(),
            info_hash: self.image.info_hash,
            size: self.image.size,
            sha256: self.image.sha256,
            torrent_url: self.image.torrent_url.clone(),
            save_path: self.image.name.clone(),
            action: self.action.after_download(),
            persistence: self.persistence,
        }
    }

    /// Adds a machine as `pending`; false if it was already in.
    pub fn add_machine(&mut self, machine: &MachineId, bytes_total: u64, now_ms: i64) -> bool {
        if self.machines.contains_key(machine) {
            return false;
        }
        self.machines.insert(
            machine.clone(),
            MachineProgress {
                id: machine.clone(),
                state: MachineState::Pending,
                bytes_done: 0,
                bytes_total,
                download_bps: 0,
                upload_bps: 0,
                peers: 0,
                error: None,
                updated_ms: now_ms,
                transitions: vec![Transition {
                    state: MachineState::Pending,
                    at_ms: now_ms,
                }],
                rebooted_ms: None,
                running: None,
            },
        );
        true
    }

    /// Whether a machine still needs its assignment delivered: it has not got anywhere yet,
    /// or went quiet.
    pub fn wants_assignment(&self, machine: &MachineId) -> bool {
        !self.is_cancelled()
            && self.machines.get(machine).is_some_and(|m| {
                matches!(
                    m.state,
                    MachineState::Pending | MachineState::Downloading | MachineState::Stalled
                )
            })
    }

    /// Applies a `progress` report.
    pub fn on_progress(
        &mut self,
        machine: &MachineId,
        report: &boottorrent_proto::Progress,
        now_ms: i64,
    ) -> Vec<Change> {
        let action = self.action;
        let mut changes = Vec::new();
        let Some((id, m)) = self.live_machine(machine) else {
            return changes;
        };
        let moved = report.bytes_done != m.bytes_done;
        m.bytes_done = report.bytes_done;
        m.bytes_total = report.bytes_total;
        m.download_bps = report.download_bps;
        m.upload_bps = report.upload_bps;
        m.peers = report.peers;
        if moved {
            m.updated_ms = now_ms;
        }
        let reported = match report.state {
            ImageState::Downloading => MachineState::Downloading,
            ImageState::Verifying => MachineState::Verifying,
            ImageState::Staged | ImageState::Seeding => MachineState::Staged,
            // The agent follows a failure with an `error` event that carries the reason.
            ImageState::Failed => return changes,
        };
        // Reports may repeat or arrive late (QoS 0, restarts): never step back to an earlier
        // stage of the pipeline. `stalled` and `failed` are left only on new progress (or, for
        // stalled, a later stage than the one that stalled).
        let rank = |s: MachineState| match s {
            MachineState::Pending | MachineState::Failed | MachineState::Stalled => 0,
            MachineState::Downloading => 1,
            MachineState::Verifying => 2,
            MachineState::Staged => 3,
            MachineState::Booting => 4,
            MachineState::Booted | MachineState::Cancelled => 5,
        };
        let advance = match m.state {
            MachineState::Failed => moved,
            MachineState::Stalled => {
                let before = m.transitions.iter().rev().nth(1).map(|t| t.state);
                moved || before.is_none_or(|b| rank(reported) > rank(b))
            }
            current => rank(reported) > rank(current),
        };
        if advance {
            transition(id, m, reported, None, now_ms, &mut changes);
            if reported == MachineState::Staged && action != Action::Stage {
                // The agent runs the boot action right after staging.
                transition(id, m, MachineState::Booting, None, now_ms, &mut changes);
            }
        }
        changes
    }

    /// Applies a `boot` report (the result of the boot action). For `reboot`, success means
    /// the machine is restarting: it stays `booting` until it comes back ([`Self::on_running`]).
    pub fn on_boot(
        &mut self,
        machine: &MachineId,
        ok: bool,
        message: &str,
        now_ms: i64,
    ) -> Vec<Change> {
        let reboot = self.action == Action::Reboot;
        let mut changes = Vec::new();
        if let Some((id, m)) = self.live_machine(machine) {
            if matches!(m.state, MachineState::Booted | MachineState::Failed) && reboot {
                // A repeated report after the machine came back (or was given up on)
                // changes nothing: what runs decided.
                return changes;
            }
            let (state, error) = match (ok, reboot) {
                (true, false) => (MachineState::Booted, None),
                (true, true) => {
                    m.rebooted_ms = Some(now_ms);
                    (MachineState::Booting, None)
                }
                (false, _) => (MachineState::Failed, Some(format!("boot: {message}"))),
            };
            if state == MachineState::Booting {
                // Already booting since it staged: the wait starts now all the same.
                m.updated_ms = now_ms;
            }
            transition(id, m, state, error, now_ms, &mut changes);
        }
        changes
    }

    /// Applies what a machine's `startup` says it runs: remembered for the view, and, for a
    /// `reboot` deployment waiting for this machine to come back, the verdict: `booted` when
    /// it runs this deployment's image, `failed` naming what it runs otherwise. Returns the
    /// transitions and whether anything changed (the record needs writing).
    pub fn on_running(
        &mut self,
        machine: &MachineId,
        running: Option<&RunningImage>,
        now_ms: i64,
    ) -> (Vec<Change>, bool) {
        let image = self.image.id.clone();
        let reboot = self.action == Action::Reboot;
        let mut changes = Vec::new();
        let Some((id, m)) = self.live_machine(machine) else {
            return (changes, false);
        };
        let mut changed = m.running.as_ref() != running;
        m.running = running.cloned();
        let runs_it = running.is_some_and(|r| r.image == image);
        let booted_for_us = running.is_some_and(|r| r.deployment.as_ref() == Some(id));
        let waiting = m.rebooted_ms.is_some();
        if reboot && (waiting || m.state == MachineState::Booting) {
            if runs_it && (waiting || booted_for_us) {
                // Also without a boot report (lost, or the machine restarted before it left)
                // when the agent recorded the boot for this deployment; a machine merely
                // still running this image from before has not rebooted yet.
                m.rebooted_ms = None;
                transition(id, m, MachineState::Booted, None, now_ms, &mut changes);
                changed = true;
            } else if waiting {
                m.rebooted_ms = None;
                let what = match running {
                    Some(r) => match &r.deployment {
                        Some(d) => format!("image {} (of deployment {d})", r.image),
                        None => format!("image {}", r.image),
                    },
                    None => "no image BootTorrent booted (its old system, or an agent that \
                             cannot tell: see running_image_file)"
                        .to_owned(),
                };
                let error = format!("came back from the reboot running {what}, not image {image}");
                transition(
                    id,
                    m,
                    MachineState::Failed,
                    Some(error),
                    now_ms,
                    &mut changes,
                );
                changed = true;
            }
        }
        (changes, changed)
    }

    /// Fails a machine still waiting `timeout_ms` after its reboot began; nothing for one that
    /// came back, or whose reboot began later than `rebooted_ms` (a stale deadline).
    pub fn reboot_overdue(
        &mut self,
        machine: &MachineId,
        rebooted_ms: i64,
        now_ms: i64,
        timeout_ms: i64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        if let Some((id, m)) = self.live_machine(machine)
            && m.rebooted_ms == Some(rebooted_ms)
            && now_ms - rebooted_ms >= timeout_ms
        {
            m.rebooted_ms = None;
            let error = format!(
                "did not come back within {} s of the reboot (no startup from the machine \
                 since; is it on, and does the booted system start the agent?)",
                timeout_ms / 1000
            );
            transition(
                id,
                m,
                MachineState::Failed,
                Some(error),
                now_ms,
                &mut changes,
            );
        }
        changes
    }

    /// The machines waiting to come back from a reboot, with when the reboot began.
    pub fn rebooting(&self) -> impl Iterator<Item = (&MachineId, i64)> {
        self.machines
            .values()
            .filter(|_| !self.is_cancelled())
            .filter_map(|m| Some((&m.id, m.rebooted_ms?)))
    }

    /// Applies an `error` report for this deployment.
    pub fn on_error(
        &mut self,
        machine: &MachineId,
        code: &str,
        message: &str,
        now_ms: i64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        if let Some((id, m)) = self.live_machine(machine)
            && m.state != MachineState::Failed
        {
            let error = Some(format!("{code}: {message}"));
            transition(id, m, MachineState::Failed, error, now_ms, &mut changes);
        }
        changes
    }

    /// Marks machines whose download, verification or boot made no progress for `timeout_ms`.
    pub fn sweep_stalled(&mut self, now_ms: i64, timeout_ms: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.is_cancelled() {
            return changes;
        }
        for m in self.machines.values_mut() {
            // A machine rebooting is waited for by the reboot timeout instead.
            if m.rebooted_ms.is_none()
                && matches!(
                    m.state,
                    MachineState::Downloading | MachineState::Verifying | MachineState::Booting
                )
                && now_ms - m.updated_ms > timeout_ms
            {
                let error = Some(format!(
                    "no progress for {} s while {}",
                    (now_ms - m.updated_ms) / 1000,
                    m.state.as_str()
                ));
                transition(
                    &self.id,
                    m,
                    MachineState::Stalled,
                    error,
                    now_ms,
                    &mut changes,
                );
            }
        }
        changes
    }

    /// Cancels: every machine not yet in its final state is `cancelled`.
    pub fn cancel(&mut self, now_ms: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.is_cancelled() {
            return changes;
        }
        self.cancelled_ms = Some(now_ms);
        let done = self.action.final_state();
        for m in self.machines.values_mut() {
            // Nothing waits for a cancelled deployment's machines to come back.
            m.rebooted_ms = None;
            if m.state != done {
                transition(
                    &self.id,
                    m,
                    MachineState::Cancelled,
                    None,
                    now_ms,
                    &mut changes,
                );
            }
        }
        changes
    }

    /// The machine's entry, if the deployment is live and the machine in it.
    fn live_machine(
        &mut self,
        machine: &MachineId,
    ) -> Option<(&DeploymentId, &mut MachineProgress)> {
        if self.cancelled_ms.is_some() {
            return None;
        }
        Some((&self.id, self.machines.get_mut(machine)?))
    }

    pub fn overall(&self) -> OverallState {
        if self.is_cancelled() {
            return OverallState::Cancelled;
        }
        let done = self.action.final_state();
        let mut failed = false;
        for m in self.machines.values() {
            match m.state {
                s if s == done => {}
                MachineState::Failed => failed = true,
                _ => return OverallState::Running,
            }
        }
        if failed {
            OverallState::Failed
        } else if self.machines.is_empty() {
            // An open target with no member yet is waiting for machines, not done.
            OverallState::Running
        } else {
            OverallState::Completed
        }
    }

    /// The API's view: the record plus what is derived from it.
    pub fn view(&self) -> DeploymentView<'_> {
        let mut counts = BTreeMap::<&'static str, u64>::new();
        let (mut done, mut total, mut rate) = (0u64, 0u64, 0u64);
        for m in self.machines.values() {
            *counts.entry(m.state.as_str()).or_default() += 1;
            done = done.saturating_add(m.bytes_done);
            total = total.saturating_add(m.bytes_total);
            if matches!(m.state, MachineState::Downloading) {
                rate = rate.saturating_add(m.download_bps);
            }
        }
        DeploymentView {
            id: &self.id,
            image: &self.image.id,
            image_name: &self.image.name,
            info_hash: &self.image.info_hash,
            target: &self.target,
            action: self.action,
            created_ms: self.created_ms,
            cancelled_ms: self.cancelled_ms,
            zone_image: self.zone_image,
            persistence: self.persistence,
            state: self.overall(),
            counts,
            bytes_done: done,
            bytes_total: total,
            download_bps: rate,
            machines: self.machines.values().collect(),
            more_machines: None,
        }
    }

    /// The API's view with at most `rows` machines: those furthest behind first (see
    /// [`behind_first`]), then by id, and how many were left out. For a deployment to a
    /// campus, whose whole view is megabytes, when a reader wants the stragglers.
    pub fn view_cut(&self, rows: usize) -> DeploymentView<'_> {
        let mut view = self.view();
        let done = self.action.final_state();
        // Stable: machines of the same rank stay in id order.
        view.machines.sort_by_key(|m| behind_first(done, m.state));
        let left_out = view.machines.len().saturating_sub(rows);
        view.machines.truncate(rows);
        view.more_machines = Some(left_out as u64);
        view
    }
}

/// Where a machine goes when a deployment's machines are listed for an operator who looks for
/// what is wrong: failed, stalled, then those still on their way (the least far first), the
/// machines in the deployment's final state `done` after them, cancelled ones last.
pub fn behind_first(done: MachineState, state: MachineState) -> u8 {
    if state == done {
        return 8;
    }
    match state {
        MachineState::Failed => 0,
        MachineState::Stalled => 1,
        MachineState::Pending => 2,
        MachineState::Downloading => 3,
        MachineState::Verifying => 4,
        MachineState::Staged => 5,
        MachineState::Booting => 6,
        MachineState::Booted => 7,
        MachineState::Cancelled => 9,
    }
}

/// A deployment as the API shows it (`Deployment` in docs/api.md): the stored record plus
/// what is derived from it. Borrowed from the record, serialized at once.
#[derive(Debug, Serialize)]
pub struct DeploymentView<'a> {
    pub id: &'a DeploymentId,
    pub image: &'a ImageId,
    pub image_name: &'a str,
    pub info_hash: &'a InfoHash,
    pub target: &'a Target,
    pub action: Action,
    pub created_ms: i64,
    pub cancelled_ms: Option<i64>,
    pub zone_image: bool,
    pub persistence: Persistence,
    pub state: OverallState,
    /// Machines in each state; only states that occur.
    pub counts: BTreeMap<&'static str, u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Sum over the machines that are downloading now.
    pub download_bps: u64,
    /// Sorted by machine id; or, asked for at most N (`?machines=N`), those furthest behind
    /// first.
    pub machines: Vec<&'a MachineProgress>,
    /// With `?machines=N`: how many machines `machines` leaves out; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more_machines: Option<u64>,
}

fn transition(
    deployment: &DeploymentId,
    m: &mut MachineProgress,
    state: MachineState,
    error: Option<String>,
    now_ms: i64,
    changes: &mut Vec<Change>,
) {
    if m.state == state {
        return;
    }
    m.state = state;
    m.error = error.clone();
    m.updated_ms = now_ms;
    m.transitions.push(Transition {
        state,
        at_ms: now_ms,
    });
    changes.push(Change {
        deployment: deployment.clone(),
        machine: m.id.clone(),
        state,
        at_ms: now_ms,
        error,
    });
}

/// A fresh deployment id: creation time first, so ids sort by age, and a random suffix so two
/// in the same millisecond differ.
pub fn new_id(now_ms: i64) -> DeploymentId {
    let suffix: u16 = rand::random();
    format!("d-{now_ms}-{suffix:04x}")
        .parse()
        .expect("digits, hex and dashes make a valid id")
}

#[cfg(test)]
mod tests {
    use super::*;
    use boottorrent_proto::Progress;

    fn m(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    fn deployment(action: Action) -> Deployment {
        let mut d = Deployment::new(
            "d-1".parse().unwrap(),
            ImageRef::sample(),
            Target::Zone("lab".parse().unwrap()),
            action,
            0,
        );
        d.add_machine(&m("pc-01"), 100, 0);
        d.add_machine(&m("pc-02"), 100, 0);
        d
    }

    fn progress(done: u64, state: ImageState) -> Progress {
        Progress {
            deployment: "d-1".parse().unwrap(),
            image: "img".parse().unwrap(),
            bytes_done: done,
            bytes_total: 100,
            download_bps: 10,
            upload_bps: 0,
            peers: 1,
            state,
        }
    }

    fn states(changes: &[Change]) -> Vec<&str> {
        changes.iter().map(|c| c.state.as_str()).collect()
    }

    #[test]
    fn set_boot_walks_the_whole_pipeline() {
        let mut d = deployment(Action::SetBoot);
        let pc = m("pc-01");
        assert_eq!(
            states(&d.on_progress(&pc, &progress(10, ImageState::Downloading), 1)),
            ["downloading"]
        );
        assert!(
            d.on_progress(&pc, &progress(50, ImageState::Downloading), 2)
                .is_empty()
        );
        assert_eq!(
            states(&d.on_progress(&pc, &progress(100, ImageState::Verifying), 3)),
            ["verifying"]
        );
        assert_eq!(
            states(&d.on_progress(&pc, &progress(100, ImageState::Staged), 4)),
            ["staged", "booting"]
        );
        // A late `downloading` report does not step back.
        assert!(
            d.on_progress(&pc, &progress(90, ImageState::Downloading), 5)
                .is_empty()
        );
        assert_eq!(states(&d.on_boot(&pc, true, "ok", 6)), ["booted"]);
        assert_eq!(d.overall(), OverallState::Running, "pc-02 is pending");
        let t: Vec<_> = d.machines[&pc]
            .transitions
            .iter()
            .map(|t| (t.state.as_str(), t.at_ms))
            .collect();
        assert_eq!(
            t,
            [
                ("pending", 0),
                ("downloading", 1),
                ("verifying", 3),
                ("staged", 4),
                ("booting", 4),
                ("booted", 6)
            ]
        );
        d.on_error(&m("pc-02"), "disk_full", "no room", 7);
        assert_eq!(d.overall(), OverallState::Failed);
        assert_eq!(
            d.machines[&m("pc-02")].error.as_deref(),
            Some("disk_full: no room")
        );
    }

    fn runs(image: &str, deployment: Option<&str>) -> RunningImage {
        RunningImage {
            image: image.parse().unwrap(),
            deployment: deployment.map(|d| d.parse().unwrap()),
        }
    }

    /// A `reboot` deployment with pc-01 staged and its boot backend done at `t = 10`.
    fn rebooting() -> Deployment {
        let mut d = deployment(Action::Reboot);
        let pc = m("pc-01");
        assert_eq!(
            states(&d.on_progress(&pc, &progress(100, ImageState::Staged), 1)),
            ["staged", "booting"]
        );
        assert!(
            d.on_boot(&pc, true, "rebooting", 10).is_empty(),
            "still booting: the backend returning is not the machine running it"
        );
        assert_eq!(d.machines[&pc].rebooted_ms, Some(10));
        assert_eq!(d.rebooting().collect::<Vec<_>>(), [(&pc, 10)]);
        d
    }

    #[test]
    fn reboot_is_booted_when_the_machine_runs_the_image() {
        let mut d = rebooting();
        let pc = m("pc-01");
        // Progress and a late boot report from the rebooted agent do not decide anything.
        d.on_progress(&pc, &progress(100, ImageState::Seeding), 20);
        assert_eq!(d.machines[&pc].state, MachineState::Booting);
        let (changes, changed) = d.on_running(&pc, Some(&runs("img", Some("d-1"))), 30);
        assert_eq!(states(&changes), ["booted"]);
        assert!(changed);
        assert_eq!(d.machines[&pc].rebooted_ms, None);
        assert_eq!(d.machines[&pc].running, Some(runs("img", Some("d-1"))));
        assert!(d.on_boot(&pc, true, "again", 31).is_empty());
        // Later startups only update what it runs.
        let (changes, changed) = d.on_running(&pc, None, 40);
        assert!(changes.is_empty() && changed);
        assert_eq!(d.machines[&pc].state, MachineState::Booted);
        assert!(d.reboot_overdue(&pc, 10, 10_000_000, 1000).is_empty());
    }

    #[test]
    fn reboot_into_the_old_system_fails_naming_what_runs() {
        let mut d = rebooting();
        let pc = m("pc-01");
        let (changes, _) = d.on_running(&pc, Some(&runs("old", Some("d-0"))), 30);
        assert_eq!(states(&changes), ["failed"]);
        let error = d.machines[&pc].error.clone().unwrap();
        assert!(
            error.contains("image old (of deployment d-0)") && error.contains("not image img"),
            "{error}"
        );
        let mut d = rebooting();
        let (changes, _) = d.on_running(&pc, None, 30);
        assert_eq!(states(&changes), ["failed"]);
        assert!(
            d.machines[&pc]
                .error
                .as_deref()
                .unwrap()
                .contains("running no image BootTorrent booted")
        );
        assert_eq!(d.overall(), OverallState::Running, "pc-02 is pending");
    }

    #[test]
    fn reboot_that_never_comes_back_fails_after_the_timeout() {
        let mut d = rebooting();
        let pc = m("pc-01");
        // The stall sweep leaves a rebooting machine to the reboot timeout.
        assert!(d.sweep_stalled(10_000_000, 1000).is_empty());
        assert!(d.reboot_overdue(&pc, 10, 1009, 1000).is_empty());
        assert!(
            d.reboot_overdue(&pc, 9, 5000, 1000).is_empty(),
            "a stale deadline"
        );
        assert_eq!(states(&d.reboot_overdue(&pc, 10, 1010, 1000)), ["failed"]);
        let error = d.machines[&pc].error.clone().unwrap();
        assert!(error.contains("did not come back within 1 s"), "{error}");
        assert_eq!(d.rebooting().count(), 0);
        let mut d = rebooting();
        d.cancel(20);
        assert_eq!(d.rebooting().count(), 0);
        assert!(d.reboot_overdue(&pc, 10, 1010, 1000).is_empty());
    }

    #[test]
    fn a_startup_before_the_reboot_decides_nothing() {
        let mut d = deployment(Action::Reboot);
        let pc = m("pc-01");
        d.on_progress(&pc, &progress(100, ImageState::Staged), 1);
        // The agent reconnects while its backend runs, already running this image from an
        // earlier deployment: not this deployment's reboot.
        let (changes, changed) = d.on_running(&pc, Some(&runs("img", Some("d-0"))), 2);
        assert!(changes.is_empty() && changed);
        assert_eq!(d.machines[&pc].state, MachineState::Booting);
        // Its boot report was lost, but the agent recorded the boot for this deployment.
        let (changes, _) = d.on_running(&pc, Some(&runs("img", Some("d-1"))), 3);
        assert_eq!(states(&changes), ["booted"]);
        // `set_boot` is booted when the entry is set; what runs does not matter.
        let mut d = deployment(Action::SetBoot);
        d.on_progress(&pc, &progress(100, ImageState::Staged), 1);
        assert_eq!(states(&d.on_boot(&pc, true, "entry set", 2)), ["booted"]);
        assert!(d.on_running(&pc, None, 3).0.is_empty());
    }

    /// A campus deployment cut short for a reader shows what is wrong first and says how many
    /// machines it left out; the whole view is unchanged.
    #[test]
    fn a_cut_view_lists_the_machines_furthest_behind_first() {
        let mut d = deployment(Action::Stage);
        let set = |d: &mut Deployment, id: &str, state| {
            d.add_machine(&m(id), 100, 0);
            d.machines.get_mut(&m(id)).unwrap().state = state;
        };
        set(&mut d, "pc-01", MachineState::Staged);
        set(&mut d, "pc-02", MachineState::Downloading);
        set(&mut d, "pc-03", MachineState::Failed);
        set(&mut d, "pc-04", MachineState::Pending);
        set(&mut d, "pc-05", MachineState::Stalled);
        set(&mut d, "pc-06", MachineState::Staged);
        set(&mut d, "pc-07", MachineState::Downloading);
        let ids = |v: &DeploymentView| -> Vec<String> {
            v.machines.iter().map(|m| m.id.to_string()).collect()
        };
        let cut = d.view_cut(5);
        assert_eq!(ids(&cut), ["pc-03", "pc-05", "pc-04", "pc-02", "pc-07"]);
        assert_eq!(cut.more_machines, Some(2));
        assert_eq!(cut.counts["staged"], 2, "counts are over every machine");
        let json = serde_json::to_value(d.view_cut(0)).unwrap();
        assert_eq!(json["machines"], serde_json::json!([]));
        assert_eq!(json["more_machines"], 7);
        let whole = serde_json::to_value(d.view()).unwrap();
        assert!(whole.get("more_machines").is_none(), "{whole}");
        assert_eq!(whole["machines"][0]["id"], "pc-01", "in id order");
        // For `set_boot`, `staged` is on the way: before `booted`, which is done.
        let mut d = deployment(Action::SetBoot);
        set(&mut d, "pc-01", MachineState::Booted);
        set(&mut d, "pc-02", MachineState::Staged);
        set(&mut d, "pc-03", MachineState::Cancelled);
        assert_eq!(ids(&d.view_cut(10)), ["pc-02", "pc-01", "pc-03"]);
        assert_eq!(d.view_cut(10).more_machines, Some(0));
    }

    #[test]
    fn stage_ends_at_staged_and_completes() {
        let mut d = deployment(Action::Stage);
        for pc in ["pc-01", "pc-02"] {
            assert_eq!(
                states(&d.on_progress(&m(pc), &progress(100, ImageState::Staged), 1)),
                ["staged"]
            );
        }
        assert_eq!(d.overall(), OverallState::Completed);
        let view = serde_json::to_value(d.view()).unwrap();
        assert_eq!(view["state"], "completed");
        assert_eq!(view["counts"]["staged"], 2);
        assert_eq!(view["bytes_done"], 200);
    }

    #[test]
    fn stalled_after_silence_and_back_on_progress() {
        let mut d = deployment(Action::Stage);
        let pc = m("pc-01");
        d.on_progress(&pc, &progress(10, ImageState::Downloading), 1_000);
        // Same bytes again: a report, but no progress.
        d.on_progress(&pc, &progress(10, ImageState::Downloading), 50_000);
        assert!(d.sweep_stalled(60_000, 60_000).is_empty());
        assert_eq!(states(&d.sweep_stalled(61_001, 60_000)), ["stalled"]);
        assert!(d.machines[&pc].error.as_deref().unwrap().contains("60 s"));
        assert!(
            d.on_progress(&pc, &progress(10, ImageState::Downloading), 62_000)
                .is_empty()
        );
        assert_eq!(
            states(&d.on_progress(&pc, &progress(11, ImageState::Downloading), 63_000)),
            ["downloading"]
        );
        assert_eq!(d.machines[&pc].error, None);
    }

    #[test]
    fn cancel_freezes_the_deployment() {
        let mut d = deployment(Action::Stage);
        d.on_progress(&m("pc-01"), &progress(100, ImageState::Staged), 1);
        assert_eq!(states(&d.cancel(2)), ["cancelled"], "pc-01 was done");
        assert!(d.cancel(3).is_empty());
        assert!(
            d.on_progress(&m("pc-02"), &progress(5, ImageState::Downloading), 4)
                .is_empty()
        );
        assert!(!d.wants_assignment(&m("pc-02")));
        assert_eq!(d.overall(), OverallState::Cancelled);
    }

    #[test]
    fn wire_names() {
        assert_eq!(
            serde_json::to_value(Target::Zone("lab".parse().unwrap())).unwrap(),
            serde_json::json!({"zone": "lab"})
        );
        assert_eq!(
            serde_json::from_value::<Target>(serde_json::json!({"machines": ["a", "b"]})).unwrap(),
            Target::Machines(vec![m("a"), m("b")])
        );
        assert!(serde_json::from_value::<Target>(serde_json::json!({"zone": "a b"})).is_err());
        assert_eq!(
            serde_json::to_value(Action::SetBoot).unwrap(),
            serde_json::json!("set_boot")
        );
        let id = new_id(1_764_028_800_123);
        assert!(id.as_str().starts_with("d-1764028800123-"), "{id}");
    }
}
