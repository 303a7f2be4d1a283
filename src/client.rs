//! The operator's client commands: `boottorrent machines ...` against the HTTP API.

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::{ClientArgs, MachinesCommand};
use crate::credentials::read_admin_token;

/// Runs one `machines` subcommand and prints its result.
pub async fn machines(command: MachinesCommand) -> anyhow::Result<()> {
    match command {
        MachinesCommand::List(client) => {
            let list = get(&client, "/api/v1/machines").await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(list.as_array().map(Vec::as_slice).unwrap_or_default());
            }
        }
        MachinesCommand::Show { id, client } => {
            let machine = get(&client, &format!("/api/v1/machines/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&machine)?);
        }
        MachinesCommand::Approve { id, client } => {
            let token = match &client.token {
                Some(t) => t.clone(),
                None => read_admin_token(&client.data_dir)?,
            };
            let url = url(&client, &format!("/api/v1/machines/{id}/approve"))?;
            let response = reqwest::Client::new()
                .post(&url)
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| {
                    format!("connecting to {url}; is the server running? (--server)")
                })?;
            let body = answer(&url, response).await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                let outcome = body["outcome"].as_str().unwrap_or("approved");
                let key = body["public_key"].as_str().unwrap_or("?");
                println!("machine {id}: {} (key {key})", outcome.replace('_', " "));
            }
        }
    }
    Ok(())
}

fn url(client: &ClientArgs, path: &str) -> anyhow::Result<String> {
    let base = client.server.trim_end_matches('/');
    if !base.starts_with("http://") {
        bail!("--server {base:?}: only http:// URLs are supported by this client");
    }
    Ok(format!("{base}{path}"))
}

async fn get(client: &ClientArgs, path: &str) -> anyhow::Result<Value> {
    let url = url(client, path)?;
    let response = reqwest::get(&url)
        .await
        .with_context(|| format!("connecting to {url}; is the server running? (--server)"))?;
    answer(&url, response).await
}

/// The JSON body of a successful response, or the server's `error` message as the error.
async fn answer(url: &str, response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("reading the answer of {url} (HTTP {status})"))?;
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or("no message");
        bail!("{url}: HTTP {status}: {message}");
    }
    Ok(body)
}

fn print_table(machines: &[Value]) {
    if machines.is_empty() {
        println!("no machines yet: agents appear here after their first startup");
        return;
    }
    println!(
        "{:<24} {:<7} {:<11} {:<24} {:<20} {:<6} ZONES",
        "ID", "ONLINE", "KEY", "LAST SEEN", "HOSTNAME", "IMAGES"
    );
    for m in machines {
        let text = |k: &str| m[k].as_str().unwrap_or("").to_owned();
        let zones: Vec<&str> = m["zones"]
            .as_array()
            .map(|z| z.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:<7} {:<11} {:<24} {:<20} {:<6} {}",
            text("id"),
            if m["online"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            text("key_state"),
            text("last_seen"),
            text("hostname"),
            m["images"].as_array().map_or(0, Vec::len),
            zones.join(",")
        );
    }
}
