//! The web UI: plain HTML/CSS/JS from `assets/ui/`, embedded in the binary with
//! rust-embed (no build step, no CDN, works offline).
//!
//! Every asset is served with its content type, a strong ETag (the SHA-256 rust-embed
//! computes at build time) and `Cache-Control: no-cache`, so a browser revalidates with
//! `If-None-Match` and gets a bodiless 304 until the binary changes. Text assets above
//! 1 KiB are gzip-compressed once, on first request, when the client accepts gzip.
//! The UI pages carry a strict Content-Security-Policy: only this origin, no inline code.
//!
//! The assets are public (they hold no data); the UI asks for the API token itself.

use super::{ApiError, Body};
use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, ETAG, IF_NONE_MATCH, VARY,
};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

#[derive(rust_embed::RustEmbed)]
#[folder = "assets/ui/"]
struct Assets;

/// Smaller bodies are sent as they are: gzip would save too little to matter.
const GZIP_MIN: usize = 1024;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

fn content_type(path: &str) -> (&'static str, bool) {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "html" => ("text/html; charset=utf-8", true),
        "js" => ("text/javascript; charset=utf-8", true),
        "css" => ("text/css; charset=utf-8", true),
        "svg" => ("image/svg+xml", true),
        "json" | "webmanifest" => ("application/json", true),
        "txt" => ("text/plain; charset=utf-8", true),
        "png" => ("image/png", false),
        "ico" => ("image/x-icon", false),
        _ => ("application/octet-stream", false),
    }
}

/// Gzip bodies, compressed once per asset (the assets never change while running).
fn gzip_cache() -> &'static Mutex<HashMap<String, Bytes>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Bytes>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn gzipped(path: &str, data: &[u8]) -> Option<Bytes> {
    if let Some(b) = gzip_cache().lock().ok()?.get(path) {
        return Some(b.clone());
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).ok()?;
    let out = Bytes::from(enc.finish().ok()?);
    if let Ok(mut c) = gzip_cache().lock() {
        c.insert(path.to_string(), out.clone());
    }
    Some(out)
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    // (named gzip?, q) per listed coding; an explicit `gzip` entry wins over `*`.
    let mut gzip: Option<bool> = None;
    let mut star: Option<bool> = None;
    for enc in headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = enc.split(';');
        let name = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            let p = p.trim();
            (p.starts_with("q=") || p.starts_with("Q="))
                && p[2..].trim().parse::<f32>().is_ok_and(|q| q == 0.0)
        });
        if name.eq_ignore_ascii_case("gzip") {
            gzip = Some(!refused);
        } else if name == "*" {
            star = Some(!refused);
        }
    }
    gzip.or(star).unwrap_or(false)
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

/// `GET /` and `GET /ui/{file}`: an embedded asset, or 404 `not_found`.
pub fn asset(path: &str, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    // rust-embed only knows the embedded names, so `..` and the like find nothing.
    let file = Assets::get(path).ok_or_else(|| ApiError::not_found("page"))?;
    let (ctype, compressible) = content_type(path);
    let hash = file.metadata.sha256_hash();
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    let gzip = compressible && file.data.len() >= GZIP_MIN && accepts_gzip(headers);
    let etag = if gzip {
        format!("\"{hex}-gz\"")
    } else {
        format!("\"{hex}\"")
    };

    let mut resp = if etag_matches(headers, &etag) {
        let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let body = if gzip {
            gzipped(path, &file.data)
        } else {
            None
        };
        let gz = body.is_some();
        let body = body.unwrap_or_else(|| match file.data {
            std::borrow::Cow::Borrowed(b) => Bytes::from_static(b),
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        });
        let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
        if gz {
            r.headers_mut()
                .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(ETAG, v);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if compressible {
        h.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if ctype.starts_with("text/html") {
        h.insert("content-security-policy", HeaderValue::from_static(CSP));
        h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(&hdrs(&[(
            "accept-encoding",
            "gzip, deflate, br"
        )])));
        assert!(accepts_gzip(&hdrs(&[(
            "accept-encoding",
            "br;q=1.0, gzip;q=0.5"
        )])));
        assert!(!accepts_gzip(&hdrs(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&hdrs(&[("accept-encoding", "identity")])));
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert!(!accepts_gzip(&hdrs(&[("accept-encoding", "gzip;q=0, *")])));
        assert!(!accepts_gzip(&hdrs(&[("accept-encoding", "gzip; Q=0")])));
        assert!(accepts_gzip(&hdrs(&[("accept-encoding", "*")])));
    }

    #[test]
    fn every_asset_is_served_with_its_type_and_revalidates() {
        for name in Assets::iter() {
            let r = asset(&name, &HeaderMap::new()).expect("embedded asset");
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            let (ctype, _) = content_type(&name);
            assert_ne!(
                ctype, "application/octet-stream",
                "{name} has no known type"
            );
            let etag = r.headers()[ETAG].to_str().expect("etag").to_string();
            let mut h = HeaderMap::new();
            h.insert(IF_NONE_MATCH, HeaderValue::from_str(&etag).expect("etag"));
            let r2 = asset(&name, &h).expect("embedded asset");
            assert_eq!(r2.status(), StatusCode::NOT_MODIFIED, "{name}");
        }
        assert!(asset("../Cargo.toml", &HeaderMap::new()).is_err());
        assert!(asset("nope.js", &HeaderMap::new()).is_err());
    }
}
