//! `boottorrent deploy`, `boottorrent deployments ...` and `boottorrent zones ...`: the API's
//! deployments and zones (docs/api.md) for the operator.

use std::collections::BTreeMap;

use anyhow::{Context, anyhow};
use indicatif::HumanBytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{CreateDeployment, Target, ZoneSource};
use crate::cli::args::{
    ClientArgs, DeployArgs, DeploymentsArgs, DeploymentsCommand, ZoneMembers, ZonesArgs,
    ZonesCommand,
};
use crate::cli::client::{Subject, explain, get, get_deployment, list_deployments, send};
use crate::cli::status;
use crate::cli::text::{
    Align, counts_line, counts_text, describe, machines_text, percent_text, plural, rate_text,
    table, target_text, time_text,
};
use crate::cli::view::{Deployment, Word, Zone};

/// `boottorrent deploy`.
pub async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let DeployArgs {
        image,
        target,
        action,
        persistence,
        watch,
        client,
    } = args;
    // The ids were checked as the arguments were parsed.
    let target = if let Some(zone) = target.zone {
        Target::Zone(zone.parse()?)
    } else if target.global {
        Target::Global(true)
    } else {
        Target::Machines(
            target
                .machines
                .iter()
                .map(|id| id.parse())
                .collect::<Result<_, _>>()?,
        )
    };
    let body = CreateDeployment {
        image,
        target,
        action: action.api_action(),
        persistence,
    };
    let raw = send(
        &client,
        reqwest::Method::POST,
        "/api/v1/deployments",
        Some(serde_json::to_value(body)?),
    )
    .await
    .map_err(|e| explain(&client, e, Subject::NewDeployment))?;
    let deployment = Deployment::from_json(raw)?;
    let mut started = format!(
        "deployment {} started: {}, {}",
        deployment.id,
        describe(&deployment),
        machines_text(deployment.machines.len() as u64)
    );
    if deployment.machines.is_empty()
        && !matches!(deployment.target, Word::Known(Target::Machines(_)))
    {
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
                    describe(&deployment),
                    counts_line(&deployment.state_counts())
                );
            }
        }
    }
    Ok(())
}

fn deployments_table(list: &[Deployment]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.image_name.clone(),
                target_text(&d.target),
                d.action.to_string(),
                d.state.to_string(),
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
    if let Some(persistence) = &d.persistence {
        out += &format!("  persist   {persistence}\n");
    }
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
                m.state.to_string(),
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
            if zone.source.is(ZoneSource::Config) {
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
    let source = match zone.source {
        Word::Known(ZoneSource::Config) => "from the server's config file",
        Word::Known(ZoneSource::Api) => "set through the API",
        Word::Unknown(_) => "of unknown origin",
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
                z.source.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
