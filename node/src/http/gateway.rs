//! The trustless gateway: `GET /ipfs/{cid}[/path]` answers a file's bytes (with byte ranges),
//! a single block (`?format=raw` or `Accept: application/vnd.ipld.raw`) or the DAG as a CARv1
//! (`?format=car` or `Accept: application/vnd.ipld.car`, `dag-scope=all|entity|block`, and
//! `entity-bytes=FROM:TO` for only the blocks that prove a byte range of a file), so
//! verifying clients can check every byte they get. Paths walk UnixFS directories (a job's
//! output: `/ipfs/{output}/part-00000`).

use super::{car_body, car_range_body, content_type, file_body, parse_cid, Api, ApiError, Params};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use p2pmr_protocol::car;
use p2pmr_protocol::unixfs::{directory_entries, FileReader};
use p2pmr_protocol::Cid;

const RAW: &str = "application/vnd.ipld.raw";
const CAR: &str = "application/vnd.ipld.car";
/// What a CAR answer is: CARv1, blocks depth-first, each once.
const CAR_TYPE: &str = "application/vnd.ipld.car; version=1; order=dfs; dups=n";
/// Content addressed: an answer never changes.
const IMMUTABLE: &str = "public, max-age=29030400, immutable";

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/ipfs/{cid}", get(root))
        .route("/ipfs/{cid}/{*path}", get(with_path))
}

async fn root(
    State(api): State<Api>,
    Path(cid): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&cid)?;
    answer(&api, cid, &params, &headers).await
}

async fn with_path(
    State(api): State<Api>,
    Path((cid, path)): Path<(String, String)>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let mut cid = parse_cid(&cid)?;
    for name in path.split('/').filter(|s| !s.is_empty()) {
        let block = api.block(cid).await?;
        let entries = directory_entries(&block)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?
            .ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("{cid} is not a directory"))
            })?;
        cid = entries
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.cid)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no link named {name:?} under {cid}"),
                )
            })?;
    }
    answer(&api, cid, &params, &headers).await
}

/// The format asked for, by `?format=` first, then `Accept`.
fn format(params: &Params, headers: &HeaderMap) -> Result<Option<&'static str>, ApiError> {
    match params.get("format").map(String::as_str) {
        Some("raw") => return Ok(Some(RAW)),
        Some("car") => return Ok(Some(CAR)),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format {other:?} is not served (raw or car)"
            )))
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok([RAW, CAR].into_iter().find(|f| accept.contains(f)))
}

async fn answer(
    api: &Api,
    cid: Cid,
    params: &Params,
    request: &HeaderMap,
) -> Result<Response, ApiError> {
    let format = format(params, request)?;
    let block = api.block(cid).await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    headers.insert(
        "x-ipfs-path",
        HeaderValue::from_str(&format!("/ipfs/{cid}")).expect("a valid value"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    match format {
        Some(RAW) => {
            content_type(&mut headers, RAW);
            etag(&mut headers, cid, "raw");
            Ok((headers, block.into_data()).into_response())
        }
        Some(_) => {
            content_type(&mut headers, CAR_TYPE);
            etag(&mut headers, cid, "car");
            let file_size = {
                let mut reader = FileReader::new(cid);
                reader.feed(&block).ok().and(reader.file_size())
            };
            let scope = params.get("dag-scope").map(String::as_str);
            // entity-bytes implies dag-scope=entity, and is ignored for what is not a file.
            if let (Some(spec), Some(size)) = (params.get("entity-bytes"), file_size) {
                let (from, to) = parse_entity_bytes(spec)?;
                return match resolve_entity_bytes(from, to, size) {
                    Entity::Range(first, last) => {
                        etag(&mut headers, cid, &format!("car.{first}-{last}"));
                        let body = car_range_body(api, cid, first, last);
                        Ok((headers, body).into_response())
                    }
                    Entity::Empty => Ok((headers, single_block_car(&block)).into_response()),
                    Entity::Outside => Err(ApiError::bad_request(format!(
                        "entity-bytes={spec} is outside the {size} bytes of {cid}"
                    ))),
                };
            }
            if params
                .get("entity-bytes")
                .is_some_and(|s| parse_entity_bytes(s).is_err())
            {
                return Err(ApiError::bad_request("entity-bytes must be FROM:TO"));
            }
            match scope {
                None | Some("all") => Ok((headers, car_body(api, cid)).into_response()),
                // A file's entity is all of it; a directory's is its own block (its entries
                // are entities of their own).
                Some("entity") if file_size.is_some() => {
                    Ok((headers, car_body(api, cid)).into_response())
                }
                Some("entity" | "block") => Ok((headers, single_block_car(&block)).into_response()),
                Some(other) => Err(ApiError::bad_request(format!(
                    "dag-scope {other:?} is not served"
                ))),
            }
        }
        None => {
            let mut reader = FileReader::new(cid);
            reader.feed(&block).map_err(|_| {
                ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    format!("{cid} is not a file; ask for ?format=car to get its DAG"),
                )
            })?;
            let size = reader.file_size().unwrap_or(0);
            etag(&mut headers, cid, "");
            content_type(&mut headers, "application/octet-stream");
            headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            let (status, start, len) = match range(request, size) {
                Ok(None) => (StatusCode::OK, 0, size),
                Ok(Some((start, end))) => {
                    let value = format!("bytes {start}-{end}/{size}");
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&value).expect("valid"),
                    );
                    (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
                }
                Err(()) => {
                    let value = format!("bytes */{size}");
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&value).expect("valid"),
                    );
                    return Ok((StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response());
                }
            };
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok((status, headers, file_body(api, cid, start, Some(len))).into_response())
        }
    }
}

/// A CAR of the one block.
fn single_block_car(block: &p2pmr_protocol::Block) -> Vec<u8> {
    let cid = block.cid();
    let mut bytes = car::header_v1(&[*cid]);
    bytes.extend(car::section_prefix(cid, block.len()));
    bytes.extend_from_slice(block.data());
    bytes
}

/// One end of `entity-bytes=FROM:TO`: an offset (negative: from the end) or `*`, the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    At(i64),
    End,
}

/// Parses `FROM:TO` (FROM an integer, TO an integer or `*`).
fn parse_entity_bytes(spec: &str) -> Result<(i64, Bound), ApiError> {
    let bad = || ApiError::bad_request(format!("entity-bytes={spec} is not FROM:TO"));
    let (from, to) = spec.split_once(':').ok_or_else(bad)?;
    let from = from.trim().parse().map_err(|_| bad())?;
    let to = match to.trim() {
        "*" => Bound::End,
        n => Bound::At(n.parse().map_err(|_| bad())?),
    };
    Ok((from, to))
}

/// What `entity-bytes` asks of a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Entity {
    /// Bytes `first..=last`, within the file.
    Range(u64, u64),
    /// No bytes: the answer is the root block alone, from which a client can tell why.
    Empty,
    /// Starts past the end: refused.
    Outside,
}

fn resolve_entity_bytes(from: i64, to: Bound, size: u64) -> Entity {
    let offset = |n: i64| -> i128 {
        if n < 0 {
            (i128::from(size) + i128::from(n)).max(0)
        } else {
            i128::from(n)
        }
    };
    let first = offset(from);
    let last = match to {
        Bound::End => i128::from(size) - 1,
        Bound::At(n) => offset(n).min(i128::from(size) - 1),
    };
    if first >= i128::from(size) {
        Entity::Outside
    } else if last < first {
        Entity::Empty
    } else {
        // Both within 0..size here.
        Entity::Range(first as u64, last as u64)
    }
}

fn etag(headers: &mut HeaderMap, cid: Cid, suffix: &str) {
    let tag = match suffix {
        "" => format!("\"{cid}\""),
        s => format!("\"{cid}.{s}\""),
    };
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&tag).expect("a valid value"),
    );
}

/// The single byte range asked for in `Range: bytes=...` as inclusive `(first, last)`, `None`
/// for the whole file; `Err` when it cannot be served (416).
fn range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = value.to_str().map_err(drop)?.trim();
    let spec = spec.strip_prefix("bytes=").ok_or(())?;
    if spec.contains(',') {
        return Err(()); // one range at a time
    }
    let (first, last) = spec.split_once('-').ok_or(())?;
    let (first, last) = match (first.trim(), last.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(drop)?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
        }
        (a, "") => (a.parse().map_err(drop)?, size.checked_sub(1).ok_or(())?),
        (a, b) => {
            let (a, b): (u64, u64) = (a.parse().map_err(drop)?, b.parse().map_err(drop)?);
            (a, b.min(size.saturating_sub(1)))
        }
    };
    if first > last || first >= size {
        return Err(());
    }
    Ok(Some((first, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_bytes_as_the_trustless_gateway_reads_them() {
        let parse = |s: &str| parse_entity_bytes(s).map_err(|e| e.message);
        assert_eq!(parse("0:*"), Ok((0, Bound::End)));
        assert_eq!(parse("-1024:*"), Ok((-1024, Bound::End)));
        assert_eq!(parse("499:-1000"), Ok((499, Bound::At(-1000))));
        for bad in ["", "5", "a:b", "1:2:3", "*:5", "1.5:2"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        for (from, to, size, want) in [
            (0, Bound::End, 100, Entity::Range(0, 99)),
            (0, Bound::At(0), 100, Entity::Range(0, 0)),
            (-10, Bound::End, 100, Entity::Range(90, 99)),
            (-1000, Bound::End, 100, Entity::Range(0, 99)),
            (10, Bound::At(-10), 100, Entity::Range(10, 90)),
            (50, Bound::At(5000), 100, Entity::Range(50, 99)),
            (99, Bound::At(99), 100, Entity::Range(99, 99)),
            (100, Bound::End, 100, Entity::Outside),
            (i64::MAX, Bound::End, 100, Entity::Outside),
            (50, Bound::At(10), 100, Entity::Empty),
            (50, Bound::At(-60), 100, Entity::Empty),
            (0, Bound::End, 0, Entity::Outside),
            (i64::MIN, Bound::At(i64::MIN), 100, Entity::Range(0, 0)),
        ] {
            assert_eq!(
                resolve_entity_bytes(from, to, size),
                want,
                "{from}:{to:?} of {size}"
            );
        }
    }

    #[test]
    fn byte_ranges_as_rfc_9110_reads_them() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(range(&HeaderMap::new(), 100), Ok(None));
        for (value, size, want) in [
            ("bytes=0-9", 100, Ok(Some((0, 9)))),
            ("bytes=90-", 100, Ok(Some((90, 99)))),
            ("bytes=-10", 100, Ok(Some((90, 99)))),
            ("bytes=-500", 100, Ok(Some((0, 99)))),
            ("bytes=50-500", 100, Ok(Some((50, 99)))),
            ("bytes=99-99", 100, Ok(Some((99, 99)))),
            ("bytes=100-", 100, Err(())),
            ("bytes=10-5", 100, Err(())),
            ("bytes=0-1,5-6", 100, Err(())),
            ("bytes=-0", 100, Err(())),
            ("items=0-1", 100, Err(())),
            ("bytes=0-", 0, Err(())),
            ("bytes=x-y", 100, Err(())),
        ] {
            assert_eq!(range(&h(value), size), want, "{value} of {size}");
        }
    }
}
