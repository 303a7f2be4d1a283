//! `boottorrent deploy`, `boottorrent deployments ...` and `boottorrent zones ...`: the API's
//! deployments and zones (docs/api.md) for the operator, and the deployment model and text
//! helpers that `status` shares.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use indicatif::HumanBytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::ErrorCode;
use crate::cli::args::{
    ClientArgs, DeployArgs, DeploymentsArgs, DeploymentsCommand, ZoneMembers, ZonesArgs,
    ZonesCommand,
};
use crate::cli::client::{HttpError, get, send};
use crate::cli::status;

/// A deployment as the API shows it. Every field has a default and unknown fields are
/// ignored, so that a server newer than this client does not break it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Deployment {
    pub id: String,
    pub image: String,
    pub image_name: String,
    pub target: Value,
    pub action: String,
    pub created_ms: i64,
    pub state: String,
    pub counts: BTreeMap<String, u64>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub download_bps: u64,
    pub machines: Vec<MachineProgress>,
    /// The server's JSON as received, for `--json`.
    #[serde(skip)]
    pub raw: Value,
}

/// Where one machine of a deployment stands (`MachineProgress` in the API).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct MachineProgress {
    pub id: String,
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub download_bps: u64,
    pub error: Option<String>,
    pub updated_ms: i64,
    pub transitions: Vec<Transition>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub(crate) struct Transition {
    pub state: String,
    pub at_ms: i64,
}

impl MachineProgress {
    /// The download rate, if it is downloading: agents' last report lingers after they stop,
    /// and the API's total counts only machines that download.
    pub(crate) fn current_download_bps(&self) -> u64 {
        if self.state == "downloading" {
            self.download_bps
        } else {
            0
        }
    }
}

impl Deployment {
    pub(crate) fn from_json(raw: Value) -> anyhow::Result<Deployment> {
        let mut deployment = Deployment::deserialize(&raw)
            .context("the server's deployment does not have the shape of docs/api.md")?;
        deployment.raw = raw;
        Ok(deployment)
    }

    /// Whether it reached an end: nothing more will happen to it.
    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "cancelled")
    }

    /// "win11 to zone lab, action set_boot".
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} to {}, action {}",
            self.image_name,
            target_text(&self.target),
            self.action
        )
    }

    /// How many machines are in each state: counted from `machines` where the API gave them,
    /// so that the numbers agree with the per-machine lines printed next to them.
    pub(crate) fn state_counts(&self) -> BTreeMap<String, u64> {
        if self.machines.is_empty() {
            return self.counts.clone();
        }
        let mut counts = BTreeMap::new();
        for m in &self.machines {
            *counts.entry(m.state.clone()).or_default() += 1;
        }
        counts
    }
}

/// What an operator's request was about, to put the server's refusals in its terms.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// A list or a stream: nothing in particular can be missing.
    Listing,
    Deployment(&'a str),
    NewDeployment,
    Zone(&'a str),
    ZoneUpdate(&'a str),
}

/// Rewrites the API's error answers the operator can act on into what failed and what to do;
/// anything else (a connection error, say) is returned unchanged.
pub(crate) fn explain(
    client: &ClientArgs,
    error: anyhow::Error,
    subject: Subject<'_>,
) -> anyhow::Error {
    let Some(http) = error.downcast_ref::<HttpError>() else {
        return error;
    };
    let server = client.server.trim_end_matches('/');
    let path = http.url.strip_prefix(server).unwrap_or(&http.url);
    let Some(code) = http.code else {
        return anyhow!(
            "{server} answered {path} with HTTP {} but not with the API's error body; is it \
             an older BootTorrent server than this client, or something else at that address?",
            http.status
        );
    };
    let message = http.message.as_deref().unwrap_or("no message");
    let text = match (code, subject) {
        (ErrorCode::NoSuchEndpoint, _) => {
            format!("{server} has no {path}; is it an older BootTorrent server than this client?")
        }
        (ErrorCode::Unauthorized | ErrorCode::HttpsRequired, _) => format!(
            "{server} refused the admin token ({message}); pass the server's token with --token \
             or BOOTTORRENT_TOKEN, or its data directory with --data-dir"
        ),
        (ErrorCode::ReadOnlyToken | ErrorCode::Forbidden, _) => format!(
            "{server} refused the change: {message}; pass the admin token with --token or \
             BOOTTORRENT_TOKEN, not the viewer token"
        ),
        (ErrorCode::NotFound, Subject::Deployment(id)) => {
            format!("no deployment {id} on {server}; `boottorrent deployments list` shows them")
        }
        (ErrorCode::NotFound, Subject::Zone(id) | Subject::ZoneUpdate(id)) => {
            format!("no zone {id} on {server}; `boottorrent zones list` shows them")
        }
        (ErrorCode::NotFound, Subject::NewDeployment) => format!(
            "nothing deployed: {message}; `boottorrent image list`, `boottorrent zones list` and \
             `boottorrent machines list` show what {server} knows"
        ),
        (ErrorCode::Conflict, Subject::NewDeployment) => format!(
            "nothing deployed: {message}; only a ready image can be deployed, \
             `boottorrent image list` shows each image's state"
        ),
        (ErrorCode::InvalidRequest, Subject::NewDeployment) => {
            format!("nothing deployed: {message}")
        }
        (ErrorCode::InvalidRequest, Subject::ZoneUpdate(id)) => {
            format!("zone {id} was not saved: {message}")
        }
        _ => return error,
    };
    anyhow!(text)
}

/// `boottorrent deploy`.
pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let DeployArgs {
        image,
        target,
        action,
        watch,
        client,
    } = args;
    let target = if let Some(zone) = target.zone {
        json!({ "zone": zone })
    } else if target.global {
        json!({ "global": true })
    } else {
        json!({ "machines": target.machines })
    };
    let body = json!({ "image": image, "target": target, "action": action.api_name() });
    let raw = send(
        &client,
        reqwest::Method::POST,
        "/api/v1/deployments",
        Some(body),
    )
    .await
    .map_err(|e| explain(&client, e, Subject::NewDeployment))?;
    let deployment = Deployment::from_json(raw)?;
    let mut started = format!(
        "deployment {} started: {}, {}",
        deployment.id,
        deployment.describe(),
        machines_text(deployment.machines.len() as u64)
    );
    if deployment.machines.is_empty() && !deployment.target["machines"].is_array() {
        started.push_str(" yet (machines that join are taken in)");
    }
    if watch {
        // With --json, stdout is kept for the final JSON alone.
        if client.json {
            eprintln!("{started}");
        } else {
            println!("{started}");
        }
        return status::follow(&client, vec![deployment], status::Shape::One, false).await;
    }
    if client.json {
        println!("{}", serde_json::to_string_pretty(&deployment.raw)?);
    } else {
        println!("{started}");
    }
    Ok(())
}

/// `boottorrent deployments ...`.
pub async fn deployments(args: DeploymentsArgs) -> anyhow::Result<()> {
    match args
        .command
        .unwrap_or(DeploymentsCommand::List(args.client))
    {
        DeploymentsCommand::List(client) => {
            let list = list_deployments(&client).await?;
            if client.json {
                let raw: Vec<&Value> = list.iter().map(|d| &d.raw).collect();
                println!("{}", serde_json::to_string_pretty(&raw)?);
            } else if list.is_empty() {
                println!(
                    "no deployments on {} yet: start one with `boottorrent deploy IMAGE --zone ZONE`",
                    client.server
                );
            } else {
                print!("{}", deployments_table(&list));
            }
        }
        DeploymentsCommand::Show { id, client } => {
            let deployment = get_deployment(&client, &id).await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&deployment.raw)?);
            } else {
                print!("{}", deployment_details(&deployment));
            }
        }
        DeploymentsCommand::Cancel { id, client } => {
            let raw = send(
                &client,
                reqwest::Method::DELETE,
                &format!("/api/v1/deployments/{id}"),
                None,
            )
            .await
            .map_err(|e| explain(&client, e, Subject::Deployment(&id)))?;
            let deployment = Deployment::from_json(raw)?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&deployment.raw)?);
            } else {
                println!(
                    "deployment {id} {}: {}; {}",
                    deployment.state,
                    deployment.describe(),
                    counts_line(&deployment.state_counts())
                );
            }
        }
    }
    Ok(())
}

/// Every deployment, newest first.
pub(crate) async fn list_deployments(client: &ClientArgs) -> anyhow::Result<Vec<Deployment>> {
    let list = get(client, "/api/v1/deployments")
        .await
        .map_err(|e| explain(client, e, Subject::Listing))?;
    match list {
        Value::Array(items) => items.into_iter().map(Deployment::from_json).collect(),
        other => Err(anyhow!(
            "{}/api/v1/deployments answered {other}, not a list of deployments",
            client.server.trim_end_matches('/')
        )),
    }
}

pub(crate) async fn get_deployment(client: &ClientArgs, id: &str) -> anyhow::Result<Deployment> {
    let raw = get(client, &format!("/api/v1/deployments/{id}"))
        .await
        .map_err(|e| explain(client, e, Subject::Deployment(id)))?;
    Deployment::from_json(raw)
}

fn deployments_table(list: &[Deployment]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.image_name.clone(),
                target_text(&d.target),
                d.action.clone(),
                d.state.clone(),
                counts_text(&d.counts, |_| None),
                time_text(d.created_ms),
            ]
        })
        .collect();
    table(
        &[
            ("ID", Align::Left),
            ("IMAGE", Align::Left),
            ("TARGET", Align::Left),
            ("ACTION", Align::Left),
            ("STATE", Align::Left),
            ("MACHINES", Align::Left),
            ("CREATED", Align::Left),
        ],
        &rows,
    )
}

fn deployment_details(d: &Deployment) -> String {
    let mut out = format!("deployment {}: {}\n", d.id, d.state);
    out += &format!("  image     {} ({})\n", d.image_name, d.image);
    out += &format!("  target    {}\n", target_text(&d.target));
    out += &format!("  action    {}\n", d.action);
    out += &format!("  created   {}\n", time_text(d.created_ms));
    out += &format!("  machines  {}\n", counts_line(&d.state_counts()));
    out += &format!(
        "  bytes     {} of {}{}, {}\n",
        HumanBytes(d.bytes_done),
        HumanBytes(d.bytes_total),
        percent_text(d.bytes_done, d.bytes_total)
            .map(|p| format!(" ({p})"))
            .unwrap_or_default(),
        rate_text(d.download_bps)
    );
    if d.machines.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = d
        .machines
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.state.clone(),
                percent_text(m.bytes_done, m.bytes_total).unwrap_or_else(|| "-".into()),
                rate_text(m.current_download_bps()),
                m.error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push('\n');
    out += &table(
        &[
            ("MACHINE", Align::Left),
            ("STATE", Align::Left),
            ("PROGRESS", Align::Right),
            ("RATE", Align::Right),
            ("ERROR", Align::Left),
        ],
        &rows,
    );
    out
}

/// A zone as the API shows it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Zone {
    id: String,
    machines: Vec<String>,
    subnets: Vec<String>,
    images: Vec<String>,
    source: String,
    members: Vec<String>,
}

/// `boottorrent zones ...`.
pub async fn zones(args: ZonesArgs) -> anyhow::Result<()> {
    match args.command.unwrap_or(ZonesCommand::List(args.client)) {
        ZonesCommand::List(client) => {
            let raw = get(&client, "/api/v1/zones")
                .await
                .map_err(|e| explain(&client, e, Subject::Listing))?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&raw)?);
                return Ok(());
            }
            let zones = Vec::<Zone>::deserialize(&raw)
                .context("the server's zone list does not have the shape of docs/api.md")?;
            if zones.is_empty() {
                println!(
                    "no zones on {} yet: define one with `boottorrent zones set ID --subnet CIDR` \
                     or in the server's config file ([[zones]])",
                    client.server
                );
                return Ok(());
            }
            let names = image_names(&client).await;
            print!("{}", zones_table(&zones, &names));
        }
        ZonesCommand::Show { id, client } => {
            let raw = get(&client, &format!("/api/v1/zones/{id}"))
                .await
                .map_err(|e| explain(&client, e, Subject::Zone(&id)))?;
            print_zone(&client, raw, "").await?;
        }
        ZonesCommand::Set {
            id,
            members: ZoneMembers { machines, subnets },
            images,
            client,
        } => {
            let images = if images.is_empty() {
                images
            } else {
                let catalog = get(&client, "/api/v1/images")
                    .await
                    .map_err(|e| explain(&client, e, Subject::Listing))?;
                let catalog = catalog.as_array().map(Vec::as_slice).unwrap_or_default();
                images
                    .iter()
                    .map(|given| resolve_image(catalog, given, &client.server))
                    .collect::<anyhow::Result<_>>()?
            };
            let body = json!({ "machines": machines, "subnets": subnets, "images": images });
            let raw = send(
                &client,
                reqwest::Method::PUT,
                &format!("/api/v1/zones/{id}"),
                Some(body),
            )
            .await
            .map_err(|e| explain(&client, e, Subject::ZoneUpdate(&id)))?;
            print_zone(&client, raw, "saved ").await?;
        }
        ZonesCommand::Rm { id, client } => {
            let raw = send(
                &client,
                reqwest::Method::DELETE,
                &format!("/api/v1/zones/{id}"),
                None,
            )
            .await
            .map_err(|e| explain(&client, e, Subject::Zone(&id)))?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&raw)?);
                return Ok(());
            }
            let zone = Zone::deserialize(&raw).unwrap_or_default();
            let mut text = format!(
                "zone {id} removed (it had {}).",
                plural(zone.members.len() as u64, "member")
            );
            if !zone.images.is_empty() {
                text += " The deployments of its images are cancelled.";
            }
            if zone.source == "config" {
                text += " It comes back from the server's config file at the server's next \
                         start unless it is removed there too.";
            }
            println!("{text}");
        }
    }
    Ok(())
}

/// Prints one zone; `verb` ("saved ") says what just happened to it.
async fn print_zone(client: &ClientArgs, raw: Value, verb: &str) -> anyhow::Result<()> {
    if client.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    let zone = Zone::deserialize(&raw)
        .context("the server's zone does not have the shape of docs/api.md")?;
    let names = image_names(client).await;
    print!("{}", zone_details(&zone, verb, &names));
    Ok(())
}

fn zone_details(zone: &Zone, verb: &str, names: &BTreeMap<String, String>) -> String {
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let images: Vec<String> = zone
        .images
        .iter()
        .map(|id| match names.get(id) {
            Some(name) => format!("{name} ({id})"),
            None => id.clone(),
        })
        .collect();
    let source = match zone.source.as_str() {
        "config" => "from the server's config file",
        "api" => "set through the API",
        _ => "of unknown origin",
    };
    let mut out = format!("zone {} {verb}({source})\n", zone.id);
    out += &format!("  machines  {}\n", list(&zone.machines));
    out += &format!("  subnets   {}\n", list(&zone.subnets));
    out += &format!("  images    {}\n", list(&images));
    out += &format!("  members   {}\n", zone.members.len());
    for member in &zone.members {
        out += &format!("    {member}\n");
    }
    out
}

fn zones_table(zones: &[Zone], names: &BTreeMap<String, String>) -> String {
    let list = |items: Vec<&str>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(",")
        }
    };
    let rows: Vec<Vec<String>> = zones
        .iter()
        .map(|z| {
            vec![
                z.id.clone(),
                z.source.clone(),
                z.members.len().to_string(),
                list(z.machines.iter().map(String::as_str).collect()),
                list(z.subnets.iter().map(String::as_str).collect()),
                list(
                    z.images
                        .iter()
                        .map(|id| names.get(id).unwrap_or(id).as_str())
                        .collect(),
                ),
            ]
        })
        .collect();
    table(
        &[
            ("ID", Align::Left),
            ("SOURCE", Align::Left),
            ("MEMBERS", Align::Right),
            ("MACHINES", Align::Left),
            ("SUBNETS", Align::Left),
            ("IMAGES", Align::Left),
        ],
        &rows,
    )
}

/// Image id to name, to show names next to the ids zones hold; empty when the catalog cannot
/// be read, since the ids alone still answer the question.
async fn image_names(client: &ClientArgs) -> BTreeMap<String, String> {
    let Ok(Value::Array(images)) = get(client, "/api/v1/images").await else {
        return BTreeMap::new();
    };
    images
        .iter()
        .filter_map(|i| Some((i["id"].as_str()?.to_owned(), i["name"].as_str()?.to_owned())))
        .collect()
}

/// The image id for `given`, an id or a unique name: zones take only ids, but operators know
/// their images by name (as `deploy` accepts them).
fn resolve_image(catalog: &[Value], given: &str, server: &str) -> anyhow::Result<String> {
    if catalog.iter().any(|i| i["id"] == given) {
        return Ok(given.to_owned());
    }
    let named: Vec<&str> = catalog
        .iter()
        .filter(|i| i["name"] == given)
        .filter_map(|i| i["id"].as_str())
        .collect();
    match named.as_slice() {
        [id] => Ok((*id).to_owned()),
        [] => Err(anyhow!(
            "no image {given:?} on {server}, by id or by name; `boottorrent image list` shows them"
        )),
        ids => Err(anyhow!(
            "{} images are named {given:?} ({}); give the id of the one you mean",
            ids.len(),
            ids.join(", ")
        )),
    }
}

/// "zone lab", "machines pc-01, pc-02", "every machine".
pub(crate) fn target_text(target: &Value) -> String {
    if let Some(zone) = target["zone"].as_str() {
        return format!("zone {zone}");
    }
    if target["global"] == true {
        return "every machine".to_owned();
    }
    if let Some(list) = target["machines"].as_array() {
        const SHOWN: usize = 3;
        let ids: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
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
        return text;
    }
    target.to_string()
}

/// Machine states from the furthest along to the ones that need attention, the order counts
/// are listed in.
const STATE_ORDER: [&str; 9] = [
    "booted",
    "booting",
    "staged",
    "verifying",
    "downloading",
    "pending",
    "stalled",
    "failed",
    "cancelled",
];

/// "3 booted, 1 downloading"; `note` may add a remark after a state's count ("(pc-03: disk
/// full)"). States this client does not know come last, by name.
pub(crate) fn counts_text(
    counts: &BTreeMap<String, u64>,
    note: impl Fn(&str) -> Option<String>,
) -> String {
    let rank = |state: &str| {
        STATE_ORDER
            .iter()
            .position(|s| *s == state)
            .unwrap_or(STATE_ORDER.len())
    };
    let mut present: Vec<(&String, u64)> = counts
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
pub(crate) fn counts_line(counts: &BTreeMap<String, u64>) -> String {
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

fn plural(n: u64, noun: &str) -> String {
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
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
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
                (s == "failed").then(|| "(pc-03: disk full)".to_owned())
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

    #[test]
    fn targets_read_as_words() {
        assert_eq!(target_text(&json!({"zone": "lab"})), "zone lab");
        assert_eq!(target_text(&json!({"global": true})), "every machine");
        assert_eq!(
            target_text(&json!({"machines": ["pc-01"]})),
            "machine pc-01"
        );
        assert_eq!(
            target_text(&json!({"machines": ["a", "b", "c", "d", "e"]})),
            "machines a, b, c and 2 more"
        );
        assert_eq!(target_text(&json!({"other": 1})), r#"{"other":1}"#);
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

    #[test]
    fn images_resolve_by_id_or_unique_name() {
        let catalog = vec![
            json!({"id": "aa", "name": "win11"}),
            json!({"id": "bb", "name": "ubuntu"}),
            json!({"id": "cc", "name": "ubuntu"}),
        ];
        let server = "http://s:8080";
        assert_eq!(resolve_image(&catalog, "aa", server).unwrap(), "aa");
        assert_eq!(resolve_image(&catalog, "win11", server).unwrap(), "aa");
        let ambiguous = resolve_image(&catalog, "ubuntu", server).unwrap_err();
        assert!(ambiguous.to_string().contains("bb, cc"), "{ambiguous}");
        let unknown = resolve_image(&catalog, "nope", server).unwrap_err();
        assert!(unknown.to_string().contains("image list"), "{unknown}");
    }

    #[test]
    fn deployments_parse_leniently() {
        let d = Deployment::from_json(json!({
            "id": "d-1", "state": "running", "action": "stage", "future_field": [1, 2],
            "machines": [{"id": "pc-01", "state": "pending", "extra": true}]
        }))
        .unwrap();
        assert_eq!(d.machines[0].id, "pc-01");
        assert_eq!(d.raw["future_field"], json!([1, 2]));
        assert!(!d.is_finished());
        assert_eq!(d.state_counts(), counts(&[("pending", 1)]));
    }

    fn client() -> ClientArgs {
        ClientArgs {
            server: "http://s:8080".into(),
            ca_cert: None,
            token: None,
            data_dir: "./data".into(),
            json: false,
        }
    }

    fn http_error(code: Option<ErrorCode>, status: u16, message: Option<&str>) -> anyhow::Error {
        HttpError {
            url: "http://s:8080/api/v1/deployments/d-9".into(),
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            code,
            message: message.map(str::to_owned),
        }
        .into()
    }

    #[test]
    fn refusals_say_what_to_do() {
        let c = client();
        let e = explain(
            &c,
            http_error(Some(ErrorCode::NotFound), 404, Some("unknown")),
            Subject::Deployment("d-9"),
        );
        assert_eq!(
            e.to_string(),
            "no deployment d-9 on http://s:8080; `boottorrent deployments list` shows them"
        );
        let e = explain(
            &c,
            http_error(
                Some(ErrorCode::NoSuchEndpoint),
                404,
                Some("no such endpoint"),
            ),
            Subject::Deployment("d-9"),
        );
        assert!(
            e.to_string().contains("has no /api/v1/deployments/d-9"),
            "{e}"
        );
        // Not the API's body: said so, whatever the status.
        let e = explain(&c, http_error(None, 404, None), Subject::Deployment("d-9"));
        assert!(
            e.to_string().contains("not with the API's error body"),
            "{e}"
        );
        let e = explain(
            &c,
            http_error(Some(ErrorCode::Unauthorized), 401, Some("bad token")),
            Subject::Zone("lab"),
        );
        assert!(e.to_string().contains("--token"), "{e}");
        let e = explain(
            &c,
            http_error(Some(ErrorCode::Conflict), 409, Some("image x is importing")),
            Subject::NewDeployment,
        );
        assert!(
            e.to_string()
                .starts_with("nothing deployed: image x is importing;"),
            "{e}"
        );
        // What the command cannot explain better stays the server's own words.
        let e = explain(
            &c,
            http_error(Some(ErrorCode::Internal), 500, Some("disk")),
            Subject::NewDeployment,
        );
        assert!(
            e.to_string()
                .ends_with("HTTP 500 Internal Server Error: disk"),
            "{e}"
        );
    }
}
