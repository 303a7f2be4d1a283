//! `boottorrent status`: where deployments stand, as a snapshot or followed live through the
//! server's event stream (`GET /api/v1/events`, server-sent events).
//!
//! Live, a terminal gets a progress bar per machine; anything else (a pipe, a test, `--json`)
//! gets one line per machine state change, so that scripts can follow along.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::api::{ErrorCode, MachineState, OverallState};
use crate::cli::args::{ClientArgs, StatusArgs};
use crate::cli::client::{
    HttpError, Subject, explain, get_deployment, list_deployments, succeeded, url,
};
use crate::cli::text::{
    Align, counts_text, describe, eta_text, machines_text, percent_text, rate_text, table,
    time_text,
};
use crate::cli::view::{Deployment, MachineProgress, Transition, Word, running_text};

/// The server sends a comment every 15 s; this much silence means the connection is dead even
/// if the socket has not noticed.
const STREAM_IDLE_LIMIT: Duration = Duration::from_secs(45);
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Failed or stalled machines named in a summary before "and N more".
const NAMED_MACHINES: usize = 5;

/// Whether `--json` prints one deployment object or a list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    One,
    List,
}

/// `boottorrent status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let StatusArgs {
        deployment,
        watch,
        client,
    } = args;
    let (shown, shape) = match &deployment {
        Some(id) => (vec![get_deployment(&client, id).await?], Shape::One),
        None => {
            let list = list_deployments(&client).await?;
            let running: Vec<Deployment> = list
                .iter()
                .filter(|d| d.state.is(OverallState::Running))
                .cloned()
                .collect();
            if running.is_empty() {
                (list.into_iter().take(1).collect(), Shape::List)
            } else {
                (running, Shape::List)
            }
        }
    };
    if shown.is_empty() {
        if client.json {
            println!("[]");
            return Ok(());
        }
        println!(
            "no deployments on {} yet: start one with `boottorrent deploy IMAGE --zone ZONE`",
            client.server
        );
        return Ok(());
    }
    if watch {
        return follow(&client, shown, shape, true).await;
    }
    if client.json {
        print_json(&shown, shape)?;
    } else {
        let texts: Vec<String> = shown.iter().map(snapshot_text).collect();
        print!("{}", texts.join("\n"));
    }
    conclude(&shown)
}

/// Follows deployments until each completed, failed or was cancelled, then prints the summary
/// and returns the exit verdict. `header` prints what each deployment is first (`deploy` has
/// said it already).
pub(crate) async fn follow(
    client: &ClientArgs,
    first: Vec<Deployment>,
    shape: Shape,
    header: bool,
) -> anyhow::Result<()> {
    let label = first.len() > 1;
    let mut view = if !client.json && std::io::stdout().is_terminal() {
        View::Bars(Bars::new())
    } else {
        View::Lines {
            to_stderr: client.json,
        }
    };
    let mut trackers = Vec::new();
    for deployment in first {
        if header {
            view.line(&header_text(&deployment));
        }
        let (tracker, changes) = Watch::new(deployment);
        view.show(&tracker, &changes, label);
        trackers.push(tracker);
    }
    // A server that vanished from the network would otherwise hold each attempt for the
    // operating system's connect timeout, minutes, instead of a retry every second.
    let http = crate::cli::client::http_client(client)?;
    let mut reconnecting = false;
    while trackers.iter().any(|t| !t.finished()) {
        match stream_once(
            client,
            &http,
            &mut trackers,
            &mut view,
            label,
            &mut reconnecting,
        )
        .await
        {
            Ok(()) => {}
            Err(e) if worth_retrying(&e) => {
                if !reconnecting {
                    view.note(&format!(
                        "cannot follow the server's event stream ({e:#}); retrying every second"
                    ));
                    reconnecting = true;
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
            Err(e) => {
                view.finish();
                return Err(e);
            }
        }
    }
    view.finish();
    let finals: Vec<Deployment> = trackers.into_iter().map(|t| t.deployment).collect();
    for deployment in &finals {
        let text = summary(deployment);
        if client.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
    if client.json {
        print_json(&finals, shape)?;
    }
    conclude(&finals)
}

/// One connection to the event stream, until every deployment finished (`Ok`) or the stream
/// failed.
async fn stream_once(
    client: &ClientArgs,
    http: &reqwest::Client,
    trackers: &mut [Watch],
    view: &mut View,
    label: bool,
    reconnecting: &mut bool,
) -> anyhow::Result<()> {
    let token = crate::cli::client::token(client)?;
    let url = url(client, "/api/v1/events")?;
    let response = http
        .get(&url)
        .bearer_auth(token)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut response = succeeded(&url, response)
        .await
        .map_err(|e| explain(client, e, Subject::Listing))?;
    let kind = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    if !kind.starts_with("text/event-stream") {
        bail!(
            "{url} answered with {kind}, not an event stream; is {} an older BootTorrent server \
             than this client?",
            client.server
        );
    }
    // Read the deployments only once subscribed: whatever changes after this read arrives as
    // an event, so nothing falls between the two.
    refresh(client, trackers, view, label).await?;
    if std::mem::take(reconnecting) {
        view.note("reconnected");
    }
    let mut parser = SseParser::default();
    while trackers.iter().any(|t| !t.finished()) {
        let chunk = tokio::time::timeout(STREAM_IDLE_LIMIT, response.chunk())
            .await
            .map_err(|_| StreamLost("no data for 45 s"))?
            .with_context(|| format!("reading {url}"))?
            .ok_or(StreamLost("the server closed it"))?;
        for event in parser.feed(&chunk) {
            // The server says `lagged` when this client fell behind and events were dropped
            // for it (docs/api.md): the answers fill the gap.
            if event.kind == "lagged" {
                refresh(client, trackers, view, label).await?;
                continue;
            }
            if event.kind != "deployment" {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(&event.data)
                .map_err(anyhow::Error::from)
                .and_then(Deployment::from_json);
            let deployment = match parsed {
                Ok(deployment) => deployment,
                Err(e) => {
                    view.note(&format!("ignored a deployment event: {e:#}"));
                    continue;
                }
            };
            let Some(tracker) = trackers
                .iter_mut()
                .find(|t| t.deployment.id == deployment.id)
            else {
                continue;
            };
            let changes = tracker.update(deployment);
            view.show(tracker, &changes, label);
        }
    }
    Ok(())
}

/// Reads every deployment still followed afresh.
async fn refresh(
    client: &ClientArgs,
    trackers: &mut [Watch],
    view: &mut View,
    label: bool,
) -> anyhow::Result<()> {
    for tracker in trackers.iter_mut().filter(|t| !t.finished()) {
        let deployment = get_deployment(client, &tracker.deployment.id).await?;
        let changes = tracker.update(deployment);
        view.show(tracker, &changes, label);
    }
    Ok(())
}

/// The event stream ended or went silent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StreamLost(&'static str);

/// Whether a failure is the connection's (the server restarts, the network blips), which
/// waiting fixes, rather than an answer that will not change.
fn worth_retrying(error: &anyhow::Error) -> bool {
    if let Some(http) = error.downcast_ref::<HttpError>() {
        // Not the API's answer (a proxy's, say): its status is all there is to go by.
        return http
            .code
            .map_or(http.status.is_server_error(), ErrorCode::is_transient);
    }
    error.downcast_ref::<reqwest::Error>().is_some() || error.downcast_ref::<StreamLost>().is_some()
}

fn print_json(deployments: &[Deployment], shape: Shape) -> anyhow::Result<()> {
    let text = match (shape, deployments) {
        (Shape::One, [one]) => serde_json::to_string_pretty(&one.raw)?,
        _ => {
            let list: Vec<&Value> = deployments.iter().map(|d| &d.raw).collect();
            serde_json::to_string_pretty(&list)?
        }
    };
    println!("{text}");
    Ok(())
}

fn header_text(d: &Deployment) -> String {
    format!(
        "deployment {}: {}, created {}",
        d.id,
        describe(d),
        time_text(d.created_ms)
    )
}

/// The header, a line per machine and a total, and the summary.
fn snapshot_text(d: &Deployment) -> String {
    let mut out = header_text(d);
    out.push('\n');
    if !d.machines.is_empty() {
        let bytes = |done, total| format!("{} / {}", HumanBytes(done), HumanBytes(total));
        let mut rows: Vec<Vec<String>> = d
            .machines
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.state.to_string(),
                    running_text(m.running.as_ref()),
                    bytes(m.bytes_done, m.bytes_total),
                    percent_text(m.bytes_done, m.bytes_total).unwrap_or_else(|| "-".into()),
                    rate_text(m.current_download_bps()),
                ]
            })
            .collect();
        rows.push(vec![
            "total".into(),
            String::new(),
            String::new(),
            bytes(d.bytes_done, d.bytes_total),
            percent_text(d.bytes_done, d.bytes_total).unwrap_or_else(|| "-".into()),
            rate_text(d.download_bps),
        ]);
        out += &table(
            &[
                ("MACHINE", Align::Left),
                ("STATE", Align::Left),
                ("RUNNING", Align::Left),
                ("BYTES", Align::Right),
                ("DONE", Align::Right),
                ("RATE", Align::Right),
            ],
            &rows,
        );
    }
    out += &summary(d);
    out.push('\n');
    out
}

/// "deployment d-1 failed: 3 machines: 2 booted, 1 failed (pc-03: E_DISK: disk full)".
pub(crate) fn summary(d: &Deployment) -> String {
    let counts = d.state_counts();
    let total = counts.values().sum();
    let mut text = format!("deployment {} {}: {}", d.id, d.state, machines_text(total));
    if total > 0 {
        text += ": ";
        text += &counts_text(&counts, |state| reasons(d, state));
    }
    text
}

/// Which machines are failed or stalled, and why.
fn reasons(d: &Deployment, state: &Word<MachineState>) -> Option<String> {
    if !matches!(
        state,
        Word::Known(MachineState::Failed | MachineState::Stalled)
    ) {
        return None;
    }
    let named: Vec<String> = d
        .machines
        .iter()
        .filter(|m| m.state == *state)
        .map(|m| {
            format!(
                "{}: {}",
                m.id,
                m.error.as_deref().unwrap_or("no reason given")
            )
        })
        .collect();
    if named.is_empty() {
        return None;
    }
    let mut text = named[..named.len().min(NAMED_MACHINES)].join("; ");
    if named.len() > NAMED_MACHINES {
        text += &format!("; and {} more", named.len() - NAMED_MACHINES);
    }
    Some(format!("({text})"))
}

/// The exit status rule: a cancelled or failed deployment, or any failed machine, is an
/// error; a completed or (when not watching) still running deployment is not.
pub(crate) fn verdict(d: &Deployment) -> Result<(), String> {
    let show = format!("`boottorrent deployments show {}`", d.id);
    if d.state.is(OverallState::Cancelled) {
        return Err(format!(
            "deployment {} was cancelled; {show} shows where its machines stood",
            d.id
        ));
    }
    let failed = d
        .state_counts()
        .get(&Word::Known(MachineState::Failed))
        .copied()
        .unwrap_or(0);
    let total: u64 = d.state_counts().values().sum();
    if failed > 0 {
        return Err(format!(
            "{failed} of {} of deployment {} failed; {show} shows why",
            machines_text(total),
            d.id
        ));
    }
    if d.state.is(OverallState::Failed) {
        return Err(format!("deployment {} failed; {show} shows why", d.id));
    }
    Ok(())
}

fn conclude(deployments: &[Deployment]) -> anyhow::Result<()> {
    let failures: Vec<String> = deployments
        .iter()
        .filter_map(|d| verdict(d).err())
        .collect();
    match failures.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!(
            "{} of {} deployments went wrong: {}",
            many.len(),
            deployments.len(),
            many.join("; ")
        ),
    }
}

/// One machine's state change as the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// The machine's first state, when it is first seen.
    First {
        machine: String,
        state: Word<MachineState>,
    },
    Moved {
        machine: String,
        from: Word<MachineState>,
        to: Word<MachineState>,
        error: Option<String>,
    },
}

impl Change {
    /// "pc-01: pending", "pc-01: downloading -> failed (E_DISK: disk full)"; `deployment`
    /// goes first when several deployments are followed at once.
    fn line(&self, deployment: Option<&str>) -> String {
        let prefix = deployment.map(|d| format!("{d} ")).unwrap_or_default();
        match self {
            Change::First { machine, state } => format!("{prefix}{machine}: {state}"),
            Change::Moved {
                machine,
                from,
                to,
                error,
            } => match error {
                Some(error) => format!("{prefix}{machine}: {from} -> {to} ({error})"),
                None => format!("{prefix}{machine}: {from} -> {to}"),
            },
        }
    }

    fn is_trouble(&self) -> bool {
        matches!(
            self,
            Change::Moved {
                to: Word::Known(MachineState::Failed | MachineState::Stalled),
                ..
            }
        )
    }
}

/// What the watcher knows of one deployment, merged from answers and events that may arrive
/// out of order (a GET answer can be newer than an event already queued on the stream).
pub(crate) struct Watch {
    /// The newest deployment-level fields; its `machines` is the merged view.
    deployment: Deployment,
    machines: BTreeMap<String, MachineProgress>,
}

impl Watch {
    pub(crate) fn new(first: Deployment) -> (Watch, Vec<Change>) {
        let mut tracker = Watch {
            deployment: Deployment::default(),
            machines: BTreeMap::new(),
        };
        let changes = tracker.update(first);
        (tracker, changes)
    }

    pub(crate) fn finished(&self) -> bool {
        self.deployment.is_finished()
    }

    /// Takes in a newer view of the deployment; returns the machine state changes it shows, in
    /// order, each once. After the deployment finished nothing is taken in: what ended is what
    /// the summary reports.
    pub(crate) fn update(&mut self, newer: Deployment) -> Vec<Change> {
        if self.finished() {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for machine in &newer.machines {
            match self.machines.get(&machine.id) {
                None => changes.extend(history(machine)),
                Some(known) if freshness(machine) < freshness(known) => continue,
                Some(known) => changes.extend(moves(known, machine)),
            }
            self.machines.insert(machine.id.clone(), machine.clone());
        }
        self.deployment = Deployment {
            machines: self.machines.values().cloned().collect(),
            ..newer
        };
        changes
    }

    /// Bytes done, bytes in all, download rate, over the merged machines.
    fn totals(&self) -> (u64, u64, u64) {
        self.machines
            .values()
            .fold((0, 0, 0), |(done, total, rate), m| {
                (
                    done.saturating_add(m.bytes_done),
                    total.saturating_add(m.bytes_total),
                    rate.saturating_add(m.current_download_bps()),
                )
            })
    }
}

/// Orders two views of one machine: the later transition, then the longer history, then the
/// later progress report is newer.
fn freshness(m: &MachineProgress) -> (i64, usize, i64) {
    let last = m.transitions.last().map_or(i64::MIN, |t| t.at_ms);
    (last, m.transitions.len(), m.updated_ms)
}

/// A machine's whole history as changes, for a machine seen for the first time: the output is
/// then the same whenever the watch started.
fn history(m: &MachineProgress) -> Vec<Change> {
    let Some((first, rest)) = m.transitions.split_first() else {
        return vec![Change::First {
            machine: m.id.clone(),
            state: m.state.clone(),
        }];
    };
    let mut changes = vec![Change::First {
        machine: m.id.clone(),
        state: first.state.clone(),
    }];
    changes.extend(steps(m, &first.state, rest));
    changes
}

/// What happened to a machine between two views of it.
fn moves(known: &MachineProgress, newer: &MachineProgress) -> Vec<Change> {
    let fresh = match known.transitions.last() {
        // The usual case: the history grew at its end.
        Some(last) if newer.transitions.get(known.transitions.len() - 1) == Some(last) => {
            &newer.transitions[known.transitions.len()..]
        }
        // The history was cut at its start: continue after the last transition seen.
        Some(last) => match newer.transitions.iter().rposition(|t| t == last) {
            Some(i) => &newer.transitions[i + 1..],
            None => &[][..],
        },
        None => &[][..],
    };
    if fresh.is_empty() {
        // No usable history: the state change itself is all there is to say.
        if known.state != newer.state {
            return vec![Change::Moved {
                machine: newer.id.clone(),
                from: known.state.clone(),
                to: newer.state.clone(),
                error: newer.error.clone(),
            }];
        }
        return Vec::new();
    }
    steps(newer, &known.state, fresh)
}

/// `transitions` as changes starting from state `from`; the machine's error goes with the
/// change into its current state.
fn steps(
    m: &MachineProgress,
    from: &Word<MachineState>,
    transitions: &[Transition],
) -> Vec<Change> {
    let mut from = from.clone();
    let mut changes = Vec::new();
    for (i, t) in transitions.iter().enumerate() {
        let current = i + 1 == transitions.len() && t.state == m.state;
        changes.push(Change::Moved {
            machine: m.id.clone(),
            from: std::mem::replace(&mut from, t.state.clone()),
            to: t.state.clone(),
            error: if current { m.error.clone() } else { None },
        });
    }
    changes
}

/// Where the watch is shown.
enum View {
    /// One line per change on stdout, or on stderr when stdout is kept for `--json`.
    Lines {
        to_stderr: bool,
    },
    Bars(Bars),
}

impl View {
    /// Output that belongs with the changes.
    fn line(&self, text: &str) {
        match self {
            View::Lines { to_stderr: true } => eprintln!("{text}"),
            View::Lines { to_stderr: false } => println!("{text}"),
            View::Bars(bars) => bars.println(text),
        }
    }

    /// A remark about the watch itself (the connection), kept off stdout's change lines.
    fn note(&self, text: &str) {
        match self {
            View::Lines { .. } => eprintln!("{text}"),
            View::Bars(bars) => bars.println(text),
        }
    }

    fn show(&mut self, tracker: &Watch, changes: &[Change], label: bool) {
        let deployment = label.then_some(tracker.deployment.id.as_str());
        match self {
            View::Lines { .. } => {
                for change in changes {
                    self.line(&change.line(deployment));
                }
            }
            View::Bars(bars) => {
                // The bars show every state; only trouble deserves a line that stays.
                for change in changes.iter().filter(|c| c.is_trouble()) {
                    bars.println(&change.line(deployment));
                }
                bars.show(tracker, label);
            }
        }
    }

    fn finish(self) {
        if let View::Bars(bars) = self {
            bars.finish();
        }
    }
}

/// A progress bar per machine under a total bar per deployment.
struct Bars {
    multi: MultiProgress,
    style: ProgressStyle,
    groups: HashMap<String, BarGroup>,
    /// Width of the labels in front of the bars, so the bars line up.
    width: usize,
}

struct BarGroup {
    total: ProgressBar,
    /// The bottom bar of the group, where a machine that joins goes.
    last: ProgressBar,
    machines: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let style = ProgressStyle::with_template(
            "{prefix} {bar:20} {percent:>3}% {bytes:>10}/{total_bytes:<10} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            style,
            groups: HashMap::new(),
            width: "total".len(),
        }
    }

    fn println(&self, text: &str) {
        if self.groups.is_empty() {
            // Before the first bar, indicatif would leave the cursor at the end of the line.
            println!("{text}");
        } else {
            // Only fails when stdout is gone, and then there is no one left to tell.
            let _ = self.multi.println(text);
        }
    }

    fn show(&mut self, tracker: &Watch, label: bool) {
        let d = &tracker.deployment;
        let total_label = if label { d.id.as_str() } else { "total" };
        let widest = tracker
            .machines
            .keys()
            .map(String::len)
            .chain([total_label.len()])
            .max()
            .unwrap_or(0);
        if widest > self.width {
            self.width = widest;
            for group in self.groups.values() {
                for bar in std::iter::once(&group.total).chain(group.machines.values()) {
                    bar.set_prefix(pad(bar.prefix().trim_end(), widest));
                }
            }
        }
        let width = self.width;
        let group = self.groups.entry(d.id.clone()).or_insert_with(|| {
            let total = self.multi.add(
                ProgressBar::new(0)
                    .with_style(self.style.clone())
                    .with_prefix(pad(total_label, width)),
            );
            BarGroup {
                last: total.clone(),
                total,
                machines: HashMap::new(),
            }
        });
        for m in tracker.machines.values() {
            let bar = group.machines.entry(m.id.clone()).or_insert_with(|| {
                let bar = self.multi.insert_after(
                    &group.last,
                    ProgressBar::new(m.bytes_total)
                        .with_style(self.style.clone())
                        .with_prefix(pad(&m.id, width)),
                );
                group.last = bar.clone();
                bar
            });
            bar.set_length(m.bytes_total);
            bar.set_position(m.bytes_done);
            bar.set_message(machine_message(m));
        }
        let (done, total, rate) = tracker.totals();
        group.total.set_length(total);
        group.total.set_position(done);
        let mut message = format!("{}: {}", d.state, counts_text(&d.state_counts(), |_| None));
        if rate > 0 {
            message += &format!(", {}", rate_text(rate));
        }
        if let Some(eta) = eta_text(done, total, rate) {
            message += &format!(", {eta}");
        }
        group.total.set_message(message);
    }

    fn finish(self) {
        for group in self.groups.values() {
            // `abandon` keeps each bar where it stopped; `finish` would fill them all.
            group.total.abandon();
            for bar in group.machines.values() {
                bar.abandon();
            }
        }
        // The last bar leaves the cursor at the end of its line.
        if !self.multi.is_hidden() {
            println!();
        }
    }
}

fn pad(text: &str, width: usize) -> String {
    format!("{text:<width$}")
}

/// "downloading, 12.00 MiB/s, 2 minutes left" or "failed: E_DISK: disk full".
fn machine_message(m: &MachineProgress) -> String {
    if let Some(error) = &m.error {
        return format!("{}: {error}", m.state);
    }
    let mut text = m.state.to_string();
    let rate = m.current_download_bps();
    if rate > 0 {
        text += &format!(", {}", rate_text(rate));
        if let Some(eta) = eta_text(m.bytes_done, m.bytes_total, rate) {
            text += &format!(", {eta}");
        }
    }
    text
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field; `message` when there was none.
    pub kind: String,
    /// The `data:` lines, joined with newlines.
    pub data: String,
}

/// Cuts a server-sent event stream into events. Chunks end anywhere, inside a line or even
/// inside a UTF-8 character, so the unfinished line waits for the next chunk.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no line end, so that a long event arriving in many
    /// chunks is scanned once.
    scanned: usize,
    kind: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        let mut from = self.scanned;
        loop {
            let Some(offset) = self.buffer[from..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                from = self.buffer.len();
                break;
            };
            let end = from + offset;
            let next = match (self.buffer[end], self.buffer.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                // A CR that ends the chunk may be the first half of a CRLF.
                (b'\r', None) => {
                    from = end;
                    break;
                }
                _ => end + 1,
            };
            let line = String::from_utf8_lossy(&self.buffer[start..end]).into_owned();
            self.line(&line, &mut events);
            start = next;
            from = next;
        }
        self.buffer.drain(..start);
        self.scanned = from - start;
        events
    }

    fn line(&mut self, line: &str, events: &mut Vec<SseEvent>) {
        if line.is_empty() {
            let kind = std::mem::take(&mut self.kind);
            let data = std::mem::take(&mut self.data);
            if std::mem::take(&mut self.has_data) {
                events.push(SseEvent {
                    kind: if kind.is_empty() {
                        "message".to_owned()
                    } else {
                        kind
                    },
                    data,
                });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.kind),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id` and `retry` serve browsers' automatic reconnection; this client re-reads
            // the deployment when it reconnects instead.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: &str) -> SseEvent {
        SseEvent {
            kind: kind.to_owned(),
            data: data.to_owned(),
        }
    }

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let stream = "event: deployment\ndata: {\"id\":\"d-1\"}\n\nevent: machine\ndata: {}\n\n";
        // Every way of cutting the stream in two, and in single bytes.
        for cut in 0..=stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&stream.as_bytes()[..cut]);
            events.extend(parser.feed(&stream.as_bytes()[cut..]));
            assert_eq!(
                events,
                [
                    event("deployment", r#"{"id":"d-1"}"#),
                    event("machine", "{}")
                ],
                "cut at {cut}"
            );
        }
        let mut parser = SseParser::default();
        let events: Vec<SseEvent> = stream.bytes().flat_map(|b| parser.feed(&[b])).collect();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn several_events_in_one_chunk() {
        let mut parser = SseParser::default();
        let events = parser.feed(b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\nevent: c\ndata: 3");
        assert_eq!(events, [event("a", "1"), event("b", "2")]);
        assert_eq!(parser.feed(b"\n\n"), [event("c", "3")]);
    }

    #[test]
    fn crlf_and_cr_end_lines_too() {
        let stream = b"event: deployment\r\ndata: x\r\n\r\nevent: y\rdata: z\r\r";
        for cut in 0..=stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&stream[..cut]);
            events.extend(parser.feed(&stream[cut..]));
            // A CR last in the stream waits for what follows it.
            events.extend(parser.feed(b"\n"));
            assert_eq!(
                events,
                [event("deployment", "x"), event("y", "z")],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn comments_and_unknown_fields_are_skipped() {
        let mut parser = SseParser::default();
        let events = parser.feed(
            b": keep-alive\n\n:another\nid: 7\nretry: 10\nevent: deployment\n: mid-event\ndata:{}\n\n",
        );
        // A comment alone (no data) is no event; `data:` without a space keeps its value.
        assert_eq!(events, [event("deployment", "{}")]);
    }

    #[test]
    fn data_lines_join_and_unnamed_events_are_messages() {
        let mut parser = SseParser::default();
        let events = parser.feed(b"data: a\ndata\ndata: b\n\n");
        assert_eq!(events, [event("message", "a\n\nb")]);
    }

    #[test]
    fn utf8_cut_inside_a_character_survives() {
        let stream = "event: deployment\ndata: {\"error\":\"d\u{e9}j\u{e0} vu\"}\n\n".as_bytes();
        let cut = stream.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let mut parser = SseParser::default();
        let mut events = parser.feed(&stream[..cut]);
        events.extend(parser.feed(&stream[cut..]));
        assert_eq!(events[0].data, "{\"error\":\"d\u{e9}j\u{e0} vu\"}");
    }

    fn machine(id: &str, states: &[(&str, i64)], error: Option<&str>) -> MachineProgress {
        MachineProgress {
            id: id.to_owned(),
            state: states.last().map_or("pending", |s| s.0).into(),
            error: error.map(str::to_owned),
            updated_ms: states.last().map_or(0, |s| s.1),
            transitions: states
                .iter()
                .map(|(state, at_ms)| Transition {
                    state: (*state).into(),
                    at_ms: *at_ms,
                })
                .collect(),
            ..MachineProgress::default()
        }
    }

    fn deployment(state: &str, machines: Vec<MachineProgress>) -> Deployment {
        Deployment {
            id: "d-1".to_owned(),
            state: state.into(),
            machines,
            ..Deployment::default()
        }
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| c.line(None)).collect()
    }

    #[test]
    fn the_watcher_prints_each_transition_once_in_order() {
        let (mut tracker, changes) = Watch::new(deployment(
            "running",
            vec![machine(
                "pc-01",
                &[("pending", 1), ("downloading", 2)],
                None,
            )],
        ));
        assert_eq!(
            lines(&changes),
            ["pc-01: pending", "pc-01: pending -> downloading"]
        );
        // Two transitions in one update (events coalesced), and a new machine.
        let changes = tracker.update(deployment(
            "running",
            vec![
                machine(
                    "pc-01",
                    &[
                        ("pending", 1),
                        ("downloading", 2),
                        ("verifying", 5),
                        ("staged", 5),
                    ],
                    None,
                ),
                machine("pc-02", &[("pending", 6)], None),
            ],
        ));
        assert_eq!(
            lines(&changes),
            [
                "pc-01: downloading -> verifying",
                "pc-01: verifying -> staged",
                "pc-02: pending"
            ]
        );
        // The same view again (a GET after a reconnect) says nothing new.
        let again = tracker.deployment.clone();
        assert!(tracker.update(again).is_empty());
    }

    #[test]
    fn an_older_view_does_not_step_back() {
        let (mut tracker, _) = Watch::new(deployment(
            "running",
            vec![machine(
                "pc-01",
                &[("pending", 1), ("downloading", 2), ("verifying", 3)],
                None,
            )],
        ));
        let stale = deployment(
            "running",
            vec![machine(
                "pc-01",
                &[("pending", 1), ("downloading", 2)],
                None,
            )],
        );
        assert!(tracker.update(stale).is_empty());
        assert_eq!(
            tracker.deployment.machines[0].state.to_string(),
            "verifying"
        );
    }

    #[test]
    fn failures_carry_their_reason_and_a_history_without_transitions_still_shows() {
        let (mut tracker, _) = Watch::new(deployment(
            "running",
            vec![machine(
                "pc-03",
                &[("pending", 1), ("downloading", 2)],
                None,
            )],
        ));
        let changes = tracker.update(deployment(
            "failed",
            vec![machine(
                "pc-03",
                &[("pending", 1), ("downloading", 2), ("failed", 9)],
                Some("E_DISK: disk full"),
            )],
        ));
        assert_eq!(
            lines(&changes),
            ["pc-03: downloading -> failed (E_DISK: disk full)"]
        );
        assert!(changes[0].is_trouble());
        assert!(tracker.finished());
        // Nothing is taken in once it ended.
        assert!(
            tracker
                .update(deployment("running", vec![machine("pc-04", &[], None)]))
                .is_empty()
        );

        let bare = |state: &str| MachineProgress {
            id: "pc-09".into(),
            state: state.into(),
            ..MachineProgress::default()
        };
        let (mut tracker, changes) = Watch::new(deployment("running", vec![bare("pending")]));
        assert_eq!(lines(&changes), ["pc-09: pending"]);
        let changes = tracker.update(deployment("running", vec![bare("downloading")]));
        assert_eq!(lines(&changes), ["pc-09: pending -> downloading"]);
    }

    #[test]
    fn several_deployments_label_their_lines() {
        let change = Change::First {
            machine: "pc-01".into(),
            state: "pending".into(),
        };
        assert_eq!(change.line(Some("d-2")), "d-2 pc-01: pending");
    }

    #[test]
    fn summaries_count_and_name_the_failed() {
        let d = deployment(
            "failed",
            vec![
                machine("pc-01", &[("booted", 1)], None),
                machine("pc-02", &[("booted", 1)], None),
                machine("pc-03", &[("failed", 1)], Some("E_DISK: disk full")),
            ],
        );
        assert_eq!(
            summary(&d),
            "deployment d-1 failed: 3 machines: 2 booted, 1 failed (pc-03: E_DISK: disk full)"
        );
        let err = verdict(&d).unwrap_err();
        assert!(
            err.starts_with("1 of 3 machines of deployment d-1 failed"),
            "{err}"
        );

        let many: Vec<MachineProgress> = (0..7)
            .map(|i| machine(&format!("pc-{i}"), &[("stalled", 1)], None))
            .collect();
        let text = summary(&deployment("running", many));
        assert!(text.contains("7 stalled (pc-0: no reason given;"), "{text}");
        assert!(text.ends_with("; and 2 more)"), "{text}");

        assert_eq!(
            summary(&deployment("running", Vec::new())),
            "deployment d-1 running: 0 machines"
        );
    }

    #[test]
    fn the_exit_status_follows_the_rule() {
        let ok = |state: &str, machines: Vec<MachineProgress>| {
            verdict(&deployment(state, machines)).is_ok()
        };
        assert!(ok("completed", vec![machine("a", &[("booted", 1)], None)]));
        // Still running without a failure: fine for a snapshot.
        assert!(ok(
            "running",
            vec![machine("a", &[("downloading", 1)], None)]
        ));
        assert!(ok("running", vec![machine("a", &[("stalled", 1)], None)]));
        // A failed machine is an error even while the others go on.
        assert!(!ok(
            "running",
            vec![
                machine("a", &[("failed", 1)], None),
                machine("b", &[("downloading", 1)], None)
            ]
        ));
        assert!(!ok("failed", vec![machine("a", &[("failed", 1)], None)]));
        assert!(!ok("failed", Vec::new()));
        assert!(!ok("cancelled", vec![machine("a", &[("booted", 1)], None)]));

        let done = deployment("completed", vec![machine("a", &[("booted", 1)], None)]);
        let cancelled = deployment("cancelled", Vec::new());
        assert!(conclude(std::slice::from_ref(&done)).is_ok());
        let err = conclude(&[done, cancelled.clone(), cancelled]).unwrap_err();
        assert!(
            err.to_string().starts_with("2 of 3 deployments went wrong"),
            "{err}"
        );
    }

    #[test]
    fn only_connection_trouble_is_retried() {
        let http = |code: ErrorCode| -> anyhow::Error {
            HttpError {
                url: "u".into(),
                status: reqwest::StatusCode::from_u16(code.status()).unwrap(),
                code: Some(code),
                message: None,
            }
            .into()
        };
        assert!(worth_retrying(&http(ErrorCode::Unavailable)));
        assert!(!worth_retrying(&http(ErrorCode::NotFound)));
        let gateway = HttpError {
            url: "u".into(),
            status: reqwest::StatusCode::BAD_GATEWAY,
            code: None,
            message: None,
        };
        assert!(worth_retrying(&gateway.into()), "a proxy's 502");
        assert!(worth_retrying(
            &anyhow::Error::from(StreamLost("x")).context("reading")
        ));
        assert!(!worth_retrying(&anyhow::anyhow!("no deployment d-1")));
    }
}
