//! `sharefs-server serve --metrics ADDR`: a real server, real logins, uploads, downloads
//! and notifications, then a real HTTP scrape whose numbers must have moved, checked by
//! Prometheus's own `promtool check metrics` (Debian package `prometheus`; CI installs it
//! and sets `SHAREFS_REQUIRE_TOOLS`, so a missing promtool fails there).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use sharefs_tests::*;

/// The metrics address the server logged.
fn metrics_addr(server: &TestServer) -> String {
    let log = server.log_text();
    let marker = "serving metrics on http://";
    let at = log
        .find(marker)
        .unwrap_or_else(|| panic!("no metrics address logged:\n{log}"));
    log[at + marker.len()..]
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// Sends `request` as is and returns the whole answer (the server closes after it).
fn http(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

/// A scrape's body, after checking the status line and content type.
fn scrape(addr: &str) -> String {
    let answer = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n",
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Samples by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_counts_what_happened_and_passes_promtool() {
    let server = TestServer::start_with(&[
        "--metrics",
        "127.0.0.1:0",
        "--login-lockout-after",
        "2",
        "--login-delay-ms",
        "0",
    ]);
    let addr = metrics_addr(&server);
    let before = samples(&scrape(&addr));
    assert_eq!(value(&before, "sharefs_connections_open"), 0.0);
    assert_eq!(value(&before, "sharefs_uploads_in_progress"), 0.0);

    // Alice stores a file, bob downloads it, alice's client acknowledges the notification.
    let (alice, _alice_events) = server.connect("alice").await;
    let data = content(1, 300_000);
    upload(&alice, "report.pdf", &data).await;
    let (bob, _bob_events) = server.connect("bob").await;
    assert_eq!(download(&bob, "alice", "report.pdf").await.unwrap(), data);
    let pending = within("notification recorded", async {
        loop {
            let pending = alice.notifications(0).await.unwrap().0;
            if !pending.is_empty() {
                break pending;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let during = samples(&scrape(&addr));
    assert_eq!(value(&during, "sharefs_connections_open"), 2.0);
    assert_eq!(value(&during, "sharefs_notifications_pending"), 1.0);
    alice
        .ack(pending.iter().map(|n| n.id).collect())
        .await
        .unwrap();

    // Wrong passwords until the throttle refuses the address.
    let mut wrong = server.options("carol");
    wrong.password = "guess".into();
    for _ in 0..3 {
        assert!(sharefs_client::RemoteClient::connect(&wrong).await.is_err());
    }

    let text = scrape(&addr);
    let after = samples(&text);
    assert!(value(&after, "sharefs_connections_accepted_total") >= 5.0);
    assert_eq!(value(&after, "sharefs_logins_total{outcome=\"ok\"}"), 2.0);
    assert_eq!(
        value(&after, "sharefs_logins_total{outcome=\"failed\"}"),
        2.0
    );
    assert!(value(&after, "sharefs_logins_total{outcome=\"throttled\"}") >= 1.0);
    // The upload (begin, chunks, commit) and the download (open, read, close).
    let ops = |op: &str| {
        let key = format!("sharefs_request_duration_seconds_count{{op=\"{op}\"}}");
        after.get(&key).copied().unwrap_or(0.0)
    };
    assert!(ops("upload_begin") + ops("put") >= 1.0, "{text}");
    assert!(ops("read") >= 1.0, "{text}");
    assert_eq!(
        value(
            &after,
            "sharefs_request_duration_seconds_bucket{op=\"read\",le=\"+Inf\"}"
        ),
        ops("read")
    );
    assert!(value(&after, "sharefs_received_bytes_total") >= data.len() as f64);
    assert!(value(&after, "sharefs_sent_bytes_total") >= data.len() as f64);
    assert!(value(&after, "sharefs_user_stored_bytes{user=\"alice\"}") >= data.len() as f64);
    assert_eq!(value(&after, "sharefs_notifications_recorded_total"), 1.0);
    assert_eq!(value(&after, "sharefs_notifications_delivered_total"), 1.0);
    assert_eq!(value(&after, "sharefs_notifications_pending"), 0.0);

    // Quotas appear for the users who have one.
    server.user(&["quota", "bob", "1G"], None);
    let with_quota = samples(&scrape(&addr));
    assert_eq!(
        value(&with_quota, "sharefs_user_quota_bytes{user=\"bob\"}"),
        (1u64 << 30) as f64
    );
    assert!(!with_quota.contains_key("sharefs_user_quota_bytes{user=\"alice\"}"));

    drop((alice, bob));
    let Some(promtool) = tool("promtool", REQUIRE_TOOLS, "apt-get install prometheus") else {
        return;
    };
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_endpoint_answers_only_bounded_scrapes() {
    let server = TestServer::start_with(&["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&server);
    assert!(http(&addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(http(&addr, b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n").starts_with("HTTP/1.1 400"));
    // A head that never ends is cut off at its limit, not buffered.
    let mut endless = b"GET /metrics HTTP/1.1\r\n".to_vec();
    endless.extend(std::iter::repeat_n(b'x', 64 * 1024));
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The server may close while this is still being written.
    let _ = s.write_all(&endless);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // Still serving.
    assert!(scrape(&addr).contains("sharefs_connections_open"));
}
