//! The HTTP API and gateway of a daemon over a real socket on 127.0.0.1: kubo's RPC shapes,
//! the trustless gateway's formats and ranges, kubo's error shape, and the bearer token.

use super::client;
use anyhow::{bail, Result};
use p2pmr_node::cluster::{Cluster, ClusterConfig};
use p2pmr_node::{ApiConfig, Replicas};
use p2pmr_protocol::car::{CarEvent, CarReader};
use p2pmr_protocol::chunker::Chunker;
use p2pmr_protocol::dagpb::PbNode;
use p2pmr_protocol::unixfs::{directory, DirEntry, Layout};
use serde_json::Value;
use std::io::Cursor;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 answer: status, headers (names lower-cased), body (de-chunked).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// One request with `Connection: close`, read to the end.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer> {
    http_body(addr, method, path, headers, &[]).await
}

/// The head of a request with a body of `len` bytes.
fn request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    len: usize,
) -> String {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {len}\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// `POST /api/v0/mr/run` with `spec` as its JSON body.
async fn run_job(api: SocketAddr, spec: &Value) -> Result<Answer> {
    let json = [("Content-Type", "application/json")];
    http_body(
        api,
        "POST",
        "/api/v0/mr/run",
        &json,
        spec.to_string().as_bytes(),
    )
    .await
}

async fn http_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = request_head(addr, method, path, headers, body.len());
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no header end in {:?}", String::from_utf8_lossy(&raw));
    };
    let head = String::from_utf8(raw[..split].to_vec())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked")
    {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl])?.trim(), 16)?;
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// The CIDs of a CAR's blocks, in order.
fn car_cids(body: &[u8]) -> Result<Vec<p2pmr_protocol::Cid>> {
    let mut reader = CarReader::new();
    reader.feed(body);
    let mut cids = Vec::new();
    while let Some(e) = reader.next_event()? {
        if let CarEvent::Block(block) = e {
            cids.push(*block.cid());
        }
    }
    reader.end()?;
    Ok(cids)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
}

async fn cluster_with_api(token: Option<&str>) -> Result<Cluster> {
    cluster_serving(2, token, p2pmr_node::HEADER_TIMEOUT).await
}

/// `daemons` linked daemons, each serving the API on a free loopback port.
async fn cluster_serving(
    daemons: usize,
    token: Option<&str>,
    header_timeout: std::time::Duration,
) -> Result<Cluster> {
    let mut config = ClusterConfig::linked(daemons, 1);
    config.daemon.api = Some(ApiConfig {
        addr: "127.0.0.1:0".parse()?,
        next_free: false,
        header_timeout,
        token: token.map(str::to_owned),
    });
    Ok(Cluster::start(config).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_subset_answers_in_kubos_shapes() -> Result<()> {
    let cluster = cluster_with_api(None).await?;
    let api = cluster.daemon(0).api_addr().expect("an API");
    let node = client(&cluster, 2).await?;
    let bytes = data(3 * 262_144 + 99);
    let added = node
        .blocks()
        .add(Cursor::new(bytes.clone()), Replicas::network(2))
        .await?;
    let cid = added.root.to_string();

    let id = http(api, "POST", "/api/v0/id", &[]).await?;
    assert_eq!(id.status, 200);
    assert_eq!(id.json()["ID"], cluster.daemon(0).peer_id().to_string());
    assert!(!id.json()["PublicKey"].as_str().unwrap_or("").is_empty());
    assert!(id.json()["Addresses"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    assert_eq!(
        http(api, "POST", "/api/v0/version", &[]).await?.json()["Version"],
        env!("CARGO_PKG_VERSION")
    );
    let peers = http(api, "POST", "/api/v0/swarm/peers", &[]).await?.json();
    assert_eq!(
        peers["Peers"][0]["Peer"],
        cluster.daemon(1).peer_id().to_string()
    );
    assert!(
        http(api, "POST", "/api/v0/repo/stat", &[]).await?.json()["NumObjects"].as_u64() > Some(0)
    );

    let cat = http(api, "POST", &format!("/api/v0/cat?arg={cid}"), &[]).await?;
    assert_eq!((cat.status, cat.body.len()), (200, bytes.len()));
    assert!(cat.body == bytes, "cat is bit-exact");
    let part = http(
        api,
        "POST",
        &format!("/api/v0/cat?arg={cid}&offset=262140&length=10"),
        &[],
    )
    .await?;
    assert_eq!(part.body, bytes[262_140..262_150]);
    let block = http(api, "POST", &format!("/api/v0/block/get?arg={cid}"), &[]).await?;
    let stat = http(api, "POST", &format!("/api/v0/block/stat?arg={cid}"), &[])
        .await?
        .json();
    assert_eq!(stat["Key"], cid);
    assert_eq!(stat["Size"].as_u64(), Some(block.body.len() as u64));

    let car = http(api, "POST", &format!("/api/v0/dag/export?arg={cid}"), &[]).await?;
    assert_eq!(car.header("content-type"), Some("application/vnd.ipld.car"));
    let mut reader = CarReader::new();
    reader.feed(&car.body);
    let mut blocks = 0;
    while let Some(e) = reader.next_event()? {
        match e {
            CarEvent::Header { roots, .. } => assert_eq!(roots, vec![added.root]),
            CarEvent::Block(_) => blocks += 1,
        }
    }
    reader.end()?;
    assert_eq!(blocks, added.blocks);

    // Errors: kubo's JSON shape and a status that says what is wrong.
    let unknown = *p2pmr_protocol::Block::raw(b"never added".to_vec()).cid();
    for (path, status) in [
        ("/api/v0/cat?arg=nonsense".to_string(), 400),
        ("/api/v0/cat".to_string(), 400),
        (format!("/api/v0/cat?arg={cid}&offset=-1"), 400),
        (format!("/api/v0/cat?arg={unknown}"), 404),
        (format!("/api/v0/block/get?arg={unknown}"), 404),
        (format!("/api/v0/dag/export?arg={unknown}"), 404),
        ("/api/v0/no/such/command".to_string(), 404),
    ] {
        let answer = http(api, "POST", &path, &[]).await?;
        assert_eq!(answer.status, status, "{path}");
        let json = answer.json();
        assert!(
            json["Message"].as_str().is_some_and(|m| !m.is_empty()),
            "{path}: {json}"
        );
        assert_eq!(
            (json["Code"].as_u64(), json["Type"].as_str()),
            (Some(0), Some("error"))
        );
    }
    assert_eq!(http(api, "GET", "/api/v0/id", &[]).await?.status, 405);
    node.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_files_ranges_blocks_cars_and_paths() -> Result<()> {
    let cluster = cluster_with_api(None).await?;
    let api = cluster.daemon(1).api_addr().expect("an API");
    let node = client(&cluster, 2).await?;
    let bytes = data(2 * 262_144 + 5);
    let added = node
        .blocks()
        .add(Cursor::new(bytes.clone()), Replicas::network(2))
        .await?;
    let cid = added.root;

    let file = http(api, "GET", &format!("/ipfs/{cid}"), &[]).await?;
    assert_eq!(file.status, 200);
    assert!(file.body == bytes);
    assert_eq!(
        file.header("content-length"),
        Some(bytes.len().to_string().as_str())
    );
    assert_eq!(file.header("etag"), Some(format!("\"{cid}\"").as_str()));
    let head = http(api, "HEAD", &format!("/ipfs/{cid}"), &[]).await?;
    assert_eq!((head.status, head.body.len()), (200, 0));

    let range = http(
        api,
        "GET",
        &format!("/ipfs/{cid}"),
        &[("Range", "bytes=262140-262149")],
    )
    .await?;
    assert_eq!(range.status, 206);
    assert_eq!(range.body, bytes[262_140..262_150]);
    let total = bytes.len();
    assert_eq!(
        range.header("content-range"),
        Some(format!("bytes 262140-262149/{total}").as_str())
    );
    let tail = http(
        api,
        "GET",
        &format!("/ipfs/{cid}"),
        &[("Range", "bytes=-3")],
    )
    .await?;
    assert_eq!(tail.body, bytes[total - 3..]);
    let past = http(
        api,
        "GET",
        &format!("/ipfs/{cid}"),
        &[("Range", "bytes=999999999-")],
    )
    .await?;
    assert_eq!(past.status, 416);

    let raw = http(api, "GET", &format!("/ipfs/{cid}?format=raw"), &[]).await?;
    assert_eq!(raw.header("content-type"), Some("application/vnd.ipld.raw"));
    let root = p2pmr_protocol::Block::new(cid, raw.body.clone())?;
    let by_accept = http(
        api,
        "GET",
        &format!("/ipfs/{cid}"),
        &[("Accept", "application/vnd.ipld.raw")],
    )
    .await?;
    assert_eq!(by_accept.body, root.data());
    let car = http(
        api,
        "GET",
        &format!("/ipfs/{cid}"),
        &[("Accept", "application/vnd.ipld.car")],
    )
    .await?;
    assert_eq!(
        car.header("content-type"),
        Some("application/vnd.ipld.car; version=1; order=dfs; dups=n")
    );
    let count = |body: &[u8]| -> Result<u64> {
        let mut reader = CarReader::new();
        reader.feed(body);
        let mut n = 0;
        while let Some(e) = reader.next_event()? {
            n += u64::from(matches!(e, CarEvent::Block(_)));
        }
        reader.end()?;
        Ok(n)
    };
    assert_eq!(count(&car.body)?, added.blocks);
    let one = http(
        api,
        "GET",
        &format!("/ipfs/{cid}?format=car&dag-scope=block"),
        &[],
    )
    .await?;
    assert_eq!(count(&one.body)?, 1);

    // entity-bytes: only the blocks that prove the range: the root and the leaves over it.
    let leaves = PbNode::decode(root.data())?.links;
    let proof = |spec: &str| {
        let path = format!("/ipfs/{cid}?format=car&entity-bytes={spec}");
        async move { http(api, "GET", &path, &[]).await }
    };
    for (spec, want) in [
        ("0:0", vec![0]),
        ("262143:262144", vec![0, 1]),
        ("262144:524287", vec![1]),
        ("-5:*", vec![2]),
        ("10:-10", vec![0, 1]),
        ("10:-5", vec![0, 1, 2]),
        ("0:*", vec![0, 1, 2]),
        ("524288:99999999", vec![2]),
    ] {
        let answer = proof(spec).await?;
        assert_eq!(answer.status, 200, "{spec}");
        let mut want: Vec<_> = want.iter().map(|&i| leaves[i].hash).collect();
        want.insert(0, cid);
        assert_eq!(car_cids(&answer.body)?, want, "{spec}");
        assert!(
            answer.header("etag").is_some_and(|e| e.contains(".car.")),
            "{spec}"
        );
    }
    // A range of no bytes gives the root alone; one past the end, or nonsense, is refused.
    assert_eq!(car_cids(&proof("100:50").await?.body)?, vec![cid]);
    for bad in ["524293:*", "x:y", "7"] {
        assert_eq!(proof(bad).await?.status, 400, "{bad}");
    }

    // A path through a directory, as a job's output is read.
    let dir = directory(vec![DirEntry {
        name: "part-00000".into(),
        cid,
        tsize: bytes.len() as u64,
    }]);
    let store = cluster.daemon(1).repo().blocks().clone();
    store.put(&dir)?;
    let through = http(api, "GET", &format!("/ipfs/{}/part-00000", dir.cid()), &[]).await?;
    assert!(through.status == 200 && through.body == bytes);
    assert_eq!(
        http(api, "GET", &format!("/ipfs/{}/nope", dir.cid()), &[])
            .await?
            .status,
        404
    );
    assert_eq!(
        http(api, "GET", &format!("/ipfs/{}", dir.cid()), &[])
            .await?
            .status,
        501
    );

    // kubo's get: the directory as a tar stream, which tar itself extracts.
    let tar = http(api, "POST", &format!("/api/v0/get?arg={}", dir.cid()), &[]).await?;
    assert_eq!(tar.header("content-type"), Some("application/x-tar"));
    let out = tempfile::tempdir()?;
    let archive = out.path().join("out.tar");
    std::fs::write(&archive, &tar.body)?;
    let extracted = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(out.path())
        .status()?;
    assert!(extracted.success());
    let file = out.path().join(dir.cid().to_string()).join("part-00000");
    assert!(std::fs::read(file)? == bytes, "tar extracts the same bytes");

    let unknown = *p2pmr_protocol::Block::raw(b"never added".to_vec()).cid();
    let get_unknown = format!("/api/v0/get?arg={unknown}");
    assert_eq!(http(api, "POST", &get_unknown, &[]).await?.status, 404);
    assert_eq!(
        http(api, "GET", &format!("/ipfs/{unknown}"), &[])
            .await?
            .status,
        404
    );
    assert_eq!(http(api, "GET", "/ipfs/not-a-cid", &[]).await?.status, 400);
    assert_eq!(
        http(api, "GET", &format!("/ipfs/{cid}?format=tar"), &[])
            .await?
            .status,
        400
    );
    node.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api_when_one_is_set() -> Result<()> {
    let cluster = cluster_with_api(Some("s3cret")).await?;
    let api = cluster.daemon(0).api_addr().expect("an API");
    assert_eq!(http(api, "POST", "/api/v0/version", &[]).await?.status, 401);
    let wrong = [("Authorization", "Bearer nope")];
    assert_eq!(
        http(api, "POST", "/api/v0/version", &wrong).await?.status,
        401
    );
    let right = [("Authorization", "Bearer s3cret")];
    assert_eq!(
        http(api, "POST", "/api/v0/version", &right).await?.status,
        200
    );
    // Off loopback, no token: the daemon refuses to start.
    let refused = p2pmr_node::Daemon::start(
        tempfile::tempdir()?.path(),
        p2pmr_node::DaemonConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            mdns: false,
            api: Some(ApiConfig {
                addr: "0.0.0.0:0".parse()?,
                next_free: false,
                header_timeout: p2pmr_node::HEADER_TIMEOUT,
                token: None,
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(refused.is_err_and(|e| e.to_string().contains("token")));
    cluster.stop().await;
    Ok(())
}

const BOUNDARY: &str = "p2pmr-test-boundary";

/// A multipart body with one file part, as kubo-rpc-client sends it.
fn multipart(bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// A connection that has sent the head of an `add` of `bytes` and half its body.
async fn half_upload(api: SocketAddr, bytes: &[u8]) -> Result<tokio::net::TcpStream> {
    let body = multipart(bytes);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let headers = [("Content-Type", content_type.as_str())];
    let head = request_head(api, "POST", "/api/v0/add", &headers, body.len());
    let mut stream = tokio::net::TcpStream::connect(api).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body[..body.len() / 2]).await?;
    Ok(stream)
}

async fn upload(api: SocketAddr, path: &str, bytes: &[u8]) -> Result<Answer> {
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    http_body(
        api,
        "POST",
        path,
        &[("Content-Type", &content_type)],
        &multipart(bytes),
    )
    .await
}

fn ndjson(answer: &Answer) -> Vec<Value> {
    String::from_utf8_lossy(&answer.body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_stored_whole_or_not_at_all() -> Result<()> {
    let cluster = cluster_with_api(None).await?;
    let (d0, d1) = (cluster.daemon(0), cluster.daemon(1));
    let api0 = d0.api_addr().expect("API");
    let blocks_of = |d: &p2pmr_node::Daemon| d.repo().blocks().stats().map(|s| s.blocks);

    // add: kubo's CID for the bytes, stored in the daemon's repository, readable back.
    let bytes = data(2 * 262_144 + 7);
    let root = p2pmr_node::repo::files::import(&bytes[..], None, Default::default())?.root;
    let added = upload(api0, "/api/v0/add?cid-version=1&raw-leaves=true", &bytes).await?;
    assert_eq!(
        added.status,
        200,
        "{}",
        String::from_utf8_lossy(&added.body)
    );
    let line = &ndjson(&added)[0];
    assert_eq!(line["Hash"], root.to_string());
    assert_eq!(line["Size"], bytes.len().to_string());
    assert!(d0.repo().blocks().has(&root));
    assert!(
        http(api0, "POST", &format!("/api/v0/cat?arg={root}"), &[])
            .await?
            .body
            == bytes
    );
    // With replicas=2 the blocks go to two daemons.
    let spread = data(262_144 + 3)
        .iter()
        .map(|b| b ^ 0x55)
        .collect::<Vec<u8>>();
    let spread_root =
        ndjson(&upload(api0, "/api/v0/add?replicas=2", &spread).await?)[0]["Hash"].clone();
    let spread_root: p2pmr_protocol::Cid = spread_root.as_str().unwrap_or_default().parse()?;
    assert!(d0.repo().blocks().has(&spread_root) && d1.repo().blocks().has(&spread_root));
    // only-hash stores nothing; kubo's other chunkers are served, other layouts refused.
    let before = blocks_of(d0)?;
    let other = data(1000).iter().map(|b| b ^ 0xaa).collect::<Vec<u8>>();
    let hashed = upload(api0, "/api/v0/add?only-hash=true", &other).await?;
    assert_eq!(hashed.status, 200);
    assert_eq!(blocks_of(d0)?, before);
    assert_eq!(
        upload(api0, "/api/v0/add?cid-version=0", &other)
            .await?
            .status,
        400
    );
    for (chunker, layout) in [
        ("size-1024", Layout::new(1024, 174)?),
        ("buzhash", Layout::KUBO.with_chunker(Chunker::Buzhash)),
    ] {
        let query = format!("/api/v0/add?only-hash=true&chunker={chunker}");
        let bytes = data(600_000);
        let answer = upload(api0, &query, &bytes).await?;
        let offline = p2pmr_node::Node::builder().offline().build();
        let mut roots = Vec::new();
        for layout in [layout, Layout::KUBO] {
            let source = Cursor::new(bytes.clone());
            let blocks = offline.blocks();
            roots.push(
                blocks
                    .add_as(source, Replicas::OnlyHash, layout)
                    .await?
                    .root,
            );
        }
        let (expected, default) = (roots[0], roots[1]);
        assert_ne!(expected, default, "{chunker}");
        assert_eq!(
            ndjson(&answer)[0]["Hash"],
            expected.to_string(),
            "{chunker}"
        );
    }
    assert_eq!(
        upload(api0, "/api/v0/add?chunker=rabin", &other)
            .await?
            .status,
        400
    );

    // A client that goes away half way through its upload: nothing is kept.
    let big = data(3 * 262_144)
        .iter()
        .map(|b| b ^ 0x0f)
        .collect::<Vec<u8>>();
    drop(half_upload(api0, &big).await?);
    let staging = || -> Result<usize> {
        Ok(std::fs::read_dir(d0.repo().home())?
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            })
            .count())
    };
    // The daemon notices the closed connection and removes its staging store; on a loaded
    // machine that takes a moment.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while staging()? > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(staging()?, 0, "a staging directory was left behind");
    assert_eq!(
        blocks_of(d0)?,
        before,
        "a cut-off upload left blocks behind"
    );

    // block/put: a raw block (the default) and a dag-pb one.
    let put = upload(api0, "/api/v0/block/put", b"a block of its own")
        .await?
        .json();
    let raw = p2pmr_protocol::Block::raw(b"a block of its own".to_vec());
    assert_eq!(
        (put["Key"].as_str(), put["Size"].as_u64()),
        (Some(raw.cid().to_string().as_str()), Some(18))
    );
    assert!(d0.repo().blocks().has(raw.cid()));
    assert_eq!(
        upload(api0, "/api/v0/block/put?cid-codec=dag-cbor", b"x")
            .await?
            .status,
        400
    );
    let huge = vec![0u8; p2pmr_protocol::MAX_BLOCK_SIZE + 1];
    assert_eq!(upload(api0, "/api/v0/block/put", &huge).await?.status, 413);

    // dag/import on the other daemon: the CAR daemon 0 exports; a corrupt one keeps nothing.
    let car = http(api0, "POST", &format!("/api/v0/dag/export?arg={root}"), &[])
        .await?
        .body;
    let fresh = cluster_with_api(None).await?;
    let (d2, api2) = (fresh.daemon(0), fresh.daemon(0).api_addr().expect("API"));
    let mut corrupt = car.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let refused = upload(api2, "/api/v0/dag/import", &corrupt).await?;
    assert_eq!(
        refused.status,
        422,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(refused.json()["Message"]
        .as_str()
        .unwrap_or("")
        .contains("corrupt"));
    assert_eq!(blocks_of(d2)?, 0, "a refused CAR left blocks behind");
    let imported = upload(api2, "/api/v0/dag/import", &car).await?;
    assert_eq!(ndjson(&imported)[0]["Root"]["Cid"]["/"], root.to_string());
    assert!(
        http(api2, "POST", &format!("/api/v0/cat?arg={root}"), &[])
            .await?
            .body
            == bytes
    );
    fresh.stop().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_and_stream_their_events_over_http() -> Result<()> {
    let cluster = cluster_with_api(None).await?;
    let api = cluster.daemon(0).api_addr().expect("API");
    let node = client(&cluster, 2).await?;
    let text = b"the cat and the hat\nthe end\n".repeat(500);
    let input = node
        .blocks()
        .add(Cursor::new(text), Replicas::network(2))
        .await?
        .root;
    let json = |v: Value| v.to_string().into_bytes();
    let post = |path: &'static str, body: Vec<u8>| async move {
        http_body(
            api,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            &body,
        )
        .await
    };

    let spec =
        serde_json::json!({"job": "wordcount", "inputs": [format!("text={input}")], "reducers": 2});
    let accepted = post("/api/v0/mr/run", json(spec.clone())).await?;
    assert_eq!(
        accepted.status,
        200,
        "{}",
        String::from_utf8_lossy(&accepted.body)
    );
    let job = accepted.json()["Job"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // NDJSON: every event from the first to the completion, with the output's CID.
    let stream = http(api, "POST", &format!("/api/v0/mr/events?arg={job}"), &[]).await?;
    assert_eq!(stream.header("content-type"), Some("application/x-ndjson"));
    let events = ndjson(&stream);
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"accepted"));
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    assert!(names.contains(&"task_finished"));
    let output = events.last().expect("events")["output"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let part0 = http(api, "GET", &format!("/ipfs/{output}/part-00000"), &[]).await?;
    let part1 = http(api, "GET", &format!("/ipfs/{output}/part-00001"), &[]).await?;
    let mut lines: Vec<String> = String::from_utf8(part0.body)?
        .lines()
        .chain(String::from_utf8(part1.body)?.lines())
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        ["and\t500", "cat\t500", "end\t500", "hat\t500", "the\t1500"]
    );

    // The same stream as Server-Sent Events, for a browser's EventSource (a GET).
    let sse = http(
        api,
        "GET",
        &format!("/api/v0/mr/events?arg={job}"),
        &[("Accept", "text/event-stream")],
    )
    .await?;
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let frames: Vec<&str> = std::str::from_utf8(&sse.body)?
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .collect();
    assert_eq!(frames.len(), events.len());
    assert!(frames.iter().all(|f| f.starts_with("data: {")));

    // Listed, and readable by id.
    let listed = post("/api/v0/mr/jobs", Vec::new()).await?.json();
    assert!(listed["Jobs"]
        .as_array()
        .is_some_and(|j| j.iter().any(|j| j["job"] == job.as_str())));
    let one = http(api, "POST", &format!("/api/v0/mr/job?arg={job}"), &[])
        .await?
        .json();
    assert_eq!(
        (one["state"].as_str(), one["output"].as_str()),
        (Some("succeeded"), Some(output.as_str()))
    );

    // Refusals: a bad spec, an unknown job, something that is not wasm.
    for bad in [
        serde_json::json!({"job": "nope", "inputs": [input.to_string()]}),
        serde_json::json!({"job": "wordcount", "inputs": ["not-a-cid"]}),
        serde_json::json!({"job": "wordcount", "inputs": [input.to_string()], "reducers": 0}),
        serde_json::json!({"job": "wordcount", "inputs": [input.to_string()], "memory_mib": 17592186044416u64}),
        serde_json::json!({"job": "wordcount", "inputs": [input.to_string()], "surprise": 1}),
    ] {
        let refused = post("/api/v0/mr/run", json(bad.clone())).await?;
        assert_eq!(
            refused.status,
            400,
            "{bad}: {}",
            String::from_utf8_lossy(&refused.body)
        );
        assert!(refused.json()["Message"].is_string());
    }
    let unknown = *p2pmr_protocol::Block::raw(b"no such job".to_vec()).cid();
    assert_eq!(
        http(api, "POST", &format!("/api/v0/mr/job?arg={unknown}"), &[])
            .await?
            .status,
        404
    );
    assert_eq!(
        upload(api, "/api/v0/mr/publish", b"not wasm").await?.status,
        400
    );
    node.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() -> Result<()> {
    let cluster = cluster_serving(1, None, std::time::Duration::from_millis(300)).await?;
    let api = cluster.daemon(0).api_addr().expect("an API");
    let mut slow = tokio::net::TcpStream::connect(api).await?;
    slow.write_all(b"POST /api/v0/version HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = std::time::Instant::now();
    // Meanwhile others are served.
    assert_eq!(http(api, "POST", "/api/v0/version", &[]).await?.status, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slow.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the slow connection was never closed");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stalls_or_trickles_times_out_and_keeps_nothing() -> Result<()> {
    let cluster = cluster_serving(1, None, std::time::Duration::from_millis(300)).await?;
    let daemon = cluster.daemon(0);
    let api = daemon.api_addr().expect("an API");
    let before = daemon.repo().blocks().stats()?.blocks;
    // Half an upload, then nothing more with the connection left open; or then a few bytes
    // at a time, never stalling but far too slow to be worth its request slot.
    for trickle in [false, true] {
        let (mut reader, mut writer) = half_upload(api, &data(3 * 262_144)).await?.into_split();
        let trickler = tokio::spawn(async move {
            if trickle {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    if writer.write_all(&[b'x'; 64]).await.is_err() {
                        break;
                    }
                }
            }
            writer
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            reader.read_to_end(&mut answer),
        )
        .await;
        trickler.abort();
        assert!(read.is_ok(), "trickle {trickle}: never answered");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "trickle {trickle}: {answer}"
        );
        let said = if trickle { "sent only" } else { "sent nothing" };
        assert!(answer.contains(said), "trickle {trickle}: {answer}");
        assert_eq!(
            daemon.repo().blocks().stats()?.blocks,
            before,
            "trickle {trickle}: the upload left blocks behind"
        );
    }
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_daemon_runs_jobs_through_its_own_api() -> Result<()> {
    // No other daemon: the API's own daemon publishes the module, coordinates and maps.
    let cluster = cluster_serving(1, None, p2pmr_node::HEADER_TIMEOUT).await?;
    let api = cluster.daemon(0).api_addr().expect("API");
    let added = upload(api, "/api/v0/add", &b"to be or not to be\n".repeat(100)).await?;
    let input = added.json()["Hash"].as_str().unwrap_or_default().to_owned();
    let spec = serde_json::json!({"job": "wordcount", "inputs": [input]});
    let accepted = run_job(api, &spec).await?;
    assert_eq!(
        accepted.status,
        200,
        "{}",
        String::from_utf8_lossy(&accepted.body)
    );
    let (job, coordinator) = (&accepted.json()["Job"], &accepted.json()["Coordinator"]);
    assert_eq!(
        coordinator.as_str(),
        Some(cluster.daemon(0).peer_id().to_string().as_str())
    );

    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let events = ndjson(
        &http(
            api,
            "POST",
            &format!("/api/v0/mr/events?arg={}", job.as_str().unwrap_or_default()),
            &[],
        )
        .await?,
    );
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let last = events.last().expect("events");
    assert_eq!(last["event"], "completed", "{events:?}");
    let part = http(
        api,
        "GET",
        &format!(
            "/ipfs/{}/part-00000",
            last["output"].as_str().unwrap_or_default()
        ),
        &[],
    )
    .await?;
    let mut counts: Vec<&str> = std::str::from_utf8(&part.body)?.lines().collect();
    counts.sort();
    assert_eq!(counts, ["be\t200", "not\t100", "or\t100", "to\t200"]);

    // Every event carries the time its coordinator recorded it, in order, and no later than
    // it was read (the job may have ended before the stream was asked for).
    let stamps: Vec<u64> = events
        .iter()
        .map(|e| e["at"].as_u64().expect("at"))
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    let (from, to) = (before.as_millis() as u64 - 60_000, after.as_millis() as u64);
    assert!(
        stamps.iter().all(|t| (from..=to).contains(t)),
        "{stamps:?} not in {from}..={to}"
    );

    // A module published by upload runs by its CID; a job is cancelled by id (an unknown
    // one is a 404).
    let wasm = p2pmr_node::engine::shipped::by_name("grep").expect("shipped");
    let published = upload(api, "/api/v0/mr/publish", wasm).await?;
    assert_eq!(
        published.status,
        200,
        "{}",
        String::from_utf8_lossy(&published.body)
    );
    let module = published.json()["Module"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let by_cid = serde_json::json!({"job": module, "inputs": [input], "args": {"pattern": "not"}});
    let run = run_job(api, &by_cid).await?;
    assert_eq!(run.status, 200, "{}", String::from_utf8_lossy(&run.body));
    let grep_job = run.json()["Job"].as_str().unwrap_or_default().to_owned();
    let cancel = http(
        api,
        "POST",
        &format!("/api/v0/mr/cancel?arg={grep_job}"),
        &[],
    )
    .await?;
    assert_eq!(
        cancel.status,
        200,
        "{}",
        String::from_utf8_lossy(&cancel.body)
    );
    assert_eq!(cancel.json()["Cancelled"], grep_job.as_str());
    let unknown = *p2pmr_protocol::Block::raw(b"no such job".to_vec()).cid();
    let path = format!("/api/v0/mr/cancel?arg={unknown}");
    assert_eq!(http(api, "POST", &path, &[]).await?.status, 404);
    cluster.stop().await;
    Ok(())
}

/// `mr/daemons` as the token holder sees it, once `ready` holds of it (or after 30 s).
async fn daemons_until(api: SocketAddr, ready: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
    let auth = [("Authorization", "Bearer s3cret")];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let answer = http(api, "GET", "/api/v0/mr/daemons", &auth).await?;
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let daemons = answer.json()["Daemons"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if ready(&daemons) || tokio::time::Instant::now() > deadline {
            return Ok(daemons);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_its_daemon_list() -> Result<()> {
    let mut cluster = cluster_serving(3, Some("s3cret"), p2pmr_node::HEADER_TIMEOUT).await?;
    let api = cluster.daemon(0).api_addr().expect("API");

    // The page and its script need no token (they hold no data); the data they read does.
    let page = http(api, "GET", "/", &[]).await?;
    assert_eq!(
        (page.status, page.header("content-type")),
        (200, Some("text/html; charset=utf-8"))
    );
    assert!(String::from_utf8_lossy(&page.body).contains("<script src=\"/dashboard.js\">"));
    let script = http(api, "GET", "/dashboard.js", &[]).await?;
    assert_eq!(script.status, 200);
    assert!(String::from_utf8_lossy(&script.body).contains("mr/daemons"));
    assert_eq!(http(api, "POST", "/", &[]).await?.status, 401);
    assert_eq!(
        http(api, "GET", "/api/v0/mr/daemons", &[]).await?.status,
        401
    );

    // Every daemon, this one marked, up, with its slots and what it holds.
    let node = client(&cluster, 3).await?;
    let file = data(3 * 262_144 + 10);
    node.blocks()
        .add(Cursor::new(file), Replicas::network(3))
        .await?;
    let daemons = daemons_until(api, |d| d.iter().all(|d| d["Blocks"].as_u64() >= Some(5))).await?;
    assert_eq!(daemons.len(), 3, "{daemons:?}");
    let me = cluster.daemon(0).peer_id().to_string();
    for d in &daemons {
        assert_eq!(d["Up"], true, "{d}");
        assert_eq!(d["Slots"], 1, "{d}");
        assert_eq!(d["Self"], d["ID"] == me.as_str(), "{d}");
        // Four leaves and their root; a leaf is 256 KiB.
        assert!(
            d["Blocks"].as_u64() >= Some(5) && d["Bytes"].as_u64() > Some(3 * 262_144),
            "{d}"
        );
        assert!(!d["Addresses"].as_array().is_some_and(Vec::is_empty), "{d}");
    }

    // A daemon that stops is still listed, as down.
    let gone = cluster.take(2).expect("daemon 2");
    let gone_id = gone.peer_id().to_string();
    gone.stop().await?;
    let daemons = daemons_until(api, |d| {
        d.iter()
            .any(|d| d["ID"] == gone_id.as_str() && d["Up"] == false)
    })
    .await?;
    assert_eq!(daemons.len(), 3, "{daemons:?}");
    for d in &daemons {
        assert_eq!(d["Up"], d["ID"] != gone_id.as_str(), "{d}");
    }
    node.shutdown().await;
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_request_cap_waits_its_turn() -> Result<()> {
    // A verifying gateway client asks for every block of a file at once and takes a 503 as
    // the block missing: far more requests than the cap must all be answered, here by a
    // daemon that holds none of the blocks and fetches each from its peer (more at once than
    // one connection carries).
    let cluster = cluster_serving(2, None, p2pmr_node::HEADER_TIMEOUT).await?;
    let api = cluster.daemon(0).api_addr().expect("API");
    let node = cluster.daemon(1).node();
    let leaves = 170; // one level of links: at most 174
    let added = node
        .blocks()
        .add(Cursor::new(data(leaves * 262_144)), Replicas::Local)
        .await?;
    let root = http(api, "GET", &format!("/ipfs/{}?format=raw", added.root), &[]).await?;
    let links = p2pmr_protocol::dagpb::PbNode::decode(&root.body)?.links;
    assert!(links.len() > 64, "{} links", links.len());
    let mut burst = tokio::task::JoinSet::new();
    for link in links {
        burst.spawn(async move {
            let path = format!("/ipfs/{}?format=raw", link.hash);
            let answer = http(api, "GET", &path, &[]).await?;
            anyhow::Ok((answer.status, answer.body.len()))
        });
    }
    while let Some(answer) = burst.join_next().await {
        assert_eq!(answer??.0, 200);
    }
    cluster.stop().await;
    Ok(())
}
