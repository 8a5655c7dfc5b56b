//! Prometheus metrics, in the text exposition format 0.0.4, without a metrics crate: kiln has a
//! handful of series, and what the store knows (builds, sandboxes, templates) is read fresh
//! from [`kiln_engine::Engine::stats`] at scrape time rather than mirrored in counters that a
//! restart would reset.
//!
//! Labels are only ever drawn from small fixed sets (methods, route templates, statuses,
//! error codes): never a raw path, id, team, key or token. A label per id would leak tenant
//! data to whoever scrapes and would grow the series count without bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_engine::{DurationHistogram, StoreStats};

/// Upper bounds (seconds) for sandbox restores: a snapshot restore is expected in well under
/// a second; the tail shows cold page caches and overloaded hosts.
pub const RESTORE_BUCKETS_SECS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// Upper bounds (seconds) for API requests, up to the time to first byte: streams (logs, exec)
/// count until their response head, not until they close.
pub const REQUEST_BUCKETS_SECS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `route` label of requests that matched no route: their raw path is the client's to
/// choose, so it must not become a label.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Distinct routes kept before new ones are folded into [`OVERFLOW_ROUTE`]. Routes are the
/// router's templates, far fewer than this; the cap only guards against a caller passing
/// raw paths by mistake.
const MAX_ROUTES: usize = 256;
const OVERFLOW_ROUTE: &str = "other";

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the server records as it runs. Clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    restores: Mutex<Option<Histogram>>,
    routes: Mutex<BTreeMap<String, RouteSeries>>,
}

#[derive(Debug, Default)]
struct RouteSeries {
    /// `(method, status) -> count`.
    requests: BTreeMap<(&'static str, u16), u64>,
    /// `method -> durations`.
    durations: BTreeMap<&'static str, Histogram>,
}

/// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, secs: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }

    /// `(bound, cumulative count)` for every finite bound.
    fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, n)| {
                acc += n;
                (*b, acc)
            })
            .collect()
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a counter; the numbers are
/// still worth serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Methods outside the standard set share one label value, since any token is a valid
/// method and clients choose it.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Metrics {
    /// An empty set of series.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records how long a sandbox took to restore from its template's snapshot.
    pub fn observe_restore(&self, elapsed: Duration) {
        lock(&self.inner.restores)
            .get_or_insert_with(|| Histogram::new(RESTORE_BUCKETS_SECS))
            .observe(elapsed.as_secs_f64());
    }

    /// Records one answered request.
    ///
    /// `route` is the matched route template (`MatchedPath::as_str`, e.g.
    /// `/sandboxes/{sandbox}`), never the request's path; `None` for a request no route
    /// matched.
    pub fn observe_request(
        &self,
        method: &Method,
        route: Option<&str>,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        let route = route.unwrap_or(UNMATCHED_ROUTE);
        let mut routes = lock(&self.inner.routes);
        if !routes.contains_key(route) {
            let key = if routes.len() < MAX_ROUTES {
                route
            } else {
                OVERFLOW_ROUTE
            };
            routes.entry(key.to_owned()).or_default();
        }
        let series = match routes.get_mut(route) {
            Some(s) => s,
            None => routes.get_mut(OVERFLOW_ROUTE).expect("inserted above"),
        };
        *series
            .requests
            .entry((method, status.as_u16()))
            .or_default() += 1;
        series
            .durations
            .entry(method)
            .or_insert_with(|| Histogram::new(REQUEST_BUCKETS_SECS))
            .observe(elapsed.as_secs_f64());
    }

    /// Every series, the recorded ones followed by the store's, in the text format.
    pub fn render(&self, stats: &StoreStats) -> String {
        let mut out = String::new();

        family(
            &mut out,
            "kiln_sandbox_restore_seconds",
            "Time to restore a sandbox from its template snapshot.",
            "histogram",
        );
        let restores = lock(&self.inner.restores)
            .clone()
            .unwrap_or_else(|| Histogram::new(RESTORE_BUCKETS_SECS));
        histogram(
            &mut out,
            "kiln_sandbox_restore_seconds",
            &[],
            &restores.cumulative(),
            restores.sum,
            restores.count,
        );

        {
            let routes = lock(&self.inner.routes);
            family(
                &mut out,
                "kiln_http_requests_total",
                "HTTP requests answered, by method, route template and status.",
                "counter",
            );
            for (route, series) in routes.iter() {
                for ((method, status), n) in &series.requests {
                    let status = status.to_string();
                    let labels = [("method", *method), ("route", route), ("status", &status)];
                    sample(&mut out, "kiln_http_requests_total", &labels, *n as f64);
                }
            }
            family(
                &mut out,
                "kiln_http_request_duration_seconds",
                "Time from request to response head, by method and route template.",
                "histogram",
            );
            for (route, series) in routes.iter() {
                for (method, h) in &series.durations {
                    let labels = [("method", *method), ("route", route.as_str())];
                    histogram(
                        &mut out,
                        "kiln_http_request_duration_seconds",
                        &labels,
                        &h.cumulative(),
                        h.sum,
                        h.count,
                    );
                }
            }
        }

        family(
            &mut out,
            "kiln_builds",
            "Builds in the store, by status.",
            "gauge",
        );
        for (status, n) in &stats.builds_by_status {
            sample(
                &mut out,
                "kiln_builds",
                &[("status", status.as_str())],
                *n as f64,
            );
        }
        family(
            &mut out,
            "kiln_failed_builds",
            "Failed builds in the store, by error code (a gauge: deleting a template drops its builds).",
            "gauge",
        );
        for (code, n) in &stats.build_failures_by_code {
            sample(
                &mut out,
                "kiln_failed_builds",
                &[("code", code.as_str())],
                *n as f64,
            );
        }
        family(
            &mut out,
            "kiln_build_duration_seconds",
            "Run time of finished builds in the store, from start to end.",
            "histogram",
        );
        let DurationHistogram {
            buckets,
            sum_secs,
            count,
        } = &stats.build_durations;
        histogram(
            &mut out,
            "kiln_build_duration_seconds",
            &[],
            buckets,
            *sum_secs,
            *count,
        );
        family(
            &mut out,
            "kiln_sandboxes",
            "Sandboxes in the store, by status.",
            "gauge",
        );
        for (status, n) in &stats.sandboxes_by_status {
            sample(
                &mut out,
                "kiln_sandboxes",
                &[("status", status.as_str())],
                *n as f64,
            );
        }
        family(
            &mut out,
            "kiln_live_sandboxes",
            "Sandboxes neither failed nor deleted.",
            "gauge",
        );
        sample(
            &mut out,
            "kiln_live_sandboxes",
            &[],
            stats.live_sandboxes as f64,
        );
        family(
            &mut out,
            "kiln_templates",
            "Templates in the store.",
            "gauge",
        );
        sample(&mut out, "kiln_templates", &[], stats.templates as f64);
        out
    }
}

/// The engine's restore pool (process-local, so not part of [`StoreStats`]).
pub fn render_pool(out: &mut String, pool: kiln_engine::PoolStats) {
    family(
        out,
        "kiln_restore_pool_waiting",
        "QEMU processes started ahead of time, waiting for a sandbox of their template build.",
        "gauge",
    );
    sample(out, "kiln_restore_pool_waiting", &[], pool.waiting as f64);
    family(
        out,
        "kiln_restore_pool_claims_total",
        "Sandboxes restored into a process from the pool (the others started their own).",
        "counter",
    );
    sample(
        out,
        "kiln_restore_pool_claims_total",
        &[],
        pool.claimed as f64,
    );
}

/// What this host can take: build slots, each team's sandbox limit, and the machine's
/// processors and memory (`/proc/meminfo`), so a dashboard (the console's overview) can
/// set what runs against what fits.
pub fn render_capacity(out: &mut String, config: &kiln_engine::EngineConfig) {
    family(
        out,
        "kiln_build_slots",
        "Builds this host runs at once (more wait in pending).",
        "gauge",
    );
    sample(
        out,
        "kiln_build_slots",
        &[],
        config.max_parallel_builds as f64,
    );
    if config.limits.max_live_sandboxes != u32::MAX {
        family(
            out,
            "kiln_team_sandbox_limit",
            "Live sandboxes a team may have.",
            "gauge",
        );
        let limit = f64::from(config.limits.max_live_sandboxes);
        sample(out, "kiln_team_sandbox_limit", &[], limit);
    }
    family(out, "kiln_host_cpus", "Processors of this host.", "gauge");
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    sample(out, "kiln_host_cpus", &[], cpus as f64);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    for (name, key, help) in [
        (
            "kiln_host_memory_bytes",
            "MemTotal:",
            "Memory of this host.",
        ),
        (
            "kiln_host_memory_available_bytes",
            "MemAvailable:",
            "Memory of this host available to new processes.",
        ),
    ] {
        if let Some(v) = kib(key) {
            family(out, name, help, "gauge");
            sample(out, name, &[], v * 1024.0);
        }
    }
}

/// A `/metrics` response carrying `text`.
pub fn render_response(text: String) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        text,
    )
        .into_response()
}

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", number(value));
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    cumulative: &[(f64, u64)],
    sum: f64,
    count: u64,
) {
    let bucket = format!("{name}_bucket");
    for (bound, n) in cumulative {
        let le = number(*bound);
        let mut l = labels.to_vec();
        l.push(("le", &le));
        sample(out, &bucket, &l, *n as f64);
    }
    let mut l = labels.to_vec();
    l.push(("le", "+Inf"));
    sample(out, &bucket, &l, count as f64);
    sample(out, &format!("{name}_sum"), labels, sum);
    sample(out, &format!("{name}_count"), labels, count as f64);
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use kiln_api::BuildErrorCode;
    use kiln_api::{BuildStatus, SandboxStatus};

    use super::*;

    fn stats() -> StoreStats {
        StoreStats {
            builds_by_status: BuildStatus::ALL.iter().map(|s| (*s, 1)).collect(),
            build_failures_by_code: vec![
                (BuildErrorCode::StepFailed, 3),
                (BuildErrorCode::BuildFailed, 1),
            ],
            build_durations: DurationHistogram {
                buckets: kiln_engine::BUILD_DURATION_BUCKETS_SECS
                    .iter()
                    .map(|b| (*b, if *b >= 60.0 { 2 } else { 0 }))
                    .collect(),
                sum_secs: 95.5,
                count: 2,
            },
            sandboxes_by_status: vec![(SandboxStatus::Active, 2), (SandboxStatus::Deleted, 7)],
            live_sandboxes: 2,
            templates: 4,
        }
    }

    /// Every non-comment line is `name{labels} value`, every family has HELP then TYPE
    /// before its samples, and no family is declared twice.
    fn assert_well_formed(text: &str) {
        let mut declared = Vec::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(Some(name), declared.last().map(String::as_str));
                current = Some((name.to_owned(), kind.to_owned()));
            } else {
                let (family, kind) = current.as_ref().expect("sample before TYPE");
                let name_end = line.find(['{', ' ']).unwrap();
                let name = &line[..name_end];
                let ok = match kind.as_str() {
                    "histogram" => [
                        format!("{family}_bucket"),
                        format!("{family}_sum"),
                        format!("{family}_count"),
                    ]
                    .contains(&name.to_owned()),
                    _ => name == family,
                };
                assert!(ok, "{name} under {family}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(
                    value.parse::<f64>().is_ok() || value == "+Inf",
                    "value {value:?}"
                );
            }
        }
    }

    #[test]
    fn renders_requests_by_route_template() {
        let m = Metrics::new();
        let route = Some("/sandboxes/{sandbox}");
        let ms = Duration::from_millis;
        m.observe_request(&Method::GET, route, StatusCode::OK, ms(3));
        m.observe_request(&Method::GET, route, StatusCode::OK, ms(30));
        m.observe_request(&Method::GET, route, StatusCode::NOT_FOUND, ms(2));
        m.observe_request(&Method::DELETE, route, StatusCode::NO_CONTENT, ms(700));
        let odd = Method::from_bytes(b"BREW").unwrap();
        m.observe_request(&odd, None, StatusCode::NOT_FOUND, ms(1));
        let text = m.render(&stats());
        assert_well_formed(&text);

        for line in [
            r#"kiln_http_requests_total{method="GET",route="/sandboxes/{sandbox}",status="200"} 2"#,
            r#"kiln_http_requests_total{method="GET",route="/sandboxes/{sandbox}",status="404"} 1"#,
            r#"kiln_http_requests_total{method="DELETE",route="/sandboxes/{sandbox}",status="204"} 1"#,
            r#"kiln_http_requests_total{method="other",route="unmatched",status="404"} 1"#,
            r#"kiln_http_request_duration_seconds_bucket{method="GET",route="/sandboxes/{sandbox}",le="0.005"} 2"#,
            r#"kiln_http_request_duration_seconds_bucket{method="GET",route="/sandboxes/{sandbox}",le="0.025"} 2"#,
            r#"kiln_http_request_duration_seconds_bucket{method="GET",route="/sandboxes/{sandbox}",le="0.05"} 3"#,
            r#"kiln_http_request_duration_seconds_bucket{method="GET",route="/sandboxes/{sandbox}",le="+Inf"} 3"#,
            r#"kiln_http_request_duration_seconds_count{method="GET",route="/sandboxes/{sandbox}"} 3"#,
            r#"kiln_http_request_duration_seconds_sum{method="DELETE",route="/sandboxes/{sandbox}"} 0.7"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn renders_restores_and_store_stats() {
        let m = Metrics::new();
        m.observe_restore(Duration::from_millis(80));
        m.observe_restore(Duration::from_secs(60));
        let text = m.render(&stats());
        assert_well_formed(&text);
        for line in [
            "# TYPE kiln_sandbox_restore_seconds histogram",
            r#"kiln_sandbox_restore_seconds_bucket{le="0.05"} 0"#,
            r#"kiln_sandbox_restore_seconds_bucket{le="0.1"} 1"#,
            r#"kiln_sandbox_restore_seconds_bucket{le="30"} 1"#,
            r#"kiln_sandbox_restore_seconds_bucket{le="+Inf"} 2"#,
            "kiln_sandbox_restore_seconds_sum 60.08",
            "kiln_sandbox_restore_seconds_count 2",
            "# TYPE kiln_builds gauge",
            r#"kiln_builds{status="snapshotting"} 1"#,
            "# TYPE kiln_failed_builds gauge",
            r#"kiln_failed_builds{code="step_failed"} 3"#,
            r#"kiln_failed_builds{code="build_failed"} 1"#,
            r#"kiln_build_duration_seconds_bucket{le="30"} 0"#,
            r#"kiln_build_duration_seconds_bucket{le="3600"} 2"#,
            r#"kiln_build_duration_seconds_bucket{le="+Inf"} 2"#,
            "kiln_build_duration_seconds_sum 95.5",
            "kiln_build_duration_seconds_count 2",
            r#"kiln_sandboxes{status="deleted"} 7"#,
            "kiln_live_sandboxes 2",
            "kiln_templates 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn empty_metrics_still_declare_every_family() {
        let text = Metrics::new().render(&StoreStats::default());
        assert_well_formed(&text);
        assert!(text.contains(r#"kiln_sandbox_restore_seconds_bucket{le="+Inf"} 0"#));
        assert!(text.contains("# TYPE kiln_http_requests_total counter"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut out = String::new();
        sample(&mut out, "x", &[("route", "/a\"b")], 1.0);
        assert_eq!(out, "x{route=\"/a\\\"b\"} 1\n");
    }

    #[test]
    fn routes_beyond_the_cap_fold_into_one_series() {
        let m = Metrics::new();
        for i in 0..MAX_ROUTES + 10 {
            let route = format!("/r{i}");
            m.observe_request(&Method::GET, Some(&route), StatusCode::OK, Duration::ZERO);
        }
        assert_eq!(lock(&m.inner.routes).len(), MAX_ROUTES + 1);
        let text = m.render(&StoreStats::default());
        assert!(text.contains(r#"route="other",status="200"} 10"#));
    }

    #[test]
    fn response_has_the_exposition_content_type() {
        let r = render_response("x 1\n".into());
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }
}
