//! `GET /openapi.json`: an OpenAPI 3.1 description of the public API and
//! Couchbase's routes. It is built here, in code, from the same route
//! constants the routers use and from each start route's list of known
//! parameters (`public::START_PARAMS`, `couchbase::START_PARAMS`), so a
//! parameter added to a route appears in the document; the task's schema
//! is derived (schemars, JSON Schema 2020-12 as OpenAPI 3.1 uses) from
//! the Rust types the handlers serialise; the responses are
//! the statuses the handlers, the `Reader`/`Admin` extractors and
//! `params::parse` really return. The node-to-node routes (`/internal/`)
//! are not described: only other nodes may call them.

use axum::Json;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::couchbase::{
    CANCEL_LOGS_URI, LOG_REDACTION_URI, POOL_URI, POOLS_URI, START_LOGS_URI, TASKS_URI,
};
use super::ui::WHOAMI_URI;
use super::{
    CANCEL_URI, EVENTS_URI, HEALTH_URI, METRICS_URI, OPENAPI_URI, RELOAD_URI, START_URI, STATUS_URI,
};
use crate::coordinator::task::TaskStatus;

/// What a start parameter means (a parameter without an entry is still
/// listed, as a string).
fn describe(param: &str) -> &'static str {
    match param {
        "from" => "`allnodes`, or a comma-separated list of node names (not with `nodes`)",
        "nodes" => "`*`, or a comma-separated list of node names (in JSON also an array of names)",
        "upload" => "`true` to upload (needs an upload host), or `false`",
        "upload_host" | "uploadHost" => {
            "Where to upload (https://host[:port][/path]); give one of upload_host and uploadHost"
        }
        "customer" => "The customer name, part of the upload path",
        "ticket" => "The support ticket number, part of the upload path",
        "uploadProxy" => "An HTTP(S) proxy for the upload",
        "bypassReachabilityChecks" => "`true` to skip the upload host's preflight",
        "logRedactionLevel" => "`none` or `partial`; the cluster's default when not given",
        "logRedactionSalt" => "The salt of partial redaction (only with `partial`)",
        "tmpDir" => "A temporary directory below the node's allowed prefixes",
        "logDir" => "Where the artifact is kept, below the node's allowed prefixes",
        "taskRegexp" => "Only the collector's tasks matching this regular expression",
        "encryptionPassword" => "Encrypt the zip (AES) with this password",
        "since" => {
            "Start of the time window: RFC 3339, or a duration before now (90s, 30m, 2h, 7d)"
        }
        "until" => "End of the time window: RFC 3339, or a duration before now",
        _ => "",
    }
}

/// The request body of a start route: the same parameters as a form or
/// as a JSON object.
fn start_body(params: &[&str]) -> Value {
    let mut form = Map::new();
    let mut json_props = Map::new();
    for p in params {
        let description = describe(p);
        form.insert(
            p.to_string(),
            json!({"type": "string", "description": description}),
        );
        // JSON bodies may use strings, numbers and booleans for any
        // parameter, and arrays of strings for lists.
        json_props.insert(
            p.to_string(),
            json!({
                "description": description,
                "oneOf": [
                    {"type": "string"},
                    {"type": "number"},
                    {"type": "boolean"},
                    {"type": "array", "items": {"type": "string"}}
                ]
            }),
        );
    }
    json!({
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": form, "additionalProperties": false}
            },
            "application/json": {
                "schema": {"type": "object", "properties": json_props, "additionalProperties": false}
            }
        }
    })
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Errors"}}}
    })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

/// The answers of every route behind authentication.
fn auth_responses(admin: bool) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert(
        "401".into(),
        error("No credentials, or wrong ones (`WWW-Authenticate: Basic`)"),
    );
    r.insert(
        "429".into(),
        error("Too many failed sign-ins from this address (`Retry-After`)"),
    );
    r.insert(
        "503".into(),
        error("The password verification queue, or the connections for public requests, are full (`Retry-After`)"),
    );
    if admin {
        r.insert(
            "403".into(),
            json!({
                "description": "The user has the read-only role",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Forbidden"}}}
            }),
        );
    }
    r
}

fn operation(
    summary: &str,
    tag: &str,
    admin: Option<bool>,
    extra: Value,
    responses: Value,
) -> Value {
    let mut op = match extra {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    op.insert("summary".into(), summary.into());
    op.insert("tags".into(), json!([tag]));
    let mut all = match responses {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    match admin {
        Some(admin) => all.extend(auth_responses(admin)),
        None => {
            op.insert("security".into(), json!([]));
        }
    }
    op.insert("responses".into(), Value::Object(all));
    Value::Object(op)
}

fn param_errors(description: &str) -> Value {
    json!({
        "400": error(description),
        "408": error("The body did not arrive within the header timeout of the request head (`server.header_timeout_secs`); the connection closes"),
        "413": error("A body over 2 MiB (`params::MAX_PARAMS_BODY`)"),
        "415": error("A body that is neither form-encoded nor JSON"),
    })
}

/// The document.
pub fn document() -> Value {
    let task = json!({"$ref": "#/components/schemas/TaskStatus"});
    let mut start_responses = param_errors(
        "Invalid parameters, keyed by field; or a task is already running, or a node cannot be reached (`_`)",
    );
    start_responses["200"] = ok("The task as it started", task.clone());
    start_responses["507"] =
        error("A chosen node is below its free-space reserve and cannot collect");
    let mut cb_start_responses = start_responses.clone();
    cb_start_responses["200"] = ok(
        "The collection started (ns_server answers an empty list)",
        json!({"type": "array", "maxItems": 0}),
    );
    let status_query = json!({"parameters": [
        {"name": "since", "in": "query", "required": false,
         "description": "Wait until the task's version exceeds this",
         "schema": {"type": "integer", "minimum": 0}},
        {"name": "wait", "in": "query", "required": false,
         "description": "With since: the longest wait in seconds (default 30, at most 60)",
         "schema": {"type": "number", "minimum": 0}}
    ]});
    let gateway = error("The node coordinating the task cannot be reached");
    let paths = json!({
        START_URI: {"post": operation(
            "Start a collection on all or some nodes, optionally uploading",
            "collectLogs", Some(true),
            json!({"requestBody": start_body(super::public::START_PARAMS)}),
            start_responses,
        )},
        STATUS_URI: {"get": operation(
            "The latest task (long-polled with since)", "collectLogs", Some(false), status_query,
            json!({
                "200": ok("The latest task", task.clone()),
                "400": error("A malformed query, or a negative wait"),
                "404": error("No task has run yet"),
                "502": gateway.clone(),
            }),
        )},
        EVENTS_URI: {"get": operation(
            "Every change of the latest task, as Server-Sent Events", "collectLogs", Some(false),
            json!({"parameters": [{
                "name": "Last-Event-ID", "in": "header", "required": false,
                "description": "Resume after this event (the task version it carried)",
                "schema": {"type": "string"}
            }]}),
            json!({
                "200": {
                    "description": "An endless text/event-stream: `snapshot` first (`{\"reason\", \"task\"}`), then `started` (a new task, whole) and `change` (the nodes that changed); each event's id is the task version",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}
                },
                "429": error("This user holds the most event streams one user may on this node (`Retry-After`)"),
                "503": error("Too many event streams on this node (`Retry-After`)"),
            }),
        )},
        WHOAMI_URI: {"get": operation(
            "Who the caller is, as ns_server's /whoami says it", "node", Some(false), json!({}),
            json!({"200": ok("The caller and its role (`admin` or `ro_admin`)", json!({
                "type": "object",
                "required": ["id", "domain", "roles"],
                "properties": {
                    "id": {"type": "string"},
                    "domain": {"type": "string"},
                    "roles": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"role": {"type": "string", "enum": ["admin", "ro_admin"]}}
                    }}
                }
            }))}),
        )},
        CANCEL_URI: {"post": operation(
            "Cancel the running task", "collectLogs", Some(true), json!({}),
            json!({
                "200": ok("The latest task, after every node confirmed (or 10 s)", task.clone()),
                "404": error("No task has run yet"),
                "502": gateway.clone(),
            }),
        )},
        HEALTH_URI: {"get": operation(
            "This node's health (no authentication)", "node", None,
            json!({"parameters": [{
                "name": "waitIdle", "in": "query", "required": false,
                "description": "First wait up to this many seconds (at most 60) for the node to hold no session",
                "schema": {"type": "number", "minimum": 0}
            }]}),
            json!({
                "200": ok("The node is up", json!({"$ref": "#/components/schemas/Health"})),
                "400": error("A malformed query, or a negative waitIdle"),
            }),
        )},
        RELOAD_URI: {"post": operation(
            "Reload the configuration, as SIGHUP does", "node", Some(true), json!({}),
            json!({"200": ok("What was reloaded", json!({
                "type": "object",
                "required": ["ok", "roles"],
                "properties": {
                    "ok": {"type": "boolean"},
                    "configError": {"type": "string"},
                    "roles": {"type": "array"},
                    "files": {"type": "array", "items": {"type": "string"}},
                    "restartNeeded": {"type": "array", "items": {"type": "string"}}
                }
            }))}),
        )},
        METRICS_URI: {"get": operation(
            "This node's Prometheus metrics", "node", Some(false), json!({}),
            json!({"200": {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}}
            }}),
        )},
        OPENAPI_URI: {"get": operation(
            "This document (no authentication)", "node", None, json!({}),
            json!({"200": ok("OpenAPI 3.1", json!({"type": "object"}))}),
        )},
        START_LOGS_URI: {"post": operation(
            "Couchbase's start (ns_server's parameters)", "couchbase", Some(true),
            json!({"requestBody": start_body(super::couchbase::START_PARAMS)}),
            cb_start_responses,
        )},
        CANCEL_LOGS_URI: {"post": operation(
            "Couchbase's cancel (an empty list, also when nothing runs)", "couchbase", Some(true),
            json!({}),
            json!({
                "200": ok("Cancelled, or nothing to cancel", json!({"type": "array", "maxItems": 0})),
                "502": gateway.clone(),
            }),
        )},
        TASKS_URI: {"get": operation(
            "Couchbase's task list: the latest log collection, or none", "couchbase", Some(false),
            json!({}),
            json!({
                "200": ok("At most one task", json!({"type": "array", "maxItems": 1, "items": {"type": "object"}})),
                "502": gateway,
            }),
        )},
        POOLS_URI: {"get": operation(
            "The pool list and version couchbase-cli reads first", "couchbase", Some(false),
            json!({}),
            json!({"200": ok("The default pool", json!({
                "type": "object",
                "required": ["pools", "implementationVersion"],
                "properties": {
                    "pools": {"type": "array"},
                    "implementationVersion": {"type": "string"},
                    "isEnterprise": {"type": "boolean"}
                }
            }))}),
        )},
        POOL_URI: {"get": operation(
            "The cluster's nodes and their reachability", "couchbase", Some(false), json!({}),
            json!({"200": ok("The default pool", json!({
                "type": "object",
                "required": ["name", "nodes"],
                "properties": {
                    "name": {"type": "string"},
                    "nodes": {"type": "array", "items": {
                        "type": "object",
                        "required": ["otpNode", "hostname", "status", "clusterMembership", "thisNode"],
                        "properties": {
                            "otpNode": {"type": "string"},
                            "hostname": {"type": "string"},
                            "configuredHostname": {"type": "string"},
                            "status": {"enum": ["healthy", "unhealthy"]},
                            "clusterMembership": {"type": "string"},
                            "thisNode": {"type": "boolean"}
                        }
                    }}
                }
            }))}),
        )},
        LOG_REDACTION_URI: {
            "get": operation(
                "The cluster's default redaction level", "couchbase", Some(false), json!({}),
                json!({"200": ok("The level", json!({"$ref": "#/components/schemas/LogRedaction"}))}),
            ),
            "post": operation(
                "Set the default redaction level on every node", "couchbase", Some(true),
                json!({"requestBody": {
                    "required": true,
                    "content": {
                        "application/x-www-form-urlencoded": {"schema": {
                            "type": "object",
                            "required": ["logRedactionLevel"],
                            "properties": {"logRedactionLevel": {"enum": ["none", "partial"]}}
                        }},
                        "application/json": {"schema": {
                            "type": "object",
                            "required": ["logRedactionLevel"],
                            "properties": {"logRedactionLevel": {"enum": ["none", "partial"]}}
                        }}
                    }
                }}),
                {
                    let mut r = param_errors("A missing or unknown level, or another parameter");
                    r["200"] = ok("The new level", json!({"$ref": "#/components/schemas/LogRedaction"}));
                    r["500"] = error("This node could not save the settings");
                    r["502"] = error("Saved, but some nodes could not be updated");
                    r
                },
            ),
        },
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "autocollect",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Cluster-wide diagnostics collection. Errors are JSON objects keyed by field (`_` for the request as a whole), as Couchbase's REST API answers them."
        },
        "security": [{"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
            "schemas": schemas(),
        }
    })
}

/// The schemas of the documents: the task's (`TaskStatus` and what it
/// holds) derived from the very Rust types the API serialises, so the
/// document cannot drift from them; the others written here.
fn schemas() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    generator.subschema_for::<TaskStatus>();
    let mut schemas = generator.take_definitions(true);
    let Value::Object(written) = json!({
        "Errors": {
            "description": "Field-keyed messages: `{\"FIELD\": \"message\"}`, `_` for the request as a whole",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "string"}
        },
        "Forbidden": {
            "description": "`_` says why; `message` and `permissions` as ns_server's 403",
            "type": "object",
            "required": ["_", "message", "permissions"],
            "properties": {
                "_": {"type": "string"},
                "message": {"type": "string"},
                "permissions": {"type": "array", "items": {"type": "string"}}
            }
        },
        "LogRedaction": {
            "type": "object",
            "required": ["logRedactionLevel"],
            "properties": {"logRedactionLevel": {"enum": ["none", "partial"]}}
        },
        "Health": {
            "type": "object",
            "required": ["node", "status", "session", "coordinating", "plugins"],
            "properties": {
                "node": {"type": "string"},
                "status": {"const": "ok"},
                "session": {"type": ["string", "null"]},
                "coordinating": {"type": "boolean"},
                "plugins": {"type": "array", "items": {"$ref": "#/components/schemas/PluginRef"}},
                "reloadErrors": {"type": "array"}
            }
        }
    }) else {
        unreachable!("an object")
    };
    schemas.extend(written);
    Value::Object(schemas)
}

/// `GET /openapi.json` (no authentication: it says nothing the code and
/// the README do not).
pub async fn serve() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_start_parameter_is_described() {
        let doc = super::document();
        let form = &doc["paths"]["/collectLogs/start"]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
            ["schema"]["properties"];
        for p in super::super::public::START_PARAMS {
            assert!(form.get(p).is_some(), "{p}");
            assert!(!super::describe(p).is_empty(), "{p}");
        }
        for p in super::super::couchbase::START_PARAMS {
            assert!(!super::describe(p).is_empty(), "{p}");
        }
    }

    #[test]
    fn the_task_schema_is_derived_from_the_types_the_api_serialises() {
        use crate::coordinator::task::{NodeState, NodeStatus, TaskStatus};
        let doc = super::document();
        let schemas = &doc["components"]["schemas"];
        let task = &schemas["TaskStatus"];
        assert_eq!(task["properties"]["type"]["const"], "clusterLogsCollection");
        assert_eq!(
            task["properties"]["perNode"]["additionalProperties"]["$ref"],
            "#/components/schemas/NodeStatus"
        );
        // Every key a task and a node status can carry is in the schema,
        // and what is always there is required.
        let mut node = NodeStatus::failed(Some("1".into()), "out");
        node.path = Some("p".into());
        node.sha256 = Some("s".into());
        node.partial = true;
        node.partial_reason = Some("r".into());
        node.ignored_parameters = vec!["since".into()];
        node.url = Some("u".into());
        node.upload_status_code = Some("403".into());
        node.upload_output = Some("o".into());
        node.progress = Some(crate::coordinator::task::NodeProgress {
            done: 1,
            total: 2,
            message: "m".into(),
        });
        let mut t = TaskStatus::new(
            "t".into(),
            "n1".into(),
            [("n1".to_string(), node.clone())].into(),
        );
        t.per_node
            .insert("n2".into(), NodeStatus::new(NodeState::Starting));
        for (value, schema) in [
            (serde_json::to_value(&t).unwrap(), task),
            (serde_json::to_value(&node).unwrap(), &schemas["NodeStatus"]),
        ] {
            for key in value.as_object().unwrap().keys() {
                assert!(schema["properties"].get(key).is_some(), "{key}: {schema:#}");
            }
        }
        let required = task["required"].as_array().unwrap();
        for key in [
            "type", "taskId", "node", "status", "progress", "ts", "perNode", "version",
        ] {
            assert!(required.contains(&key.into()), "{key}");
        }
        assert_eq!(
            schemas["NodeStatus"]["required"],
            serde_json::json!(["status"])
        );
    }
}
