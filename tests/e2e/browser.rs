//! The web console in a real browser: Debian's headless Chromium, driven
//! through chromedriver's WebDriver HTTP API (plain JSON over HTTP, from
//! reqwest: no Selenium, no Python), against a real 3-node cluster and
//! the test upload server. Screenshots of the main states are written to
//! `target/ui-screenshots/`. Uploads go to the test upload server over
//! TLS, its CA trusted by the nodes through `[upload] ca_file`.
//!
//! The test browser skips certificate checks (`acceptInsecureCerts` and
//! `--ignore-certificate-errors`): the cluster's CA is made per test run
//! and is not in Chromium's store. Only this test browser does so.
//!
//! Chromium and chromedriver missing is a failure, not a skip:
//! `.ci/setup` installs them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use autocollect::cluster::{ADMIN_USER, READER_USER};
use autocollect::coordinator::task::NodeState;
use base64::Engine;
use serde_json::{Value, json};

use crate::support::*;
use crate::upload_server::UploadServer;

/// WebDriver's key codes.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";

/// WCAG's contrast ratio in the page: `rgb(css)` parses a computed colour,
/// `background(e)` composites the backgrounds from the page down to `e`,
/// `over(fg, bg)` draws a translucent colour on one, `ratio(a, b)`.
const CONTRAST_JS: &str = "
    const rgb = s => { const p = s.match(/[\\d.]+/g).map(Number);
                       return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
    const over = (t, b) => ({r: t.r * t.a + b.r * (1 - t.a), g: t.g * t.a + b.g * (1 - t.a),
                             b: t.b * t.a + b.b * (1 - t.a), a: 1});
    const background = e => {
        const chain = [];
        for (; e; e = e.parentElement) chain.unshift(e);
        return chain.reduce((c, e) => over(rgb(getComputedStyle(e).backgroundColor), c),
                            {r: 255, g: 255, b: 255, a: 1});
    };
    const lum = c => [c.r, c.g, c.b].map(v => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); })
        .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
    const ratio = (a, b) => { const x = lum(a), y = lum(b);
                              return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05); };
";

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium session, closed (and chromedriver killed) on drop.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        for exe in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(exe).exists(),
                "{exe} is missing: install chromium and chromium-driver (.ci/setup)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // In a process group of its own, which the Chromium it starts
        // joins: dropping the browser kills the whole group, so no
        // Chromium outlives its test (killing chromedriver alone left
        // Chromium and its helpers running).
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(started.elapsed() < PATIENCE, "chromedriver never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // No crash handler: it would leave the process group.
            "--disable-crash-reporter",
            "--disable-breakpad",
            "--ignore-certificate-errors",
            "--window-size=1280,1300",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let session = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "acceptInsecureCerts": true,
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            }}}))
            .send()
            .await
            .expect("a session")
            .json::<Value>()
            .await
            .unwrap();
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_string();
        Browser {
            driver,
            base: format!("{base}/session/{id}"),
            http,
            _profile: profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            request = request.json(&body);
        }
        let r = request.send().await.expect("chromedriver answers");
        let v: Value = r.json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("WebDriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    /// Type into a field, as a user does.
    async fn type_into(&self, css: &str, text: &str) {
        let el = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/clear"),
            json!({}),
        )
        .await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let el = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/click"),
            json!({}),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Wait until `script` (a function body) returns true.
    async fn wait(&self, what: &str, script: &str) {
        let started = Instant::now();
        loop {
            if self.js(script, json!([])).await == json!(true) {
                return;
            }
            if started.elapsed() > PATIENCE {
                let page = self.js("return document.body.innerText", json!([])).await;
                self.screenshot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await;
                panic!("timed out waiting for {what}; the page:\n{}", page);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Press keys, as a user does on a keyboard (WebDriver key actions):
    /// each character of `keys` down and up, in order.
    async fn keys(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|k| {
                let k = k.to_string();
                [
                    json!({"type": "keyDown", "value": k}),
                    json!({"type": "keyUp", "value": k}),
                ]
            })
            .collect();
        self.call(
            reqwest::Method::POST,
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        )
        .await;
    }

    /// The id of the focused element (`""` for the page itself).
    async fn focused(&self) -> String {
        self.js(
            "return document.activeElement ? document.activeElement.id : ''",
            json!([]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Press Tab until the element `id` has the focus (at most 60 times),
    /// checking at every stop that the focused element shows a focus ring
    /// a user can see: an outline at least 2 px wide with 3:1 contrast
    /// against what surrounds it (WCAG 2.2, 1.4.11 and 2.4.7). Returns the
    /// ids of the stops, in order.
    async fn tab_to(&self, id: &str) -> Vec<String> {
        let mut stops = Vec::new();
        for _ in 0..60 {
            self.keys(TAB).await;
            let ring = self
                .js(
                    &format!(
                        "{CONTRAST_JS}
                         const e = document.activeElement;
                         if (!e || e === document.body) return null;
                         const st = getComputedStyle(e);
                         if (st.outlineStyle === 'none' || parseFloat(st.outlineWidth) < 2)
                             return e.tagName + ' has no focus ring: outline ' + st.outlineStyle + ' ' + st.outlineWidth;
                         const r = ratio(rgb(st.outlineColor), background(e.parentElement));
                         return r >= 3 ? null : 'focus ring contrast ' + r.toFixed(2) + ':1';"
                    ),
                    json!([]),
                )
                .await;
            let here = self.focused().await;
            assert!(ring.is_null(), "focused #{here}: {ring}");
            stops.push(here.clone());
            if here == id {
                return stops;
            }
        }
        panic!("Tab never reached #{id}; it stopped at {stops:?}");
    }

    /// Every visible text of the page (and every filled-in field) has the
    /// contrast WCAG 2.2 AA asks (1.4.3): 4.5:1 against the background it
    /// is drawn on, 3:1 for large text.
    async fn assert_contrast(&self, state: &str) {
        let low = self
            .js(
                &format!(
                    "{CONTRAST_JS}
                     const low = [];
                     for (const e of document.querySelectorAll('body *')) {{
                         const st = getComputedStyle(e);
                         if (!e.getClientRects().length || st.visibility === 'hidden') continue;
                         const text = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())
                             || ((e.tagName === 'INPUT' || e.tagName === 'SELECT') && e.value);
                         if (!text) continue;
                         const back = background(e);
                         const r = ratio(over(rgb(st.color), back), back);
                         const size = parseFloat(st.fontSize), bold = parseInt(st.fontWeight) >= 700;
                         const large = size >= 24 || (bold && size >= 18.66);
                         if (r < (large ? 3 : 4.5))
                             low.push(e.tagName + '#' + e.id + '.' + e.className + ' \"' +
                                 (e.value || e.textContent).trim().slice(0, 40) + '\" ' + r.toFixed(2) + ':1');
                     }}
                     return low;"
                ),
                json!([]),
            )
            .await;
        assert_eq!(low, json!([]), "{state}: text below WCAG AA contrast");
    }

    /// A PNG of the window, in `target/ui-screenshots/NAME.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        self.js("window.scrollTo(0, 0)", json!([])).await;
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Open the console of the node at `url`: its sign-in form.
    async fn open(&self, url: &str) {
        self.goto(&format!("{url}/ui/")).await;
        self.wait(
            "the sign-in form",
            "return !!document.getElementById('user')",
        )
        .await;
    }

    async fn sign_in(&self, url: &str, user: &str, password: &str) {
        self.open(url).await;
        self.type_into("#user", user).await;
        self.type_into("#password", password).await;
        self.click("#signin button[type=submit]").await;
        self.wait("signed in", "return !document.getElementById('app').hidden")
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            // SAFETY: kill(2) on the process group chromedriver leads;
            // it touches no memory.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        let _ = self.driver.start_kill();
    }
}

fn screenshots() -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-screenshots")
}

fn cards_in(state: &str, n: usize) -> String {
    format!(
        "return document.querySelectorAll('#per-node .node[data-state={state}]').length === {n}"
    )
}

#[tokio::test]
async fn the_console_uploads_from_every_node_and_shows_the_urls() {
    // Over TLS, from a CA the nodes trust through `[upload] ca_file`.
    let server = UploadServer::start_tls().await;
    let certs = tempfile::tempdir().unwrap();
    let ca = server.write_ca(certs.path());
    let c = cluster(&["n1", "n2", "n3"], |config| {
        config.upload.ca_file = Some(ca.clone());
        set_option(config, "artifact-size", 2_000_000i64);
    })
    .await;
    let upload_host = server.host_named("localhost");
    let url = c.node("n1").url();
    let b = Browser::start().await;
    b.open(&url).await;
    b.screenshot("01-sign-in").await;
    b.assert_contrast("01-sign-in").await;
    b.sign_in(&url, ADMIN_USER, &c.admin_password).await;
    b.wait(
        "three reachable nodes",
        "return document.querySelectorAll('#nodes .reach.healthy').length === 3",
    )
    .await;

    b.click("#upload").await;
    b.type_into("#uploadHost", &upload_host).await;
    b.type_into("#customer", "acme").await;
    b.type_into("#ticket", "4242").await;
    b.screenshot("02-start-form").await;
    b.assert_contrast("02-start-form").await;
    b.click("#start-button").await;
    b.wait("every node uploaded", &cards_in("uploaded", 3))
        .await;
    b.wait(
        "the task completed",
        "return document.getElementById('task-summary').dataset.status === 'completed'",
    )
    .await;
    let shot = b.screenshot("03-uploaded").await;
    b.assert_contrast("03-uploaded").await;
    let _ = std::fs::copy(&shot, screenshots().join("console.png"));

    // What the page shows is what the API says: URLs and checksums, each
    // with a copy button.
    let task = c.admin("n1").status().await.unwrap().unwrap();
    assert!(all_nodes(&task, NodeState::Uploaded), "{task:#?}");
    let page = b.text("#per-node").await;
    for (node, status) in &task.per_node {
        let url = status.url.as_deref().unwrap();
        assert!(
            url.starts_with(&format!("{upload_host}/acme/4242/")),
            "{url}"
        );
        assert!(page.contains(url), "{node}'s URL in {page}");
        assert!(page.contains(status.sha256.as_deref().unwrap()), "{page}");
    }
    let copies = b
        .js(
            "return document.querySelectorAll('#per-node button.copy').length",
            json!([]),
        )
        .await;
    assert!(copies.as_u64().unwrap() >= 6, "{copies}");
    assert_eq!(server.received().len(), 3);

    // After a reload: still signed in (this tab's session), the last task.
    b.goto(&format!("{url}/ui/")).await;
    b.wait("the last task after a reload", &cards_in("uploaded", 3))
        .await;

    // A read-only user sees, and cannot act.
    b.click("#signout").await;
    b.sign_in(&url, READER_USER, &c.reader_password).await;
    b.wait("the last task, read-only", &cards_in("uploaded", 3))
        .await;
    let disabled = b
        .js(
            "return [document.getElementById('start-button').disabled, document.getElementById('readonly-note').hidden]",
            json!([]),
        )
        .await;
    assert_eq!(disabled, json!([true, false]));
    b.screenshot("04-read-only").await;
    b.assert_contrast("04-read-only").await;
}

#[tokio::test]
async fn the_console_cancels_a_slow_collection() {
    let c = cluster(&["n1", "n2", "n3"], |config| {
        set_option(config, "delay-ms", 120_000i64);
    })
    .await;
    let url = c.node("n2").url();
    let b = Browser::start().await;
    b.sign_in(&url, ADMIN_USER, &c.admin_password).await;
    b.wait(
        "the nodes",
        "return document.querySelectorAll('#nodes li').length === 3",
    )
    .await;
    // Only two of the three nodes.
    b.click("#from-some").await;
    b.click("#node-n1").await;
    b.click("#node-n3").await;
    b.click("#start-button").await;
    b.wait("both nodes collecting", &cards_in("started", 2))
        .await;
    b.screenshot("05-running").await;
    b.assert_contrast("05-running").await;
    b.wait(
        "cancel enabled",
        "return !document.getElementById('cancel-button').disabled",
    )
    .await;
    let asked = Instant::now();
    b.click("#cancel-button").await;
    b.wait("both nodes cancelled", &cards_in("cancelled", 2))
        .await;
    b.wait(
        "the task cancelled",
        "return document.getElementById('task-summary').dataset.status === 'cancelled'",
    )
    .await;
    assert!(asked.elapsed() < Duration::from_secs(30));
    b.screenshot("06-cancelled").await;
    b.assert_contrast("06-cancelled").await;
    let task = c.admin("n1").status().await.unwrap().unwrap();
    assert_eq!(
        task.per_node.keys().collect::<Vec<_>>(),
        ["n1", "n3"],
        "{task:#?}"
    );
    assert!(all_nodes(&task, NodeState::Cancelled), "{task:#?}");
}

#[tokio::test]
async fn the_console_shows_a_validation_error_next_to_its_field() {
    let c = cluster(&["n1", "n2", "n3"], |_| {}).await;
    let url = c.node("n3").url();
    let b = Browser::start().await;
    b.sign_in(&url, ADMIN_USER, &c.admin_password).await;
    b.click("#upload").await;
    b.type_into("#uploadHost", "http://uploads.example").await;
    b.type_into("#customer", "acme").await;
    b.click("#start-button").await;
    b.wait(
        "the upload host's error",
        "return document.getElementById('err-uploadHost').textContent.length > 0",
    )
    .await;
    // The API's own message, beside its field, and the field marked.
    let (status, body) = c
        .admin("n3")
        .request(
            reqwest::Method::POST,
            "/collectLogs/start",
            Some(autocollect::client::RequestBody::Form(vec![
                ("from".into(), "allnodes".into()),
                ("upload".into(), "true".into()),
                ("uploadHost".into(), "http://uploads.example".into()),
                ("customer".into(), "acme".into()),
            ])),
            true,
        )
        .await
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        b.text("#err-uploadHost").await,
        body["uploadHost"].as_str().unwrap()
    );
    let invalid = b
        .js(
            "return document.getElementById('uploadHost').getAttribute('aria-invalid')",
            json!([]),
        )
        .await;
    assert_eq!(invalid, json!("true"));
    b.screenshot("07-validation-error").await;
    b.assert_contrast("07-validation-error").await;

    // A narrow window (a phone): one column, nothing wider than the window.
    b.call(
        reqwest::Method::POST,
        "/window/rect",
        json!({"width": 400, "height": 900}),
    )
    .await;
    let fits = b
        .js(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            json!([]),
        )
        .await;
    assert_eq!(fits, json!(true));
    b.screenshot("08-narrow").await;
    b.assert_contrast("08-narrow").await;
    assert!(c.admin("n1").status().await.unwrap().is_none());
}

#[tokio::test]
async fn the_console_works_from_the_keyboard_alone() {
    let c = cluster(&["n1", "n2", "n3"], |_| {}).await;
    let url = c.node("n2").url();
    let b = Browser::start().await;
    b.open(&url).await;

    // Sign in with a wrong password first: the error is read out (role
    // alert) and has contrast.
    b.tab_to("user").await;
    b.keys(ADMIN_USER).await;
    b.keys(TAB).await;
    assert_eq!(b.focused().await, "password");
    b.keys("not the password").await;
    b.keys(ENTER).await;
    b.wait(
        "the sign-in error",
        "return document.getElementById('signin-error').textContent.length > 0",
    )
    .await;
    b.assert_contrast("sign-in error").await;
    b.tab_to("password").await;
    b.js("document.activeElement.select()", json!([])).await;
    b.keys(&c.admin_password).await;
    b.keys(ENTER).await;
    b.wait("signed in", "return !document.getElementById('app').hidden")
        .await;
    b.wait(
        "three reachable nodes",
        "return document.querySelectorAll('#nodes .reach.healthy').length === 3",
    )
    .await;
    b.assert_contrast("signed in").await;

    // Every control of the start form is on the Tab path, in reading
    // order, up to the start button.
    let stops = b.tab_to("start-button").await;
    let path: Vec<&str> = stops
        .iter()
        .map(String::as_str)
        .skip_while(|id| *id != "from-all")
        .collect();
    for field in [
        "from-all",
        "upload",
        "logRedactionLevel",
        "logRedactionSalt",
        "since",
        "until",
        "taskRegexp",
        "tmpDir",
        "logDir",
        "encryptionPassword",
        "start-button",
    ] {
        assert!(
            path.contains(&field),
            "#{field} is not on the Tab path: {stops:?}"
        );
    }
    let at = |id: &str| path.iter().position(|p| *p == id).unwrap();
    assert!(
        at("from-all") < at("upload") && at("upload") < at("since"),
        "{path:?}"
    );

    // Enter on the focused start button starts a collection.
    b.keys(ENTER).await;
    b.wait("every node collected", &cards_in("collected", 3))
        .await;
    b.assert_contrast("collected").await;
    let task = c.admin("n1").status().await.unwrap().expect("a task");
    assert!(all_nodes(&task, NodeState::Collected), "{task:#?}");
}
