//! The operator's web dashboard: three static files compiled into the binary, so the appliance
//! serves it with nothing to install and nothing fetched from outside. The page itself reads
//! the same HTTP API as the command line (see `assets/dashboard/app.js`).
//!
//! Caching: the files change exactly when the binary is upgraded, and a browser holding an old
//! `app.js` against a newer API would break in confusing ways. So every response is
//! `no-cache` (the browser must ask again) with an `ETag` computed at compile time from the
//! content: a reload costs one `304 Not Modified` round trip on the site network.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// FNV-1a of the body: any stable digest will do, it only has to change with the content.
    digest: u64,
}

const fn asset(body: &'static [u8], content_type: &'static str) -> Asset {
    Asset {
        body,
        content_type,
        digest: fnv1a(body),
    }
}

/// 64-bit FNV-1a; `const` so that the ETags cost nothing at run time.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

static INDEX: Asset = asset(
    include_bytes!("../../../assets/dashboard/index.html"),
    "text/html; charset=utf-8",
);
static APP_JS: Asset = asset(
    include_bytes!("../../../assets/dashboard/app.js"),
    "text/javascript; charset=utf-8",
);
static STYLE_CSS: Asset = asset(
    include_bytes!("../../../assets/dashboard/style.css"),
    "text/css; charset=utf-8",
);

/// The page allows only its own scripts, styles and API calls: no inline script, nothing from
/// another origin, and it cannot be framed by another site (the admin token is typed into it).
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The dashboard's routes; stateless, to be merged into the API's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/assets/dashboard/app.js",
            get(|h: HeaderMap| async move { serve(&APP_JS, &h) }),
        )
        .route(
            "/assets/dashboard/style.css",
            get(|h: HeaderMap| async move { serve(&STYLE_CSS, &h) }),
        )
        // Browsers ask for it on their own; an empty answer keeps their consoles free of 404s.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.digest);
    let headers = [
        (header::ETAG, etag.clone()),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (
            header::CONTENT_SECURITY_POLICY,
            CONTENT_SECURITY_POLICY.to_owned(),
        ),
    ];
    if matches_etag(request.get(header::IF_NONE_MATCH), &etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (
        headers,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

/// `If-None-Match` holds `*` or a list of tags, weak (`W/"..."`) ones included; for a GET the
/// weak comparison applies (RFC 9110, 13.1.2).
fn matches_etag(if_none_match: Option<&HeaderValue>, etag: &str) -> bool {
    let Some(value) = if_none_match.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    value.split(',').map(str::trim).any(|tag| {
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the dashboard on a free loopback port; returns its base URL.
    async fn start() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, routes::<()>()).await.unwrap();
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn serves_each_file_with_its_type_and_revalidation_headers() {
        let base = start().await;
        let client = reqwest::Client::new();
        for (path, content_type, body) in [
            ("/", "text/html; charset=utf-8", INDEX.body),
            (
                "/assets/dashboard/app.js",
                "text/javascript; charset=utf-8",
                APP_JS.body,
            ),
            (
                "/assets/dashboard/style.css",
                "text/css; charset=utf-8",
                STYLE_CSS.body,
            ),
        ] {
            let response = client.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let headers = response.headers().clone();
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
            let etag = headers[header::ETAG].to_str().unwrap().to_owned();
            assert_eq!(&response.bytes().await.unwrap()[..], body, "{path}");

            // The browser's revalidation gets a bodiless 304, weak tag or not.
            for tag in [etag.clone(), format!("W/{etag}"), format!("\"x\", {etag}")] {
                let again = client
                    .get(format!("{base}{path}"))
                    .header(header::IF_NONE_MATCH, tag.as_str())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path} {tag}");
                assert!(again.bytes().await.unwrap().is_empty());
            }
            let changed = client
                .get(format!("{base}{path}"))
                .header(header::IF_NONE_MATCH, "\"0000000000000000\"")
                .send()
                .await
                .unwrap();
            assert_eq!(changed.status(), StatusCode::OK, "{path}");
        }
    }

    #[test]
    fn the_page_loads_only_files_that_are_served_and_nothing_from_outside() {
        let index = std::str::from_utf8(INDEX.body).unwrap();
        for referenced in ["/assets/dashboard/app.js", "/assets/dashboard/style.css"] {
            assert!(index.contains(&format!("\"{referenced}\"")), "{referenced}");
        }
        // Air-gapped sites: no CDN, no web fonts, no inline script (the CSP forbids it).
        for asset in [&INDEX, &APP_JS, &STYLE_CSS] {
            let text = std::str::from_utf8(asset.body).unwrap();
            for outside in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(
                    !text.contains(outside),
                    "{outside} in {}",
                    asset.content_type
                );
            }
        }
        assert!(!index.contains("<script>"), "inline script in index.html");
        assert!(!index.contains("<style"), "inline style in index.html");
    }

    #[test]
    fn distinct_files_get_distinct_tags() {
        assert_ne!(INDEX.digest, APP_JS.digest);
        assert_ne!(APP_JS.digest, STYLE_CSS.digest);
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
