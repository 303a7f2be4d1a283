//! The fleet's desired state: zones and deployments, and the reconciliation that brings
//! machines to it.
//!
//! Owned by the orchestrator task, like the registry: it is the only writer of zones and
//! deployments, so it keeps them in memory and writes each change through to redb in the same
//! step that made it (a `kill -9` loses nothing that was answered).
//!
//! Commands leave rumqttd's in-process link at QoS 0 and the broker keeps nothing on disk, so
//! delivery is not the broker's job: a zone or global deployment is published once to the
//! zone or global topic, and every `startup` or `heartbeat` of a targeted machine that does
//! not show the image is answered with the assignment on the machine's own topic. Offline
//! machines, lost messages, machines that join a zone later and a server restart are all the
//! same case.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use boottorrent_proto::{
    ArtifactUnassignment, Command, CommandKind, DeploymentId, Encoding, Event, MachineId,
    Persistence, Scope, Topic, ZoneId,
};
use tokio::sync::broadcast;

use crate::api::{Action, Target, ZoneSource};
use crate::server::deployment::{Change, Deployment, ImageRef, new_id};
use crate::server::passkey::Grants;
use crate::server::registry::{Accepted, Outgoing, Signer, encoding_of};
use crate::server::store::{Batch, MachineRecord, Store, StoreError};
use crate::server::zone::{ConfigZone, Zone, ZoneSpec};

/// Progress of one deployment is broadcast at most this often; transitions at once.
const SHOW_EVERY: std::time::Duration = std::time::Duration::from_millis(1000);

/// A machine that does not show its assignment is sent it again at most this often (ms), so a
/// burst of heartbeats does not become a burst of commands.
const RESEND_EVERY_MS: i64 = 10_000;

/// One server-sent event for `GET /api/v1/events`.
#[derive(Debug, Clone)]
pub struct Live {
    pub kind: &'static str,
    /// The event's JSON, as most watchers get it.
    pub data: String,
    /// For a `deployment` event, the deployment itself: a watcher that asked for at most N
    /// machine rows (`?machines=N`, the dashboard) writes its own cut from it instead of
    /// reading megabytes of a campus deployment's `data` every second.
    pub deployment: Option<Arc<Deployment>>,
}

impl Live {
    pub fn new(kind: &'static str, data: &impl serde::Serialize) -> Live {
        Live {
            kind,
            data: serde_json::to_string(data).unwrap_or_else(|_| "null".into()),
            deployment: None,
        }
    }

    /// A `deployment` event: its whole view, and the deployment for the cut views.
    pub fn deployment(d: Deployment) -> Live {
        let whole = Live::new("deployment", &d.view());
        Live {
            deployment: Some(Arc::new(d)),
            ..whole
        }
    }
}

/// Why a request about zones or deployments was refused.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A deployment as the operator asks for it, with the image already resolved and checked.
#[derive(Debug, Clone)]
pub struct NewDeployment {
    pub image: ImageRef,
    pub target: Target,
    pub action: Action,
    pub persistence: Persistence,
}

/// The deployments a batch of events moved, between [`Fleet::apply_in`] and
/// [`Fleet::finish`]: (deployment, machine, whether the machine joined it) and the
/// transitions.
pub struct Moved {
    touched: Vec<(DeploymentId, MachineId, bool)>,
    changes: Vec<Change>,
}

pub struct Fleet {
    store: Store,
    zones: Vec<Zone>,
    deployments: BTreeMap<DeploymentId, Deployment>,
    stall_timeout_ms: i64,
    reboot_timeout_ms: i64,
    /// Machines waiting to come back from a reboot: (when it began, deployment, machine),
    /// earliest first, so the sweep looks at the overdue ones only, not at every machine.
    /// An entry whose machine came back meanwhile is dropped when its time comes.
    rebooting: BTreeSet<(i64, DeploymentId, MachineId)>,
    live: broadcast::Sender<Live>,
    shown: HashMap<DeploymentId, Instant>,
    resent: HashMap<(DeploymentId, MachineId), i64>,
    /// What each machine's passkey opens, kept in step with the deployments' members.
    grants: Grants,
}

impl Fleet {
    /// Loads zones and deployments; zones from the config file are written over stored ones
    /// that came from the file, never over ones the operator set through the API.
    pub fn load(
        store: Store,
        config_zones: &[ConfigZone],
        stall_timeout_secs: u32,
        reboot_timeout_secs: u32,
        live: broadcast::Sender<Live>,
        grants: Grants,
    ) -> Result<Fleet, StoreError> {
        let stored = store.zones()?;
        store.write(|batch| {
            for cz in config_zones {
                let api_owned = stored
                    .iter()
                    .any(|z| z.id == cz.id && z.source == ZoneSource::Api);
                if api_owned {
                    tracing::info!(zone = %cz.id, "zone set through the API overrides the config file's");
                    continue;
                }
                // Checked when the config was loaded.
                if let Ok(zone) = cz.to_zone() {
                    batch.put_zone(&zone)?;
                }
            }
            Ok(())
        })?;
        let zones = store.zones()?;
        let deployments: BTreeMap<DeploymentId, Deployment> = store
            .deployments()?
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let members: HashSet<MachineId> = deployments
            .values()
            .flat_map(|d| d.machines.keys().cloned())
            .collect();
        let rebooting = deployments
            .values()
            .flat_map(|d| d.rebooting().map(|(m, at)| (at, d.id.clone(), m.clone())))
            .collect();
        let fleet = Fleet {
            store,
            zones,
            deployments,
            stall_timeout_ms: i64::from(stall_timeout_secs) * 1000,
            reboot_timeout_ms: i64::from(reboot_timeout_secs) * 1000,
            rebooting,
            live,
            shown: HashMap::new(),
            resent: HashMap::new(),
            grants,
        };
        fleet.regrant(members.iter());
        Ok(fleet)
    }

    /// Recomputes what `machines` may fetch: the images of the deployments that include them
    /// and are not cancelled. Called whenever one joins or leaves a deployment.
    fn regrant<'a>(&self, machines: impl IntoIterator<Item = &'a MachineId>) {
        for machine in machines {
            let given = self
                .deployments
                .values()
                .filter(|d| !d.is_cancelled() && d.machines.contains_key(machine))
                .map(|d| d.image.info_hash.0)
                .collect();
            self.grants.set(machine, given);
        }
    }

    pub fn zones(&self) -> &[Zone] {
        &self.zones
    }

    /// Applies events from trusted machines inside `batch`, a transaction the caller commits
    /// (with the registry's changes of the same events): progress, boot results and errors
    /// move their deployments; startups and heartbeats are reconciled against the desired
    /// state. Hand what this returns, with whether the commit worked, to [`Fleet::finish`].
    pub fn apply_in(
        &mut self,
        batch: &mut Batch<'_>,
        accepted: &[Accepted],
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<(Vec<Outgoing>, Moved), StoreError> {
        let (out, moved) = self.plan(accepted, signer, now_ms);
        self.write_rows(batch, &moved.touched)?;
        Ok((out, moved))
    }

    /// After the transaction of [`Fleet::apply_in`] committed (`Some`) or failed (`None`).
    pub fn finish(&mut self, moved: Option<&Moved>) {
        match moved {
            Some(moved) => self.committed(&moved.touched, &moved.changes),
            None => self.reload(),
        }
    }

    /// What [`Fleet::apply_in`] does in memory: the deployments moved, the commands to send.
    fn plan(
        &mut self,
        accepted: &[Accepted],
        signer: &mut Signer,
        now_ms: i64,
    ) -> (Vec<Outgoing>, Moved) {
        let mut out = Vec::new();
        let mut touched = Vec::new();
        let mut changes = Vec::new();
        let mut joiners = Vec::new();
        for Accepted { machine, event } in accepted {
            match event {
                Event::Progress(p) => {
                    if let Some(d) = self.deployments.get_mut(&p.deployment) {
                        let joined = d.target.is_open()
                            && !d.is_cancelled()
                            && d.target.includes(&machine.id, &machine.zones)
                            && d.add_machine(&machine.id, d.image.size, now_ms);
                        changes.extend(d.on_progress(&machine.id, p, now_ms));
                        touched.push((d.id.clone(), machine.id.clone(), joined));
                        if joined {
                            joiners.push(&machine.id);
                        }
                    }
                }
                Event::Boot(report) => {
                    if let Some(d) = report
                        .deployment
                        .as_ref()
                        .and_then(|id| self.deployments.get_mut(id))
                    {
                        changes.extend(d.on_boot(&machine.id, report.ok, &report.message, now_ms));
                        if let Some(at) = d.machines.get(&machine.id).and_then(|m| m.rebooted_ms) {
                            self.rebooting
                                .insert((at, d.id.clone(), machine.id.clone()));
                        }
                        touched.push((d.id.clone(), machine.id.clone(), false));
                    }
                }
                Event::Error(report) => {
                    if let Some(d) = report
                        .deployment
                        .as_ref()
                        .and_then(|id| self.deployments.get_mut(id))
                    {
                        changes.extend(d.on_error(
                            &machine.id,
                            &report.code,
                            &report.message,
                            now_ms,
                        ));
                        touched.push((d.id.clone(), machine.id.clone(), false));
                    }
                }
                Event::Startup(_) | Event::Heartbeat(_) => {
                    if let Event::Startup(startup) = event {
                        // What runs changes only with a restart, and every start sends a
                        // startup: the deployments the machine is in learn it here.
                        for d in self.deployments.values_mut() {
                            if !d.machines.contains_key(&machine.id) {
                                continue;
                            }
                            let (c, changed) =
                                d.on_running(&machine.id, startup.running.as_ref(), now_ms);
                            changes.extend(c);
                            if changed {
                                touched.push((d.id.clone(), machine.id.clone(), false));
                            }
                        }
                    }
                    let forced = matches!(event, Event::Startup(_));
                    let joined = self.reconcile(machine, forced, signer, now_ms, &mut out);
                    if !joined.is_empty() {
                        joiners.push(&machine.id);
                    }
                    touched.extend(joined.into_iter().map(|id| (id, machine.id.clone(), true)));
                }
                Event::Status(_) | Event::Shutdown(_) => {}
            }
        }
        self.regrant(joiners);
        (out, Moved { touched, changes })
    }

    /// Reconciles machines whose zones changed, now rather than at their next heartbeat.
    pub fn rezoned(
        &mut self,
        machines: &[MachineRecord],
        signer: &mut Signer,
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) {
        let mut touched = Vec::new();
        let mut joiners = Vec::new();
        for machine in machines.iter().filter(|m| m.online) {
            let joined = self.reconcile(machine, false, signer, now_ms, out);
            if !joined.is_empty() {
                joiners.push(&machine.id);
            }
            touched.extend(joined.into_iter().map(|id| (id, machine.id.clone(), true)));
        }
        self.regrant(joiners);
        self.commit(&touched, &[]);
    }

    /// Brings one machine to the desired state: joins it to open deployments that target it,
    /// sends assignments it does not show, and withdraws images of cancelled deployments it
    /// still holds. `forced` skips the resend throttle (the agent just started). Returns the
    /// deployments it joined.
    fn reconcile(
        &mut self,
        machine: &MachineRecord,
        forced: bool,
        signer: &mut Signer,
        now_ms: i64,
        out: &mut Vec<Outgoing>,
    ) -> Vec<DeploymentId> {
        let mut joined = Vec::new();
        let holds = |d: &Deployment| {
            machine
                .images
                .iter()
                .any(|h| h.image == d.image.id && h.info_hash == d.image.info_hash)
        };
        let mut send = Vec::new();
        for d in self.deployments.values_mut() {
            if d.is_cancelled() {
                continue;
            }
            if d.target.is_open()
                && d.target.includes(&machine.id, &machine.zones)
                && d.add_machine(&machine.id, d.image.size, now_ms)
            {
                joined.push(d.id.clone());
            }
            if d.wants_assignment(&machine.id) && !holds(d) {
                let key = (d.id.clone(), machine.id.clone());
                let due = self
                    .resent
                    .get(&key)
                    .is_none_or(|at| now_ms - at >= RESEND_EVERY_MS);
                if forced || due {
                    self.resent.insert(key, now_ms);
                    send.push(Command::ArtifactAssignment(d.assignment()));
                }
            }
        }
        // An image this machine holds that only cancelled deployments asked of it.
        for held in &machine.images {
            let wanted = self.deployments.values().any(|d| {
                !d.is_cancelled()
                    && d.image.id == held.image
                    && d.machines.contains_key(&machine.id)
            });
            let withdrawn = self.deployments.values().find(|d| {
                d.is_cancelled() && d.image.id == held.image && d.machines.contains_key(&machine.id)
            });
            if let (false, Some(d)) = (wanted, withdrawn) {
                send.push(Command::ArtifactUnassignment(ArtifactUnassignment {
                    deployment: d.id.clone(),
                    image: held.image.clone(),
                }));
            }
        }
        for command in send {
            push(
                signer,
                Scope::Machine(machine.id.clone()),
                command,
                encoding_of(machine),
                now_ms,
                out,
            );
        }
        joined
    }

    /// Starts a deployment: records it with every current member `pending` and publishes the
    /// assignment once to the target's topic.
    pub fn create(
        &mut self,
        request: NewDeployment,
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<(Deployment, Vec<Outgoing>), FleetError> {
        if request.persistence == Persistence::Reset && request.action == Action::Stage {
            return Err(FleetError::Invalid(
                "persistence \"reset\" gives a booted machine a fresh child at every boot, and \
                 action \"stage\" boots nothing; use action \"set_boot\" or \"reboot\""
                    .into(),
            ));
        }
        let machines = self.store.machines()?;
        let approved = |m: &MachineId| {
            machines
                .iter()
                .any(|(r, k)| &r.id == m && k.approved.is_some())
        };
        let members: Vec<MachineId> = match &request.target {
            Target::Global(true) => machines
                .iter()
                .filter(|(_, k)| k.approved.is_some())
                .map(|(r, _)| r.id.clone())
                .collect(),
            Target::Global(false) => {
                return Err(FleetError::Invalid(
                    "target {\"global\": false} targets nothing; use {\"global\": true}".into(),
                ));
            }
            Target::Zone(zone) => {
                if !self.zones.iter().any(|z| &z.id == zone) {
                    return Err(FleetError::NotFound(format!(
                        "no zone {zone}; `boottorrent zones list` shows the zones"
                    )));
                }
                machines
                    .iter()
                    .filter(|(r, k)| k.approved.is_some() && r.zones.contains(zone))
                    .map(|(r, _)| r.id.clone())
                    .collect()
            }
            Target::Machines(list) => {
                if list.is_empty() {
                    return Err(FleetError::Invalid(
                        "target names no machines; give at least one machine id".into(),
                    ));
                }
                let unknown: Vec<&str> = list
                    .iter()
                    .filter(|m| !approved(m))
                    .map(|m| m.as_str())
                    .collect();
                if !unknown.is_empty() {
                    return Err(FleetError::NotFound(format!(
                        "unknown or unapproved machine(s): {}; `boottorrent machines list` shows them",
                        unknown.join(", ")
                    )));
                }
                let mut list = list.clone();
                list.sort();
                list.dedup();
                list
            }
        };
        let mut d = Deployment::new(
            new_id(now_ms),
            request.image,
            request.target,
            request.action,
            now_ms,
        );
        d.persistence = request.persistence;
        for m in &members {
            d.add_machine(m, d.image.size, now_ms);
        }
        self.store.write(|batch| {
            batch.put_deployment(&d)?;
            batch.log(
                now_ms,
                None,
                "deployment",
                format!(
                    "{} created: image {} to {}, action {:?}, {} machine(s)",
                    d.id,
                    d.image.name,
                    d.target,
                    d.action,
                    members.len()
                ),
            )
        })?;
        let mut out = Vec::new();
        // Heartbeats that arrive before the agents have acted on the broadcast must not
        // repeat it at once.
        for m in &members {
            self.resent.insert((d.id.clone(), m.clone()), now_ms);
        }
        let command = || Command::ArtifactAssignment(d.assignment());
        match &d.target {
            Target::Global(_) => push(
                signer,
                Scope::Global,
                command(),
                Encoding::MessagePack,
                now_ms,
                &mut out,
            ),
            Target::Zone(zone) => push(
                signer,
                Scope::Zone(zone.clone()),
                command(),
                Encoding::MessagePack,
                now_ms,
                &mut out,
            ),
            Target::Machines(_) => {
                for (record, _) in machines.iter().filter(|(r, _)| members.contains(&r.id)) {
                    push(
                        signer,
                        Scope::Machine(record.id.clone()),
                        command(),
                        encoding_of(record),
                        now_ms,
                        &mut out,
                    );
                }
            }
        }
        tracing::info!(deployment = %d.id, image = %d.image.id, target = %d.target, machines = members.len(), "deployment started");
        self.deployments.insert(d.id.clone(), d.clone());
        self.regrant(&members);
        self.show(&d.id, true);
        Ok((d, out))
    }

    /// Cancels a deployment: agents are told to drop the image; machines that miss the
    /// message are told at their next heartbeat.
    pub fn cancel(
        &mut self,
        id: &DeploymentId,
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<(Deployment, Vec<Outgoing>), FleetError> {
        let Some(d) = self.deployments.get_mut(id) else {
            return Err(FleetError::NotFound(format!(
                "no deployment {id}; `boottorrent deployments list` shows them"
            )));
        };
        if d.is_cancelled() {
            return Ok((d.clone(), Vec::new()));
        }
        let changes = d.cancel(now_ms);
        let d = d.clone();
        self.store.write(|batch| {
            batch.put_deployment(&d)?;
            batch.log(now_ms, None, "deployment", format!("{} cancelled", d.id))
        })?;
        let command = || {
            Command::ArtifactUnassignment(ArtifactUnassignment {
                deployment: d.id.clone(),
                image: d.image.id.clone(),
            })
        };
        let mut out = Vec::new();
        let scopes: Vec<Scope> = match &d.target {
            Target::Global(_) => vec![Scope::Global],
            Target::Zone(zone) => vec![Scope::Zone(zone.clone())],
            Target::Machines(list) => list.iter().cloned().map(Scope::Machine).collect(),
        };
        for scope in scopes {
            push(
                signer,
                scope,
                command(),
                Encoding::MessagePack,
                now_ms,
                &mut out,
            );
        }
        tracing::info!(deployment = %d.id, "deployment cancelled");
        self.regrant(d.machines.keys());
        self.announce(&changes);
        self.show(&d.id, true);
        Ok((d, out))
    }

    /// Creates or replaces a zone (operator's API). The zone's images become stage
    /// deployments to the zone; images no longer listed have theirs cancelled. The caller
    /// recomputes memberships.
    pub fn put_zone(
        &mut self,
        id: ZoneId,
        spec: ZoneSpec,
        images: &[ImageRef],
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<(Zone, Vec<Outgoing>), FleetError> {
        let zone = Zone::new(id, spec, ZoneSource::Api).map_err(FleetError::Invalid)?;
        self.store.write(|batch| {
            batch.put_zone(&zone)?;
            batch.log(now_ms, None, "zone", format!("zone {} set", zone.id))
        })?;
        self.zones.retain(|z| z.id != zone.id);
        self.zones.push(zone.clone());
        self.zones.sort_by(|a, b| a.id.cmp(&b.id));
        let out = self.sync_zone_images(&zone.id, images, signer, now_ms)?;
        Ok((zone, out))
    }

    /// Deletes a zone and cancels its image deployments.
    pub fn delete_zone(
        &mut self,
        id: &ZoneId,
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<(Zone, Vec<Outgoing>), FleetError> {
        let Some(zone) = self.zones.iter().find(|z| &z.id == id).cloned() else {
            return Err(FleetError::NotFound(format!(
                "no zone {id}; `boottorrent zones list` shows the zones"
            )));
        };
        self.store.write(|batch| {
            batch.delete_zone(id)?;
            batch.log(now_ms, None, "zone", format!("zone {id} deleted"))
        })?;
        self.zones.retain(|z| &z.id != id);
        let out = self.sync_zone_images(id, &[], signer, now_ms)?;
        Ok((zone, out))
    }

    /// Makes the zone's image deployments match `images`.
    fn sync_zone_images(
        &mut self,
        zone: &ZoneId,
        images: &[ImageRef],
        signer: &mut Signer,
        now_ms: i64,
    ) -> Result<Vec<Outgoing>, FleetError> {
        let target = Target::Zone(zone.clone());
        let current: Vec<(DeploymentId, ImageRef)> = self
            .deployments
            .values()
            .filter(|d| d.zone_image && !d.is_cancelled() && d.target == target)
            .map(|d| (d.id.clone(), d.image.clone()))
            .collect();
        let mut out = Vec::new();
        for (id, image) in &current {
            if !images.iter().any(|i| i.id == image.id) {
                out.extend(self.cancel(id, signer, now_ms)?.1);
            }
        }
        for image in images {
            if current.iter().any(|(_, i)| i.id == image.id) {
                continue;
            }
            let (d, more) = self.create(
                NewDeployment {
                    image: image.clone(),
                    target: target.clone(),
                    action: Action::Stage,
                    persistence: Persistence::Keep,
                },
                signer,
                now_ms,
            )?;
            out.extend(more);
            if let Some(d) = self.deployments.get_mut(&d.id) {
                d.zone_image = true;
                let d = d.clone();
                self.store.write(|batch| batch.put_deployment(&d))?;
            }
        }
        Ok(out)
    }

    /// Marks machines without progress as stalled, and machines that did not come back from a
    /// reboot in time as failed.
    pub fn sweep(&mut self, now_ms: i64) {
        let mut changes = Vec::new();
        let mut touched = Vec::new();
        while let Some((at, _, _)) = self.rebooting.first()
            && now_ms - at >= self.reboot_timeout_ms
        {
            let Some((at, id, machine)) = self.rebooting.pop_first() else {
                break;
            };
            if let Some(d) = self.deployments.get_mut(&id) {
                let c = d.reboot_overdue(&machine, at, now_ms, self.reboot_timeout_ms);
                if !c.is_empty() {
                    touched.push((id, machine, true));
                    changes.extend(c);
                }
            }
        }
        for d in self.deployments.values_mut() {
            let c = d.sweep_stalled(now_ms, self.stall_timeout_ms);
            touched.extend(c.iter().map(|c| (d.id.clone(), c.machine.clone(), true)));
            changes.extend(c);
        }
        if !touched.is_empty() {
            self.commit(&touched, &changes);
        }
    }

    /// Writes what changed, in one transaction: the touched machines' rows and their
    /// deployments' small records, never a whole fleet's rows for one machine's progress.
    /// Then tells live watchers. On a store failure the in-memory state is reloaded from the
    /// store, so memory never runs ahead of what is durable; the agents' next reports bring
    /// the lost changes back.
    fn commit(&mut self, touched: &[(DeploymentId, MachineId, bool)], changes: &[Change]) {
        if touched.is_empty() {
            return;
        }
        let store = self.store.clone();
        match store.write(|batch| self.write_rows(batch, touched)) {
            Ok(()) => self.committed(touched, changes),
            Err(e) => {
                tracing::error!(error = %e, "could not store deployment progress; reloading the last stored state");
                self.reload();
            }
        }
    }

    /// Writes the deployments `touched` names: each one's record and the rows of the
    /// machines it names.
    fn write_rows(
        &self,
        batch: &mut Batch<'_>,
        touched: &[(DeploymentId, MachineId, bool)],
    ) -> Result<(), StoreError> {
        let mut ids: Vec<&DeploymentId> = touched.iter().map(|(id, _, _)| id).collect();
        ids.sort();
        ids.dedup();
        let mut rows: Vec<(&DeploymentId, &MachineId)> =
            touched.iter().map(|(id, m, _)| (id, m)).collect();
        rows.sort();
        rows.dedup();
        for id in &ids {
            if let Some(d) = self.deployments.get(*id) {
                batch.put_deployment_header(d)?;
            }
        }
        for (id, machine) in &rows {
            if let Some(m) = self
                .deployments
                .get(*id)
                .and_then(|d| d.machines.get(*machine))
            {
                batch.put_deployment_machine(id, m)?;
            }
        }
        Ok(())
    }

    /// The deployments as last stored, after a write that failed.
    fn reload(&mut self) {
        if let Ok(stored) = self.store.deployments() {
            self.deployments = stored.into_iter().map(|d| (d.id.clone(), d)).collect();
        }
    }

    /// After the deployments `touched` were committed: the transitions logged and shown.
    fn committed(&mut self, touched: &[(DeploymentId, MachineId, bool)], changes: &[Change]) {
        if touched.is_empty() {
            return;
        }
        let mut ids: Vec<&DeploymentId> = touched.iter().map(|(id, _, _)| id).collect();
        ids.sort();
        ids.dedup();
        for change in changes {
            let state = change.state.as_str();
            match &change.error {
                Some(error) => {
                    tracing::warn!(deployment = %change.deployment, machine = %change.machine, state, %error, "deployment transition")
                }
                None => {
                    tracing::info!(deployment = %change.deployment, machine = %change.machine, state, "deployment transition")
                }
            }
        }
        self.announce(changes);
        for id in ids {
            let changed = touched.iter().any(|(t, _, forced)| t == id && *forced)
                || changes.iter().any(|c| &c.deployment == id);
            self.show(id, changed);
        }
    }

    fn announce(&self, changes: &[Change]) {
        for change in changes {
            let _ = self.live.send(Live::new("transition", change));
        }
    }

    /// Broadcasts a deployment's view: always when `changed`, else at most every second.
    fn show(&mut self, id: &DeploymentId, changed: bool) {
        let now = Instant::now();
        let due = self
            .shown
            .get(id)
            .is_none_or(|at| now.duration_since(*at) >= SHOW_EVERY);
        if !(changed || due) {
            return;
        }
        if let Some(d) = self.deployments.get(id) {
            let _ = self.live.send(Live::deployment(d.clone()));
            self.shown.insert(id.clone(), now);
        }
    }
}

fn push(
    signer: &mut Signer,
    scope: Scope,
    command: Command,
    encoding: Encoding,
    now_ms: i64,
    out: &mut Vec<Outgoing>,
) {
    let kind: CommandKind = command.kind();
    if let Some(outgoing) = signer.sign(Topic::command(scope, kind), command, encoding, now_ms) {
        out.push(outgoing);
    }
}
