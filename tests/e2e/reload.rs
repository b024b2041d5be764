//! Reloading a running daemon (SIGHUP, `POST /admin/reload`): new jobs
//! get the new plugins, running ones keep theirs, a plugin that fails to
//! load leaves the previous one running and says why (log, `/health`),
//! the daemon never stops; `sha256` pins; which plugins ran a node's
//! collection, in status and `/health`.

use std::path::Path;

use autocollect::cluster::{ADMIN_USER, LocalCluster, NodeSpec, READER_USER};
use autocollect::config::{Config, InputGrant, OptionValue};
use autocollect::coordinator::task::{NodeState, TaskState};
use serde_json::Value;

use crate::support::*;

/// The node's configuration file, edited by `edit`.
fn edit_config(c: &LocalCluster, node: &str, edit: impl FnOnce(&mut Config)) {
    let path = &c.node(node).config_path;
    let mut config: Config = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, toml::to_string(&config).unwrap()).unwrap();
}

async fn health(c: &LocalCluster, node: &str) -> Value {
    c.admin(node).health().await.expect("health answers")
}

/// `POST /admin/reload` as `user`: status and body.
async fn post_reload(c: &LocalCluster, node: &str, user: &str) -> (reqwest::StatusCode, Value) {
    let password = if user == ADMIN_USER {
        &c.admin_password
    } else {
        &c.reader_password
    };
    let response = c
        .http_client(None)
        .post(format!("{}/admin/reload", c.node(node).url()))
        .basic_auth(user, Some(password))
        .send()
        .await
        .expect("reload answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

fn collector_source(health: &Value) -> &str {
    health["plugins"][0]["source"].as_str().unwrap_or_default()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn sighup_gives_new_jobs_the_new_plugin_while_the_running_job_keeps_its_own() {
    let logs = tempfile::tempdir().unwrap();
    std::fs::write(logs.path().join("app.log"), "one line\n").unwrap();
    let c = cluster(&["n1"], |config| set_option(config, "delay-ms", 3_000i64)).await;
    let admin = c.admin("n1");
    let before = health(&c, "n1").await;
    assert_eq!(collector_source(&before), "builtin:mock-collector");
    assert_eq!(before["plugins"][1]["role"], "uploader");
    assert_eq!(
        before["plugins"][0]["witVersion"],
        autocollect::plugin::WIT_VERSION
    );
    assert_eq!(before["plugins"][0]["sha256"].as_str().unwrap().len(), 64);

    let started = admin.start("all").await.unwrap();
    wait_for(&admin, |t| all_nodes(t, NodeState::Started)).await;
    edit_config(&c, "n1", |config| {
        config.collector.plugin = "builtin:files".into();
        config.collector.options.clear();
        config.collector.inputs = vec![InputGrant {
            name: "logs".into(),
            host: logs.path().to_path_buf(),
            guest: "/inputs/logs".into(),
        }];
    });
    c.signal("n1", libc::SIGHUP);
    wait_for_log(&c, "n1", "reload: new jobs use this plugin").await;
    let after = health(&c, "n1").await;
    assert_eq!(collector_source(&after), "builtin:files");
    assert_ne!(
        after["plugins"][0]["sha256"],
        before["plugins"][0]["sha256"]
    );
    assert!(after.get("reloadErrors").is_none(), "{after}");

    // The running collection ends on the mock, and says so.
    let task = wait_for_end(&admin, &started.task_id).await;
    assert_ended(&task, TaskState::Completed);
    let node = &task.per_node["n1"];
    assert_eq!(node.plugins[0].source, "builtin:mock-collector", "{node:?}");
    assert_eq!(
        node.plugins[0].sha256,
        before["plugins"][0]["sha256"].as_str().unwrap()
    );
    // The next one runs the files collector.
    let next = collect_once(&admin).await;
    let node = &next.per_node["n1"];
    assert_eq!(node.status, NodeState::Collected, "{node:?}");
    assert_eq!(node.plugins[0].source, "builtin:files");
    assert_eq!(node.plugins[0].role, "collector");
    let zip = node.path.as_deref().unwrap();
    assert_eq!(zip_member(Path::new(zip), "logs/app.log"), "one line\n");
}

#[tokio::test]
async fn a_plugin_that_fails_to_load_on_reload_leaves_the_previous_one_running_and_says_why() {
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"\x00asm but not really a component").unwrap();
    let c = cluster(&["n1"], |_| {}).await;

    // Only admins reload.
    let (status, body) = post_reload(&c, "n1", READER_USER).await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{body}");

    edit_config(&c, "n1", |config| {
        config.collector.plugin = junk.path().display().to_string();
    });
    let (status, report) = post_reload(&c, "n1", ADMIN_USER).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    let collector = &report["roles"][0];
    assert_eq!(
        (&collector["role"], &collector["outcome"]),
        (&"collector".into(), &"failed".into()),
        "{report}"
    );
    assert_eq!(collector["plugin"]["source"], "builtin:mock-collector");
    let error = collector["error"].as_str().unwrap();
    assert!(
        error.contains(&junk.path().display().to_string()),
        "{error}"
    );
    assert_eq!(report["roles"][1]["outcome"], "unchanged", "{report}");

    let h = health(&c, "n1").await;
    assert_eq!(collector_source(&h), "builtin:mock-collector");
    assert_eq!(h["reloadErrors"][0]["role"], "collector", "{h}");
    assert_eq!(h["reloadErrors"][0]["error"], error);
    wait_for_log(&c, "n1", "the previous one keeps running").await;
    // The same by SIGHUP: the daemon stays up.
    c.signal("n1", libc::SIGHUP);
    wait_for_log(&c, "n1", "SIGHUP: reload done").await;
    let task = collect_once(&c.admin("n1")).await;
    assert!(all_nodes(&task, NodeState::Collected), "{task:?}");
    assert_eq!(
        task.per_node["n1"].plugins[0].source,
        "builtin:mock-collector"
    );

    // A file that is not a configuration changes nothing; the parse
    // error, which /health shows to anyone, does not quote the broken
    // line that holds the cluster secret.
    let path = c.node("n1").config_path.clone();
    let good = std::fs::read_to_string(&path).unwrap();
    let secret_line = format!("cluster_secret = {:?}", c.secret);
    assert!(good.contains(&secret_line), "{good}");
    std::fs::write(
        &path,
        good.replace(&secret_line, &format!("{secret_line} oops")),
    )
    .unwrap();
    let (_, report) = post_reload(&c, "n1", ADMIN_USER).await;
    assert_eq!(report["ok"], false);
    assert!(
        report["configError"]
            .as_str()
            .unwrap()
            .contains("parsing config"),
        "{report}"
    );
    let h = health(&c, "n1").await;
    let errors = h["reloadErrors"].as_array().unwrap();
    assert!(errors.iter().any(|e| e["role"] == "config"), "{h}");
    for shown in [report.to_string(), h.to_string()] {
        assert!(!shown.contains(&c.secret), "{shown}");
    }
    wait_for_log(&c, "n1", "the configuration was not applied").await;
    let log = std::fs::read_to_string(&c.node("n1").log_path).unwrap();
    assert!(
        !log.contains(&c.secret),
        "the cluster secret reached the log"
    );
    // Fixed, with an option changed: applied, and the errors are gone.
    let mut config: Config = toml::from_str(&good).unwrap();
    config.collector.plugin = "builtin:mock-collector".into();
    config
        .collector
        .options
        .insert("delay-ms".into(), OptionValue::Integer(1));
    config.listen = "127.0.0.1:1".parse().unwrap();
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let (_, report) = post_reload(&c, "n1", ADMIN_USER).await;
    assert_eq!(report["roles"][0]["outcome"], "reloaded", "{report}");
    assert_eq!(report["restartNeeded"], serde_json::json!(["listen"]));
    assert!(health(&c, "n1").await.get("reloadErrors").is_none());
}

#[tokio::test]
async fn a_sha256_pin_refuses_any_other_plugin_at_start_and_on_reload() {
    let exe = Path::new(env!("CARGO_BIN_EXE_autocollect"));
    let dir = tempfile::tempdir().unwrap();
    let wrong = "ab".repeat(32);
    let refused = LocalCluster::launch_on(exe, dir.path(), &[NodeSpec::loopback("n1")], |c| {
        c.collector.sha256 = Some(wrong.clone());
    })
    .await
    .err()
    .expect("the daemon refuses to start");
    let message = format!("{refused:#}");
    let (_, mock) = autocollect::plugin::builtin::lookup("mock-collector").unwrap();
    let actual = sha256_hex(mock);
    assert!(
        message.contains(&format!(
            "[collector] plugin builtin:mock-collector: its SHA-256 is {actual}, but [collector] sha256 pins {wrong}"
        )),
        "{message}"
    );

    // Pinned to the right hash (any case), it starts; a new pin that no
    // longer matches is refused on reload, and the pinned plugin runs on.
    let pin = actual.to_uppercase();
    let c = cluster(&["n1"], |config| {
        config.collector.sha256 = Some(pin.clone())
    })
    .await;
    assert_eq!(health(&c, "n1").await["plugins"][0]["sha256"], actual);
    edit_config(&c, "n1", |config| {
        config.collector.sha256 = Some(wrong.clone())
    });
    let (_, report) = post_reload(&c, "n1", ADMIN_USER).await;
    assert_eq!(report["roles"][0]["outcome"], "failed", "{report}");
    assert!(
        report["roles"][0]["error"]
            .as_str()
            .unwrap()
            .contains("refusing to load it"),
        "{report}"
    );
    let task = collect_once(&c.admin("n1")).await;
    assert_eq!(task.per_node["n1"].plugins[0].sha256, actual);
}
