//! `boottorrent machines ...`: the fleet's machines, their keys and their event log.

use anyhow::bail;

use crate::api::Approve;
use crate::cli::args::{ClientArgs, MachinesCommand};
use crate::cli::client::{get, get_pages, send};
use crate::cli::view::{LogEntry, Machine, MachineChange, read, running_text};

/// Runs one `machines` subcommand and prints its result.
pub async fn run(command: MachinesCommand) -> anyhow::Result<()> {
    match command {
        MachinesCommand::List { filter, client } => {
            let query = serde_urlencoded::to_string(&filter)?;
            let list = get_pages(&client, &format!("/api/v1/machines?{query}")).await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&read::<Vec<Machine>>(&list, "machine list")?);
            }
        }
        MachinesCommand::Show { id, client } => {
            let machine = get(&client, &format!("/api/v1/machines/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&machine)?);
        }
        MachinesCommand::Log { limit, client } => {
            let log = get(&client, &format!("/api/v1/log?limit={limit}")).await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&log)?);
            } else {
                for e in read::<Vec<LogEntry>>(&log, "event log")? {
                    println!(
                        "{}  {:<12} {:<18} {}",
                        e.at,
                        e.machine.as_deref().unwrap_or("-"),
                        e.kind,
                        e.detail
                    );
                }
            }
        }
        MachinesCommand::Approve {
            id: Some(id),
            fingerprint: Some(fingerprint),
            all_waiting: false,
            client,
        } => approve(&client, &id, &fingerprint).await?,
        MachinesCommand::Approve {
            all_waiting: true,
            client,
            ..
        } => {
            let list = get_pages(&client, "/api/v1/machines").await?;
            let waiting: Vec<(String, String)> = read::<Vec<Machine>>(&list, "machine list")?
                .into_iter()
                .filter_map(|m| Some((m.id, m.pending_fingerprint?)))
                .collect();
            if waiting.is_empty() {
                println!("no machine waits for approval");
            }
            for (id, fingerprint) in &waiting {
                approve(&client, id, fingerprint).await?;
            }
        }
        MachinesCommand::Approve { .. } => {
            bail!("name a machine and its key's fingerprint, or give --all-waiting")
        }
        MachinesCommand::Delete { id, client } => {
            let body = send(
                &client,
                reqwest::Method::DELETE,
                &format!("/api/v1/machines/{id}"),
                None,
            )
            .await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                println!("machine {id}: deleted; it may enroll again");
            }
        }
    }
    Ok(())
}

/// Approves the key `fingerprint` of the waiting machine `id` and prints the outcome.
async fn approve(client: &ClientArgs, id: &str, fingerprint: &str) -> anyhow::Result<()> {
    let body = send(
        client,
        reqwest::Method::POST,
        &format!("/api/v1/machines/{id}/approve"),
        Some(serde_json::to_value(Approve {
            fingerprint: fingerprint.to_owned(),
        })?),
    )
    .await?;
    if client.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        let change: MachineChange = read(&body, "approval")?;
        let key = change.fingerprint.as_deref().unwrap_or("?");
        println!(
            "machine {id}: {} (key {key})",
            change.outcome.to_string().replace('_', " ")
        );
    }
    Ok(())
}

fn print_table(machines: &[Machine]) {
    if machines.is_empty() {
        println!("no machines yet: agents appear here after their first startup");
        return;
    }
    println!(
        "{:<24} {:<7} {:<11} {:<24} {:<20} {:<6} {:<24} ZONES",
        "ID", "ONLINE", "KEY", "LAST SEEN", "HOSTNAME", "IMAGES", "RUNNING"
    );
    for m in machines {
        println!(
            "{:<24} {:<7} {:<11} {:<24} {:<20} {:<6} {:<24} {}",
            m.id,
            if m.online { "yes" } else { "no" },
            m.key_state.to_string(),
            m.last_seen,
            m.hostname,
            m.images.len(),
            running_text(m.running.as_ref()),
            m.zones.join(",")
        );
    }
}
