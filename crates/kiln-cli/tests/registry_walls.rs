//! Through the API of a real `kiln serve`: a tenant's `from` cannot make the host connect
//! to kiln's own port (or any private address its operator did not list in
//! `KILN_PRIVATE_REGISTRIES`), and the failure reads exactly like a closed port's.
//!
//! No VM boots: the builds fail while resolving `from`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn a_tenants_from_cannot_reach_kilns_own_port_nor_tell_it_from_a_closed_one() {
    let assets = assets();
    let dir = state_dir("kreg");
    let state = dir.path();
    // A closed port the server is told it may reach: kiln really connects and is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let allowed = format!("{},{closed}", test_registries(&assets));
    let server = Server::start(state, &[("KILN_PRIVATE_REGISTRIES", &allowed)]);
    let own = server.url.trim_start_matches("http://").to_owned();
    let key = api_key(state, "tenant");
    let h = [("x-api-key", key.as_str())];

    let failure = |name: &str, from: &str| -> String {
        let spec = json!({"name": name, "build_spec": {"from": from}});
        let (s, t) = http(
            "POST",
            &format!("{}/templates", server.url),
            &h,
            Some(&spec),
        );
        assert_eq!(s, 202, "{t}");
        let build = poll(
            &format!(
                "{}/templates/{}/builds/{}",
                server.url,
                t["id"].as_str().unwrap(),
                t["build_id"].as_str().unwrap()
            ),
            &h,
            Duration::from_secs(120),
            |b| !matches!(b["status"].as_str(), Some("pending" | "building")),
        );
        assert_eq!(build["status"], "failed", "{build}");
        build["error_message"].as_str().unwrap().to_owned()
    };
    let to_own = failure("own", &format!("{own}/kiln/minbase:latest"));
    let to_closed = failure("closed", &format!("{closed}/kiln/minbase:latest"));
    assert!(to_own.starts_with("registry_unreachable: "), "{to_own}");
    assert_eq!(
        to_own.replace(&own, "HOST"),
        to_closed.replace(&closed, "HOST"),
        "a tenant can tell kiln's own port from a closed one"
    );
    // By name too: `localhost` resolves to loopback.
    let port = own.rsplit_once(':').unwrap().1;
    let by_name = failure("byname", &format!("localhost:{port}/kiln/minbase:latest"));
    assert!(by_name.starts_with("registry_unreachable: "), "{by_name}");
}
