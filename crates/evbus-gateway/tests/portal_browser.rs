//! The integrator portal (`/portal`) driven in a real headless Chromium through WebDriver
//! (Debian's `chromium` and `chromium-driver`): sign in, event types, webhooks (a refused URL,
//! creation, the first attempt in the log, secret rotation, replay, re-enabling, editing the
//! event types), the live tail with pause and filter, and as an admin: keys (create with
//! scopes and sources, refused without sources, revoke) and the delivery overview; a revoked
//! key's session is refused.
//!
//! Without `chromium`/`chromedriver` the browser tests print a loud warning and pass, unless
//! `CI` or `EVBUS_REQUIRE_BROKERS` is set (then it is a failure). `EVBUS_CHROMIUM` and
//! `EVBUS_CHROMEDRIVER` name other binaries. Screenshots of the main pages are written to a
//! temporary directory (printed), or to `EVBUS_PORTAL_SCREENSHOTS` (relative to the workspace
//! root), which is how `docs/portal/` is made:
//!
//! ```sh
//! EVBUS_PORTAL_SCREENSHOTS=docs/portal cargo test -p evbus-gateway --test portal_browser
//! ```

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::http::StatusCode;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::*;

// ---- the browser ---------------------------------------------------------------------------

fn required() -> bool {
    ["CI", "EVBUS_REQUIRE_BROKERS"].iter().any(|var| {
        std::env::var(var).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "1" || v == "true" || v == "yes"
        })
    })
}

/// A program given by `var`, else the first of `names` found on the PATH or as a path.
fn program(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        let direct = Path::new(name);
        if direct.is_absolute() && direct.is_file() {
            return Some(direct.to_owned());
        }
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// chromedriver (in its own process group, with the Chromium it starts) and one session.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    /// `None` (with a loud warning) when Chromium or chromedriver is missing and not required.
    async fn start() -> Option<Browser> {
        let chromium = program(
            "EVBUS_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        );
        let driver = program(
            "EVBUS_CHROMEDRIVER",
            &["chromedriver", "/usr/lib/chromium/chromedriver"],
        );
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let msg = "the portal browser tests need Chromium and chromedriver (Debian: \
                       `apt-get install chromium chromium-driver`; or set EVBUS_CHROMIUM and \
                       EVBUS_CHROMEDRIVER)";
            if required() {
                panic!("{msg}; CI or EVBUS_REQUIRE_BROKERS is set, so this is a failure");
            }
            // Straight to the process's stderr: libtest captures `eprintln!` of passing tests.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("\n**********\nWARNING: portal browser test SKIPPED: {msg}\n**********\n")
                    .as_bytes(),
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(&driver);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut up = false;
        for _ in 0..200 {
            if http
                .get(format!("{base}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                up = true;
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("chromedriver exited at start: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "chromedriver did not answer on port {port} within 10 s");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&base)
            .await
            .unwrap_or_else(|e| panic!("a WebDriver session with {}: {e}", chromium.display()));
        let shots = match std::env::var_os("EVBUS_PORTAL_SCREENSHOTS") {
            Some(dir) => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(dir),
            None => std::env::temp_dir().join(format!("evbus-portal-shots-{}", std::process::id())),
        };
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser {
            client,
            driver: child,
            _profile: profile,
            shots,
        })
    }

    /// A screenshot of the viewport, `top` (a CSS selector) scrolled to its top.
    async fn shot(&self, name: &str, top: &str) {
        self.client
            .execute(
                "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({block: 'start'});",
                vec![json!(top)],
            )
            .await
            .unwrap();
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

// ---- page helpers --------------------------------------------------------------------------

async fn js(c: &Client, script: &str, args: Vec<Value>) -> Value {
    c.execute(script, args).await.unwrap()
}

/// The text of the first element matching `css` (empty when there is none).
async fn text(c: &Client, css: &str) -> String {
    js(
        c,
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
        vec![json!(css)],
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Whether an element matching `css` is shown (present, not inside anything hidden).
async fn shown(c: &Client, css: &str) -> bool {
    js(
        c,
        "const e = document.querySelector(arguments[0]); return !!e && !e.closest('[hidden]');",
        vec![json!(css)],
    )
    .await
    .as_bool()
    .unwrap_or(false)
}

/// Waits until the text of `css` contains `needle`; returns that text.
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let t = text(c, css).await;
        if t.contains(needle) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {needle:?} in {css}; it says: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_shown(c: &Client, css: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !shown(c, css).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {css} to be shown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clicks `css`, waiting for it to exist first (views are built after API answers). An element
/// replaced between the lookup and the click (a list rebuilt meanwhile) is looked up again, as
/// a person would click the new one; any other error fails the test.
async fn click(c: &Client, css: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let element = c
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        match element.click().await {
            Ok(_) => return,
            Err(e)
                if e.to_string().contains("stale element")
                    && tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("clicking {css}: {e}"),
        }
    }
}

/// Opens a view from the navigation and waits until it has rebuilt its content (the portal
/// marks a view `aria-busy` while it loads), so that nothing acts on rows about to be replaced.
async fn open_view(c: &Client, view: &str) {
    click(c, &format!("nav button[data-view={view}]")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let busy = js(
            c,
            "return document.getElementById(arguments[0]).getAttribute('aria-busy') || ''",
            vec![json!(format!("view-{view}"))],
        )
        .await;
        if busy == json!("") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the {view} view to load"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn sign_in(c: &Client, base: &str, key: &str) {
    c.goto(&format!("{base}/portal")).await.unwrap();
    wait_shown(c, "#signin-form").await;
    let ready = js(
        c,
        "return document.documentElement.dataset.ready || ''",
        vec![],
    )
    .await;
    assert_eq!(
        ready,
        json!("true"),
        "the portal script ran (CSP allows it)"
    );
    fill(c, "#key", key).await;
    click(c, "#signin-form button[type=submit]").await;
    wait_shown(c, "#view-types").await;
}

/// Form controls without a label (by id), in the whole page, shown or not.
async fn unlabelled(c: &Client) -> Value {
    js(
        c,
        "return [...document.querySelectorAll('input, select, textarea')]\
           .filter(i => !(i.labels && i.labels.length) && !i.getAttribute('aria-label'))\
           .map(i => i.id || i.outerHTML)",
        vec![],
    )
    .await
}

fn key_id(key: &str) -> String {
    key.split('_').nth(1).unwrap().to_owned()
}

// ---- tests ---------------------------------------------------------------------------------

/// The page and its assets carry the security headers, whatever the browser.
#[tokio::test]
async fn portal_pages_carry_a_strict_policy() {
    let h = Harness::memory().await;
    for (path, ty) in [
        ("/portal", "text/html"),
        ("/portal/app.js", "text/javascript"),
        ("/portal/app.css", "text/css"),
        ("/portal/icon.svg", "image/svg+xml"),
    ] {
        let resp = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        assert!(header("content-type").starts_with(ty), "{path}");
        let csp = header("content-security-policy");
        for rule in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
            "require-trusted-types-for 'script'",
        ] {
            assert!(csp.contains(rule), "{path}: CSP without {rule}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert_eq!(header("referrer-policy"), "no-referrer");
        assert_eq!(header("cache-control"), "no-store");
    }
    // The page needs no key; the API behind it does.
    let (status, _) = h.call("GET", "/v1/event-types", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let resp = h.http.get(h.url("/portal/nope.js")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

/// `GET /v1/event-types` carries what the portal shows: an example and the version history,
/// curated (no redacted field anywhere).
#[tokio::test]
async fn event_types_carry_a_curated_example_and_history() {
    let h = Harness::memory().await;
    let key = h.key(&["*"], &[]).await;
    let (status, body) = h.call("GET", "/v1/event-types", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
    let types = body.as_array().unwrap();
    let order = types
        .iter()
        .find(|t| t["type"] == "afterOrderCreate")
        .expect("afterOrderCreate listed");
    assert!(
        order["example"]["order"].is_object(),
        "{}",
        order["example"]
    );
    let versions = order["versions"].as_array().unwrap();
    assert!(!versions.is_empty());
    assert_eq!(versions.last().unwrap()["version"], order["version"]);
    let all = body.to_string();
    assert!(
        !all.contains("\"email\""),
        "a redacted field is published: {all}"
    );
    assert!(!all.contains("\"phone\""), "a redacted field is published");
    // Every example is valid against the latest catalogue schema of its type or at least
    // curated: it holds no member the curated schema does not declare.
    for t in types {
        assert!(t["example"].is_object(), "{}: {}", t["type"], t["example"]);
    }
}

/// A webhook's event types, description and enabled state change through `PATCH`.
#[tokio::test]
async fn webhooks_can_be_patched() {
    let h = Harness::memory().await;
    let key = h.key(&["afterOrder*"], &[]).await;
    let rx = Receiver::start(200).await;
    let (id, _) = h.register(&key, &rx.url(), &["afterOrderCreate"]).await;
    let path = format!("/v1/webhooks/{id}");
    let (status, body) = h
        .call("PATCH", &path, Some(&key), Some(json!({"enabled": false})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], false);
    assert_eq!(body["disabled_reason"], "disabled by its owner");
    let (status, body) = h
        .call("PATCH", &path, Some(&key), Some(json!({"enabled": true})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], true);
    assert_eq!(body["disabled_reason"], Value::Null);
    // Refusals: a type outside the scope (by position), a wrong type, an unknown member.
    let (status, body) = h
        .call(
            "PATCH",
            &path,
            Some(&key),
            Some(json!({"event_types": ["afterOrderUpdate", "afterProductUpdate"]})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["denied_positions"], json!([1]));
    for bad in [
        json!({"event_types": []}),
        json!({"event_types": null}),
        json!({"enabled": "yes"}),
        json!({"url": "http://127.0.0.1/x"}),
        json!([1]),
    ] {
        let (status, _) = h.call("PATCH", &path, Some(&key), Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // Another key's webhook does not exist for this key.
    let other = h.key(&["afterOrder*"], &[]).await;
    let (status, _) = h
        .call("PATCH", &path, Some(&other), Some(json!({"enabled": true})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The types and the description are kept by the store.
    let (status, body) = h
        .call(
            "PATCH",
            &path,
            Some(&key),
            Some(json!({"event_types": ["afterOrderUpdate", "afterOrderCreate"], "description": "two"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["event_types"],
        json!(["afterOrderCreate", "afterOrderUpdate"])
    );
    assert_eq!(body["description"], "two");
}

/// The main flow in a real browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let c = &browser.client;
    let h = Harness::memory().await;
    let user = h
        .key(&["afterOrder*", "afterProductUpdate"], &["afterOrder*"])
        .await;
    let mut rx = Receiver::start(200).await;

    // Sign in; the event types this key may see, curated.
    sign_in(c, &h.base, &user).await;
    assert_eq!(
        js(c, "return document.getElementById('key').value", vec![]).await,
        json!(""),
        "the key field is emptied after sign-in"
    );
    let types = wait_text(c, "#types-list", "afterOrderCreate").await;
    for visible in [
        "afterOrderUpdate",
        "afterProductUpdate",
        "Example payload",
        "Version history",
        "order.referenceId",
    ] {
        assert!(types.contains(visible), "{visible} not shown");
    }
    for hidden in [
        "afterOrderCancel",
        "afterCartUpdate",
        "order.email",
        "shippingAddress.phone",
    ] {
        assert!(!types.contains(hidden), "{hidden} shown");
    }
    browser.shot("event-types", "body").await;

    // Webhooks: a refused address is explained plainly.
    open_view(c, "webhooks").await;
    wait_shown(c, "#wh-create").await;
    wait_text(c, "#wh-list", "No webhook yet").await;
    fill(c, "#wh-url", "http://10.20.30.40/hook").await;
    click(c, "#wh-types input[value=afterOrderCreate]").await;
    click(c, "#wh-create button[type=submit]").await;
    let refusal = wait_text(c, "#wh-create-error", "not created").await;
    assert!(refusal.contains("422"), "{refusal}");
    assert!(refusal.to_lowercase().contains("public"), "{refusal}");

    // Created (to the test's receiver): the secret is shown once.
    fill(c, "#wh-url", &rx.url()).await;
    click(c, "#wh-create button[type=submit]").await;
    let secret = wait_text(c, "#wh-secret .secret-value", "whsec_").await;
    assert_eq!(text(c, "#wh-create-error").await, "");
    click(c, "#wh-secret button").await;
    assert!(
        !shown(c, "#wh-secret").await,
        "the secret is gone once dismissed"
    );
    assert!(!text(c, "body").await.contains(&secret));

    // An event arrives; its first attempt shows in the attempt log.
    let (status, _) = h.publish(&user, "afterOrderCreate", order_created()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let first = rx.next().await;
    assert!(
        first.verify(&secret),
        "signed with the secret the portal showed"
    );
    click(c, "#wh-list button").await;
    wait_shown(c, "#wh-attempts").await;
    let log = wait_text(c, "#wh-attempts", first.id()).await;
    assert!(log.contains("200"), "{log}");
    assert!(
        log.contains("receiver says hi"),
        "the response excerpt: {log}"
    );
    assert_eq!(unlabelled(c).await, json!([]), "every control has a label");
    browser.shot("webhooks", "#wh-detail").await;

    // Rotate the secret: shown once, new.
    click(c, "#wh-rotate").await;
    let rotated = wait_text(c, "#wh-detail .secret .secret-value", "whsec_").await;
    assert_ne!(rotated, secret);
    assert!(
        text(c, "#wh-detail .secret")
            .await
            .contains("previous secret also signs")
    );

    // Replay since an hour ago: the event is delivered again, signed with the new secret.
    click(c, "#wh-replay").await;
    wait_text(c, "#wh-status", "Replay queued 1 event").await;
    let again = rx.next().await;
    assert_eq!(again.id(), first.id());
    assert!(again.verify(&rotated));
    wait_text(c, "#wh-attempts", "2 attempts").await;

    // The live tail: events arrive, pause holds them, the filter narrows.
    open_view(c, "tail").await;
    click(c, "#tail-start").await;
    wait_text(c, "#tail-status", "Connected").await;
    let (_, one) = h.publish(&user, "afterOrderCreate", order_created()).await;
    let one = one["id"].as_str().unwrap().to_owned();
    wait_text(c, "#tail-events", &one).await;
    click(c, "#tail-pause").await;
    wait_text(c, "#tail-status", "Paused").await;
    let (_, two) = h.publish(&user, "afterOrderCreate", order_created()).await;
    let two = two["id"].as_str().unwrap().to_owned();
    wait_text(c, "#tail-status", "1 new event held").await;
    assert!(
        !text(c, "#tail-events").await.contains(&two),
        "shown while paused"
    );
    click(c, "#tail-pause").await;
    wait_text(c, "#tail-events", &two).await;
    fill(c, "#tail-filter", &one).await;
    let visible = js(
        c,
        "return [...document.querySelectorAll('#tail-events li')].filter(li => !li.hidden).length",
        vec![],
    )
    .await;
    assert_eq!(
        visible,
        json!(1),
        "the filter shows only the matching event"
    );
    assert!(
        !text(c, "#tail-events").await.contains(support::EMAIL),
        "curated"
    );
    browser.shot("live-tail", "body").await;
    click(c, "#tail-start").await; // stop
    wait_text(c, "#tail-status", "Stopped").await;

    // Nothing of the key outside the tab's memory: no cookie, no storage, no URL.
    let traces = js(
        c,
        "return [document.cookie, localStorage.length, sessionStorage.length, location.href, \
         performance.getEntriesByType('resource').map(e => e.name).join(' ')]",
        vec![],
    )
    .await;
    assert_eq!(traces[0], json!(""));
    assert_eq!(traces[1], json!(0));
    assert_eq!(traces[2], json!(0));
    let secret_part = user.rsplit('_').next().unwrap();
    assert!(
        !traces.to_string().contains(secret_part),
        "the key in a URL: {traces}"
    );

    // An admin, in another tab: keys and the delivery overview.
    let user_tab = c.window().await.unwrap();
    let admin_tab = c.new_window(true).await.unwrap().handle;
    c.switch_to_window(admin_tab).await.unwrap();
    sign_in(c, &h.base, &h.admin).await;
    wait_text(c, "#who", "(admin)").await;
    open_view(c, "keys").await;
    wait_text(c, "#keys-list", &key_id(&user)[..6]).await;
    fill(c, "#key-name", "partner-crm").await;
    fill(c, "#key-subscribe", "afterProductUpdate").await;
    // Publish scopes without a source: refused, and the page says why.
    fill(c, "#key-publish", "afterProductUpdate").await;
    click(c, "#key-create button[type=submit]").await;
    let refusal = wait_text(c, "#key-create-error", "not created").await;
    assert!(refusal.contains("400"), "{refusal}");
    assert!(refusal.contains("at least one source"), "{refusal}");
    assert!(
        !shown(c, "#key-new").await,
        "no key shown for a refused form"
    );
    // One source per line; a comma is part of a source, not a separator.
    fill(
        c,
        "#key-sources",
        "/partner-crm\n  https://crm.example/a,b/*  \n",
    )
    .await;
    click(c, "#key-create button[type=submit]").await;
    let made = wait_text(c, "#key-new .secret-value", "evb_").await;
    assert_eq!(text(c, "#key-create-error").await, "");
    let (status, body) = h.call("GET", "/v1/event-types", Some(&made), None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["afterProductUpdate"],
        "the scopes given in the form"
    );
    // The key publishes under its sources only: another is refused before the data is read
    // (403); under one of its sources the data is checked (here: 422).
    let (status, body) = h.call("GET", "/v1/keys", Some(&h.admin), None).await;
    assert_eq!(status, StatusCode::OK);
    let record = body
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "partner-crm")
        .unwrap_or_else(|| panic!("partner-crm listed: {body}"))
        .clone();
    assert_eq!(record["publish"], json!(["afterProductUpdate"]));
    assert_eq!(
        record["sources"],
        json!(["/partner-crm", "https://crm.example/a,b/*"]),
        "the sources given in the form"
    );
    let (status, body) = h.publish(&made, "afterProductUpdate", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("`source`"),
        "{body}"
    );
    let resp = h
        .http
        .post(h.url("/v1/events"))
        .bearer_auth(&made)
        .header("content-type", "application/cloudevents+json")
        .body(
            json!({"specversion": "1.0", "id": "crm-1", "source": "https://crm.example/a,b/orders",
                "type": "afterProductUpdate", "datacontenttype": "application/json", "data": {}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422, "past the source check");
    click(c, "#key-new button").await;
    wait_text(c, "#keys-list", "partner-crm").await;
    // The list shows each key's sources, one each.
    let row = format!(
        "#keys-list tr[data-key='{}']",
        record["id"].as_str().unwrap()
    );
    let shown_sources = js(
        c,
        "return [...document.querySelectorAll(arguments[0] + ' td:nth-child(5) code')].map(e => e.textContent)",
        vec![json!(row)],
    )
    .await;
    assert_eq!(
        shown_sources,
        json!(["/partner-crm", "https://crm.example/a,b/*"])
    );
    let user_sources = js(
        c,
        "return [...document.querySelectorAll(arguments[0] + ' td:nth-child(5) code')].map(e => e.textContent)",
        vec![json!(format!("#keys-list tr[data-key='{}']", key_id(&user)))],
    )
    .await;
    assert_eq!(
        user_sources,
        json!(["*"]),
        "the test user's key may publish under any source"
    );
    assert_eq!(
        text(c, "#keys-list thead").await,
        "NamePrefixSubscribePublishSourcesAdminCreatedExpiresState"
    );
    assert_eq!(unlabelled(c).await, json!([]), "every control has a label");
    browser.shot("keys", "body").await;
    open_view(c, "deliveries").await;
    let summary = wait_text(c, "#deliveries-summary", "1 endpoint").await;
    assert!(summary.contains("0 disabled"), "{summary}");
    // Two deliveries of the first event (first and replay), one of each live-tail event.
    wait_text(c, "#deliveries", "4 / 4").await;
    browser.shot("deliveries", "body").await;

    // Revoke the user's key as the admin...
    open_view(c, "keys").await;
    let row = format!("#keys-list tr[data-key='{}']", key_id(&user));
    click(c, &format!("{row} button")).await;
    click(c, &format!("{row} button.danger")).await;
    wait_text(c, "#notice", "revoked").await;
    wait_text(c, &row, "revoked").await;

    // ...and the user's session is refused at its next request.
    c.switch_to_window(user_tab).await.unwrap();
    click(c, "nav button[data-view=webhooks]").await;
    wait_shown(c, "#view-signin").await;
    wait_text(c, "#signin-error", "refused").await;
    assert!(!shown(c, "#nav").await);
    assert_eq!(
        text(c, "#wh-list").await,
        "",
        "nothing of the session is left"
    );
    fill(c, "#key", &user).await;
    click(c, "#signin-form button[type=submit]").await;
    wait_text(c, "#signin-error", "refused").await;
    assert!(!shown(c, "#view-types").await);
    browser.shot("signed-out", "body").await;
    browser.close().await;
}

/// Re-enabling a disabled webhook and editing its event types, in the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_reenables_and_edits_a_webhook() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let c = &browser.client;
    let h = Harness::memory().await;
    let user = h.key(&["afterOrder*"], &[]).await;
    let rx = Receiver::start(200).await;
    let (id, _) = h.register(&user, &rx.url(), &["afterOrderCreate"]).await;
    let path = format!("/v1/webhooks/{id}");
    let (status, _) = h
        .call("PATCH", &path, Some(&user), Some(json!({"enabled": false})))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Signed in with the keyboard only: the key, then Enter; focus lands on the heading.
    c.goto(&format!("{}/portal", h.base)).await.unwrap();
    wait_shown(c, "#signin-form").await;
    let focused = js(c, "return document.activeElement.id", vec![]).await;
    assert_eq!(focused, json!("key"), "the key field has the focus");
    c.active_element()
        .await
        .unwrap()
        .send_keys(&format!("{user}\u{E007}"))
        .await
        .unwrap();
    wait_shown(c, "#view-types").await;
    let focused = js(c, "return document.activeElement.id", vec![]).await;
    assert_eq!(focused, json!("types-title"));
    open_view(c, "webhooks").await;
    wait_text(c, "#wh-list", "Disabled").await;
    click(c, "#wh-list button").await;
    click(c, "#wh-enable").await;
    wait_text(c, "#wh-status", "Re-enabled").await;
    let (_, body) = h.call("GET", &path, Some(&user), None).await;
    assert_eq!(body["enabled"], true);

    click(c, "#wh-detail input[value=afterOrderUpdate]").await;
    click(c, "#wh-detail input[value=afterOrderCreate]").await;
    click(c, "#wh-save-types").await;
    // On a failure, the panic quotes the whole panel, the error shown included.
    wait_text(c, "#wh-detail", "Event types saved: afterOrderUpdate").await;
    let (_, body) = h.call("GET", &path, Some(&user), None).await;
    assert_eq!(body["event_types"], json!(["afterOrderUpdate"]));

    // Delete, confirmed in the page.
    click(c, "#wh-delete").await;
    click(c, "#wh-delete-confirm").await;
    wait_text(c, "#wh-list", "No webhook yet").await;
    let (status, _) = h.call("GET", &path, Some(&user), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    browser.close().await;
}

/// The delivery overview reads one attempt log per endpoint, more requests than a key's burst
/// when there are many endpoints (or the admin key has a tight limit of its own): the 429s
/// are waited out as `Retry-After` says, not shown as endpoints whose log "could not load".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_overview_waits_out_the_keys_rate_limit() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let c = &browser.client;
    let h = Harness::memory().await;
    let (status, ops) = h
        .call(
            "POST",
            "/v1/keys",
            Some(&h.admin),
            Some(json!({"name": "ops", "admin": true,
                "rate_limit": {"per_second": 2, "burst": 4}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ops}");
    let ops = ops["key"].as_str().unwrap().to_owned();
    let user = h.key(&["afterOrder*"], &[]).await;
    let rx = Receiver::start(200).await;
    for _ in 0..8 {
        h.register(&user, &rx.url(), &["afterOrderCreate"]).await;
    }
    sign_in(c, &h.base, &ops).await;
    open_view(c, "deliveries").await;
    wait_text(c, "#deliveries-summary", "8 endpoints").await;
    let table = text(c, "#deliveries").await;
    assert!(
        !table.contains("could not load"),
        "every endpoint's log is read, the rate limit waited out: {table}"
    );
    assert_eq!(table.matches("none yet").count(), 8, "{table}");
    browser.close().await;
}
