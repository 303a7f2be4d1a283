//! The server's HTTP API as the generator uses it: with the admin token, timed.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(base: &str, token: String) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .context("building the HTTP client")?,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// `GET path` as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.timed_get(path).await.1
    }

    /// `GET path` as `T`, and how long the answer took (until its whole body was read).
    pub async fn timed_get<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> (Duration, anyhow::Result<T>) {
        let sent = Instant::now();
        let body = self.call(reqwest::Method::GET, path, None).await;
        (
            sent.elapsed(),
            body.and_then(|bytes| parse(&bytes, "GET", path)),
        )
    }

    /// `method path` with a JSON body; the answer as JSON.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let bytes = self.call(method.clone(), path, Some(body)).await?;
        parse(&bytes, method.as_str(), path)
    }

    /// `GET path` as text (the Prometheus exposition of `/metrics`).
    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        let bytes = self.call(reqwest::Method::GET, path, None).await?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("GET {path}: not UTF-8"))
    }

    /// The body of the answer to `method path`, which must be a success.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<bytes::Bytes> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {method} {url}"))?;
        if !status.is_success() {
            bail!(
                "{method} {url}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(bytes)
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8], method: &str, path: &str) -> anyhow::Result<T> {
    serde_json::from_slice(bytes)
        .with_context(|| format!("{method} {path}: the answer is not the JSON expected"))
}
