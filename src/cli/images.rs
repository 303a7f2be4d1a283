//! `boottorrent image ...`: the server's catalog of images.

use anyhow::{Context, bail};
use serde_json::Value;

use crate::api::{AddImage, ImageStatus};
use crate::cli::args::{ClientArgs, ImageCommand};
use crate::cli::client::{get, send};
use crate::cli::view::{Image, Word, read};

/// Runs one `image` subcommand and prints its result.
pub async fn run(command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Add {
            file,
            name,
            raw,
            no_wait,
            client,
        } => {
            let path = std::path::absolute(&file)
                .with_context(|| format!("resolving {}", file.display()))?;
            let body = AddImage {
                path: path.clone(),
                name,
                raw,
            };
            let raw = send(
                &client,
                reqwest::Method::POST,
                "/api/v1/images",
                Some(serde_json::to_value(body)?),
            )
            .await?;
            let (raw, image) = if no_wait {
                let image = read(&raw, "image")?;
                (raw, image)
            } else {
                wait_for_import(&client, raw).await?
            };
            if client.json {
                println!("{}", serde_json::to_string_pretty(&raw)?);
                return Ok(());
            }
            match image.state {
                Word::Known(ImageStatus::Duplicate) => println!(
                    "{} has the same content as image {}; nothing new was added",
                    path.display(),
                    image.same_as.as_deref().unwrap_or("?")
                ),
                Word::Known(ImageStatus::Failed) => bail!(
                    "importing {} failed: {}",
                    path.display(),
                    image.error.as_deref().unwrap_or("no reason given")
                ),
                _ => println!(
                    "image {}: {} ({} bytes, info hash {}, {})",
                    image.id,
                    image.name,
                    image.size,
                    image.info_hash.as_deref().unwrap_or("not yet known"),
                    image.state
                ),
            }
        }
        ImageCommand::List(client) => {
            let list = get(&client, "/api/v1/images").await?;
            if client.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_images(&read::<Vec<Image>>(&list, "image list")?);
            }
        }
        ImageCommand::Show { id, client } => {
            let image = get(&client, &format!("/api/v1/images/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&image)?);
        }
        ImageCommand::Rm { id, client } => {
            send(
                &client,
                reqwest::Method::DELETE,
                &format!("/api/v1/images/{id}"),
                None,
            )
            .await?;
            println!("image {id} removed from the catalog (its file is left where it is)");
        }
    }
    Ok(())
}

/// Polls an import until it ends, with a progress bar on a terminal; the last answer, as sent
/// and as read.
async fn wait_for_import(client: &ClientArgs, first: Value) -> anyhow::Result<(Value, Image)> {
    use std::io::IsTerminal;
    let mut image: Image = read(&first, "image")?;
    let id = image.id.clone();
    let total = image.size;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "hashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        eprintln!("importing {id} ({total} bytes)...");
        None
    };
    let mut raw = first;
    // `checking`: imported, and the seeder is reading its resume record (or, for a file that
    // changed during the import, re-hashing it); the image is ready to deploy only after.
    while matches!(image.state, Word::Known(s) if s.is_in_progress()) {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        raw = get(client, &format!("/api/v1/images/{id}")).await?;
        image = read(&raw, "image")?;
        if let Some(bar) = &bar {
            bar.set_position(image.import_done);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((raw, image))
}

fn print_images(images: &[Image]) {
    if images.is_empty() {
        println!("no images yet: add one with `boottorrent image add FILE`");
        return;
    }
    println!(
        "{:<32} {:<11} {:>14} {:<40} {:>6} NAME",
        "ID", "STATE", "SIZE", "INFO HASH", "PEERS"
    );
    for i in images {
        println!(
            "{:<32} {:<11} {:>14} {:<40} {:>6} {}",
            i.id,
            i.state.to_string(),
            i.size,
            i.info_hash.as_deref().unwrap_or("-"),
            i.peers,
            i.name,
        );
    }
}
