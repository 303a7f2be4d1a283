//! What every client command uses to talk to the server's HTTP API: the server's address and
//! token, requests, and the API's error answers put in the operator's terms.

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::api::ErrorCode;
use crate::cli::args::ClientArgs;
use crate::cli::view::Deployment;
use crate::server::credentials::read_admin_token;

/// A request that needs the admin token; returns the JSON answer (`null` for 204).
pub(crate) async fn send(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let token = token(client)?;
    let url = url(client, path)?;
    let mut request = http_client(client)?
        .request(method, &url)
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("connecting to {url}; is the server running? (--server)"))?;
    if response.status() == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    answer(&url, response).await
}

pub(crate) fn url(client: &ClientArgs, path: &str) -> anyhow::Result<String> {
    let base = client.server.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        bail!("--server {base:?}: give an http:// or https:// URL");
    }
    Ok(format!("{base}{path}"))
}

/// The token the client commands send: `--token`/`BOOTTORRENT_TOKEN` (the admin token, or
/// the viewer token for commands that only read), else the admin token a local server wrote.
pub(crate) fn token(client: &ClientArgs) -> anyhow::Result<String> {
    match &client.token {
        Some(t) => Ok(t.clone()),
        None => read_admin_token(&client.data_dir),
    }
}

/// A read of the API; reads need a token as well.
pub(crate) async fn get(client: &ClientArgs, path: &str) -> anyhow::Result<Value> {
    let token = token(client)?;
    let url = url(client, path)?;
    let response = http_client(client)?
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("connecting to {url}; is the server running? (--server)"))?;
    answer(&url, response).await
}

/// A paged list of the API, every page: the answers' arrays one after the other, following
/// each answer's `Link: <...>; rel="next"` header.
pub(crate) async fn get_pages(client: &ClientArgs, path: &str) -> anyhow::Result<Value> {
    let token = token(client)?;
    let http = http_client(client)?;
    let mut all = Vec::new();
    let mut next = Some(path.to_owned());
    while let Some(path) = next.take() {
        let url = url(client, &path)?;
        let response = http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .with_context(|| format!("connecting to {url}; is the server running? (--server)"))?;
        next = response
            .headers()
            .get_all(reqwest::header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(next_link)
            .map(str::to_owned);
        match answer(&url, response).await? {
            Value::Array(page) => all.extend(page),
            other => bail!("{url} answered {other}, not a list"),
        }
    }
    Ok(Value::Array(all))
}

/// The target of a `Link` header's `rel="next"` entry: `</api/v1/x?after=a>; rel="next"`.
fn next_link(header: &str) -> Option<&str> {
    header.split(',').find_map(|entry| {
        let (target, params) = entry.trim().split_once(';')?;
        let next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == r#"rel="next""#);
        next.then(|| target.trim().strip_prefix('<')?.strip_suffix('>'))?
    })
}

/// The HTTP client of every command: the system's trusted CAs, plus `--ca-cert` for a server
/// whose HTTPS certificate the site's own CA signed.
pub(crate) fn http_client(client: &ClientArgs) -> anyhow::Result<reqwest::Client> {
    let mut builder =
        reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
    if let Some(path) = &client.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the CA certificate {}", path.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate (--ca-cert)", path.display()))?;
        builder = builder.add_root_certificate(ca);
    }
    builder.build().context("setting up the HTTP client")
}

/// An error answer of the server. It stays a type (inside `anyhow::Error`) so that a command
/// can put the API's error code in its own terms: which id is unknown, how to list what
/// exists.
#[derive(Debug, thiserror::Error)]
#[error("{url}: HTTP {status}: {}", message.as_deref().unwrap_or("no message"))]
pub(crate) struct HttpError {
    pub url: String,
    pub status: reqwest::StatusCode,
    /// The API's error code; `None` when the body was not the API's JSON (a proxy's page, a
    /// server older than the codes).
    pub code: Option<ErrorCode>,
    /// The API's `error` text, when the body had one.
    pub message: Option<String>,
}

/// The JSON body of a successful response, or the server's `error` message as the error.
async fn answer(url: &str, response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let response = succeeded(url, response).await?;
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("reading the answer of {url} (HTTP {status})"))?;
    Ok(body)
}

/// The response if its status is a success, else its error as an [`HttpError`].
pub(crate) async fn succeeded(
    url: &str,
    response: reqwest::Response,
) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: Option<Value> = response.json().await.ok();
    let message = body
        .as_ref()
        .and_then(|b| b["error"].as_str().map(str::to_owned));
    let code = body.and_then(|b| serde_json::from_value(b["code"].clone()).ok());
    Err(HttpError {
        url: url.to_owned(),
        status,
        code,
        message,
    }
    .into())
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_next_page_is_the_link_marked_next() {
        assert_eq!(
            next_link(r#"</api/v1/machines?limit=10&after=pc-09>; rel="next""#),
            Some("/api/v1/machines?limit=10&after=pc-09")
        );
        assert_eq!(
            next_link(r#"</first>; rel="first", </second>; rel = "next""#),
            Some("/second")
        );
        assert_eq!(next_link(r#"</first>; rel="first""#), None);
        assert_eq!(next_link("garbage"), None);
        assert_eq!(next_link(r#"/no-brackets; rel="next""#), None);
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
