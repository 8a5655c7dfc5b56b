//! The OpenAPI document (`openapi.json`) against the routes: it describes exactly
//! [`kiln_server::ROUTES`], its operations are well-formed and its references resolve, the
//! router answers every route, and `GET /openapi.json` serves the document itself.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use kiln_engine::{Engine, EngineConfig};
use kiln_server::{router, AppState, ROUTES};
use serde_json::Value;
use tower::ServiceExt as _;

const DOCUMENT: &str = include_str!("../openapi.json");

/// The header that routes a data-plane request to its sandbox.
const SANDBOX_ID_HEADER: &str = "X-Superserve-Sandbox-Id";

/// The keys of a path item that are operations.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
}

/// Follows a local `$ref` (`#/components/...`); anything else is returned as is.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = r
                .strip_prefix('#')
                .and_then(|pointer| doc.pointer(pointer))
                .unwrap_or_else(|| panic!("unresolvable $ref {r}"));
            resolve(doc, target)
        }
        None => v,
    }
}

/// Every operation: `(METHOD, path, path item, operation)`.
fn operations(doc: &Value) -> Vec<(String, &str, &Value, &Value)> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    let mut out = Vec::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for (key, op) in item {
            if METHODS.contains(&key.as_str()) {
                out.push((key.to_uppercase(), path.as_str(), &doc["paths"][path], op));
            }
        }
    }
    out
}

/// The parameters that apply to an operation (path item's, then the operation's),
/// resolved.
fn parameters<'a>(doc: &'a Value, item: &'a Value, op: &'a Value) -> Vec<&'a Value> {
    [item.get("parameters"), op.get("parameters")]
        .into_iter()
        .flatten()
        .flat_map(|list| list.as_array().expect("`parameters` is an array"))
        .map(|p| resolve(doc, p))
        .collect()
}

/// The `{param}` names of a path template.
fn path_params(path: &str) -> BTreeSet<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

#[test]
fn document_describes_exactly_the_routes() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(
        version.starts_with("3.1."),
        "openapi is {version}, not 3.1.x"
    );

    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _, _)| (method, path.to_owned()))
        .collect();
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(method, path)| (method.to_string(), path.to_string()))
        .collect();
    assert_eq!(routed.len(), ROUTES.len(), "ROUTES has duplicates");

    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "openapi.json and ROUTES differ.\n  in ROUTES, not documented: {undocumented:?}\n  \
         documented, not in ROUTES: {unrouted:?}"
    );
}

#[test]
fn operations_are_well_formed() {
    let doc = document();
    let mut ids: BTreeMap<&str, String> = BTreeMap::new();
    let mut problems = Vec::new();
    for (method, path, item, op) in operations(&doc) {
        let at = format!("{method} {path}");
        match op.get("operationId").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => {
                if let Some(other) = ids.insert(id, at.clone()) {
                    problems.push(format!("{at}: operationId {id:?} is also used by {other}"));
                }
            }
            _ => problems.push(format!("{at}: no operationId")),
        }
        if op["responses"].as_object().is_none_or(|r| r.is_empty()) {
            problems.push(format!("{at}: no responses"));
        }

        // The `{param}`s of the path and its declared path parameters agree.
        let params = parameters(&doc, item, op);
        let declared: BTreeSet<&str> = params
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| {
                if p["required"] != true {
                    problems.push(format!(
                        "{at}: path parameter {} is not required",
                        p["name"]
                    ));
                }
                p["name"].as_str().expect("a parameter has a name")
            })
            .collect();
        if declared != path_params(path) {
            problems.push(format!(
                "{at}: path parameters {declared:?} do not match the path's {:?}",
                path_params(path)
            ));
        }

        // JSON request bodies refuse unknown fields.
        if let Some(body) = op.get("requestBody") {
            let body = resolve(&doc, body);
            if let Some(schema) = body.pointer("/content/application~1json/schema") {
                if resolve(&doc, schema)["additionalProperties"] != false {
                    problems.push(format!(
                        "{at}: the JSON request body lacks additionalProperties: false"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_ref_resolves() {
    fn walk(doc: &Value, v: &Value, at: &str, bad: &mut Vec<String>, count: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref") {
                    *count += 1;
                    let ok = r
                        .as_str()
                        .and_then(|r| r.strip_prefix('#'))
                        .is_some_and(|pointer| doc.pointer(pointer).is_some());
                    if !ok {
                        bad.push(format!("{at}: $ref {r}"));
                    }
                }
                for (k, child) in map {
                    walk(doc, child, &format!("{at}/{k}"), bad, count);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(doc, child, &format!("{at}/{i}"), bad, count);
                }
            }
            _ => {}
        }
    }
    let doc = document();
    let (mut bad, mut count) = (Vec::new(), 0);
    walk(&doc, &doc, "#", &mut bad, &mut count);
    assert!(count > 0, "no $ref at all: is the walk broken?");
    assert!(
        bad.is_empty(),
        "unresolvable references:\n{}",
        bad.join("\n")
    );
}

struct Api {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

async fn api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path())).await.unwrap();
    Api {
        app: router(AppState::new(engine)),
        _dir: dir,
    }
}

/// A path with every `{param}` replaced by a dummy value.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "x"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether the documented operation routes by the sandbox-id header (the data plane).
fn routed_by_sandbox_header(doc: &Value, method: &str, path: &str) -> bool {
    let item = &doc["paths"][path];
    let op = &item[method.to_lowercase()];
    parameters(doc, item, op)
        .iter()
        .any(|p| p["in"] == "header" && p["name"] == SANDBOX_ID_HEADER)
}

#[tokio::test]
async fn router_answers_every_route() {
    let doc = document();
    let a = api().await;
    let mut unanswered = Vec::new();
    for (method, path) in ROUTES {
        // No credentials and no body: a real route answers 401, 400, 404 `not_found`...
        // anything but the fallbacks for an unknown path or method.
        let mut req = Request::builder().method(*method).uri(concrete(path));
        if routed_by_sandbox_header(&doc, method, path) {
            req = req.header(SANDBOX_ID_HEADER, "00000000-0000-0000-0000-000000000000");
        }
        let resp = a
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            unanswered.push(format!("{method} {path}: 405"));
            continue;
        }
        if status == StatusCode::NOT_FOUND {
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if body["error"]["code"] == "no_route" {
                unanswered.push(format!("{method} {path}: 404 no_route"));
            }
        }
    }
    assert!(
        unanswered.is_empty(),
        "routes the router does not answer:\n{}",
        unanswered.join("\n")
    );
}

#[tokio::test]
async fn openapi_json_serves_the_document() {
    let a = api().await;
    let req = Request::builder()
        .method("GET")
        .uri("/openapi.json")
        .body(Body::empty())
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let served: Value = serde_json::from_slice(&bytes).expect("the served document is JSON");
    assert_eq!(served, document());
}
