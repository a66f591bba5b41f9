//! The gateway's life cycle: reloads through the admin API (a bad config keeps the old one, a new route is
//! served, in-flight requests survive, the admin token is re-read), and the real binary under signals
//! (SIGTERM/SIGINT drain within the grace period and exit 0, SIGHUP reloads).

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use residency_gateway::dev::Pki;
use serde_json::{Value, json};

use crate::support::{self, Gw, Idp, Upstream, audit_lines, client_for, metric_value, prepare_dir};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

fn reloads(result: &str) -> String {
    format!("residency_gateway_config_reloads_total{{result=\"{result}\"}}")
}

fn route(name: &str, prefix: &str, up: &Upstream, jurisdiction: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{}\"\n\
         jurisdiction = \"{jurisdiction}\"\nissuers = [\"corp\"]\n\n",
        up.url()
    )
}

/// The admin token file, the `corp` issuer and `routes` (already formatted).
fn body(idp: &Idp, routes: &str) -> String {
    format!(
        "[admin]\ntoken_file = \"admin.token\"\n\n[[issuers]]\nname = \"corp\"\nissuer = \"{}\"\n\
         audiences = [\"api\"]\njwks_uri = \"{}\"\n\n{routes}",
        idp.issuer(),
        idp.jwks_uri()
    )
}

/// The routes every test starts with: `de`, `slow` and `big` (all DE) on one upstream.
fn base_routes(up: &Upstream) -> String {
    [route("de", "/de", up, "DE"), route("slow", "/slow", up, "DE"), route("big", "/big", up, "DE")].concat()
}

struct Env {
    gw: Gw,
    idp: Idp,
    up: Upstream,
}

impl Env {
    async fn start() -> Env {
        support::install_crypto_provider();
        let (idp, up) = (Idp::start().await, Upstream::start().await);
        let gw = Gw::start_with_files(&body(&idp, &base_routes(&up)), &[("admin.token", ADMIN_TOKEN)]).await;
        Env { gw, idp, up }
    }

    fn token(&self) -> String {
        self.idp.token(json!(["EU", "US"]))
    }

    async fn reload(&self) -> (u16, Value) {
        self.gw.admin_call("POST", "/admin/reload", Some(ADMIN_TOKEN), None).await
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reloads through the admin API

#[tokio::test]
async fn a_bad_config_on_reload_is_rejected_and_the_old_one_keeps_serving() {
    let e = Env::start().await;
    let t = e.token();
    assert_eq!(e.gw.status("/de", Some(&t)).await, (200, String::new()));

    // Two mistakes in the new file: an unknown key in a new route and an unknown jurisdiction.
    let broken = format!(
        "{}colour = \"red\"\n\n{}",
        route("us", "/us", &e.up, "US"),
        route("nowhere", "/nowhere", &e.up, "QQ")
    );
    e.gw.rewrite_config(&body(&e.idp, &(base_routes(&e.up) + &broken)));
    let (status, reply) = e.reload().await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["result"], "rejected", "{reply}");
    let errors: Vec<String> = reply["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors array: {reply}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let config_path = e.gw.dir.path().join("gateway.toml").display().to_string();
    let written = std::fs::read_to_string(e.gw.dir.path().join("gateway.toml")).unwrap();
    let line = written.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
    let want = format!("{config_path}:{line}: routes[3].colour");
    assert!(
        errors.iter().any(|l| l.contains(&want)),
        "an error names the file, the line and the unknown key ({want}): {errors:?}"
    );
    assert!(
        errors.iter().any(|l| l.contains("routes[4].jurisdiction")),
        "every error is reported at once: {errors:?}"
    );
    assert_eq!(e.gw.metric(&reloads("error")).await, 1.0);
    assert_eq!(e.gw.metric(&reloads("success")).await, 0.0);

    // The running config keeps serving, and nothing of the rejected one is live.
    assert_eq!(e.gw.status("/de", Some(&t)).await, (200, String::new()));
    assert_eq!(e.gw.status("/us", Some(&t)).await.0, 404);
    assert!(
        audit_lines().iter().any(|l| l["decision"] == "admin"
            && l["action"] == "reload"
            && l["result"] == "error"
            && l["detail"].as_str().is_some_and(|d| d.contains("routes[3].colour"))),
        "the rejected reload is an audit line"
    );

    // A file that is not TOML at all.
    std::fs::write(e.gw.dir.path().join("gateway.toml"), "[server\nlisten = ").unwrap();
    let (status, reply) = e.reload().await;
    assert_eq!(status, 422, "{reply}");
    assert!(reply["errors"][0].as_str().unwrap().contains(&config_path), "{reply}");
    assert_eq!(e.gw.metric(&reloads("error")).await, 2.0);
    assert_eq!(e.gw.status("/de", Some(&t)).await, (200, String::new()));

    // Fixed, it loads.
    e.gw.rewrite_config(&body(&e.idp, &base_routes(&e.up)));
    assert_eq!(e.reload().await.0, 200);
    assert_eq!(e.gw.metric(&reloads("success")).await, 1.0);
    assert_eq!(e.gw.status("/de", Some(&t)).await, (200, String::new()));
}

#[tokio::test]
async fn a_reload_with_a_new_route_serves_it() {
    let e = Env::start().await;
    let t = e.token();
    let other = Upstream::start().await;
    assert_eq!(e.gw.status("/usca", Some(&t)).await.0, 404);

    let routes = base_routes(&e.up) + &route("usca", "/usca", &other, "US-CA");
    e.gw.rewrite_config(&body(&e.idp, &routes));
    let (status, reply) = e.reload().await;
    assert_eq!((status, reply["result"].as_str()), (200, Some("reloaded")), "{reply}");
    assert_eq!(e.gw.metric(&reloads("success")).await, 1.0);
    assert_eq!(e.gw.metric(&reloads("error")).await, 0.0);

    assert_eq!(e.gw.status("/usca/orders", Some(&t)).await, (200, String::new()));
    assert_eq!(other.hits(), 1);
    assert_eq!(other.seen().path_and_query, "/usca/orders");
    assert_eq!(e.gw.status("/de", Some(&t)).await, (200, String::new()));
    // The new route decides residency like any other.
    let de_only = e.idp.token(json!(["DE"]));
    assert_eq!(e.gw.status("/usca", Some(&de_only)).await, (403, "region_not_allowed".into()));

    // And a route removed on reload is gone.
    e.gw.rewrite_config(&body(&e.idp, &route("usca", "/usca", &other, "US-CA")));
    assert_eq!(e.reload().await.0, 200);
    assert_eq!(e.gw.status("/de", Some(&t)).await.0, 404);
    assert_eq!(e.gw.status("/usca", Some(&t)).await, (200, String::new()));
    assert_eq!(e.gw.metric(&reloads("success")).await, 2.0);
    assert!(
        audit_lines()
            .iter()
            .any(|l| l["decision"] == "admin" && l["action"] == "reload" && l["result"] == "success"),
        "the reload is an audit line"
    );
}

#[tokio::test]
async fn in_flight_requests_survive_a_reload() {
    let e = Env::start().await;
    let t = e.token();

    // A slow response: the reload lands while the upstream is still thinking.
    let slow = {
        let (client, url, t) = (e.gw.client.clone(), format!("{}/slow/x?ms=1500", e.gw.base), t.clone());
        tokio::spawn(async move {
            let resp = client.get(url).bearer_auth(t).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    // A streamed body: the reload lands after its first bytes.
    const TOTAL: usize = 16 * 1024 * 1024;
    let mut big = e.gw.get(&format!("/big?bytes={TOTAL}"), Some(&t)).await;
    assert_eq!(big.status(), 200);
    let mut got = big.chunk().await.unwrap().expect("a first chunk").len();
    assert!(got < TOTAL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while e.up.hits() < 2 {
        assert!(Instant::now() < deadline, "the slow request did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The new config drops both routes; the reload does not wait for them.
    let started = Instant::now();
    e.gw.rewrite_config(&body(&e.idp, &route("de", "/de", &e.up, "DE")));
    assert_eq!(e.reload().await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "the reload waited {:?}", started.elapsed());
    assert!(!slow.is_finished(), "the slow request was still in flight during the reload");
    assert_eq!(e.gw.status("/slow/x?ms=0", Some(&t)).await.0, 404, "new requests see the new config");

    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), big.chunk())
        .await
        .expect("the streamed body kept flowing after the reload")
        .unwrap()
    {
        got += chunk.len();
    }
    assert_eq!(got, TOTAL, "the whole streamed body arrived");
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/slow/x?ms=1500");
}

#[tokio::test]
async fn a_reload_re_reads_the_admin_token() {
    let e = Env::start().await;
    let new_token = "rotated-admin-token-9876543210";
    std::fs::write(e.gw.dir.path().join("admin.token"), format!("{new_token}\n")).unwrap();
    assert_eq!(e.reload().await.0, 200);
    let (status, _) = e.gw.admin_call("GET", "/admin/halts", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 401, "the old admin token no longer works");
    let (status, body) = e.gw.admin_call("GET", "/admin/halts", Some(new_token), None).await;
    assert_eq!(status, 200, "{body}");
}

// ---------------------------------------------------------------------------------------------------------
// The binary under signals

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `residency-gateway run -c <dir>/gateway.toml` as a child process, on fixed loopback ports.
struct Proc {
    child: tokio::process::Child,
    dir: tempfile::TempDir,
    port: u16,
    admin_port: u16,
    client: reqwest::Client,
    grace: f64,
    _pki: Pki,
}

/// `Cpus_allowed_list` of a `/proc/<pid>/status` file.
fn allowed_cpus(status: &str) -> String {
    let status = std::fs::read_to_string(status).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string()
}

/// The first CPU this test process may run on (`0`, unless CI hands out a cpuset such as `2-3`).
fn first_allowed_cpu() -> String {
    let cpus = allowed_cpus("/proc/self/status");
    cpus.split([',', '-']).next().unwrap().to_string()
}

fn whole_config(port: u16, admin_port: u16, grace: f64, body: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         shutdown_grace_seconds = {grace:?}\n\n[server.tls]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\n\n{body}"
    )
}

impl Proc {
    async fn start(body: &str, grace: f64) -> Proc {
        Proc::start_on(body, grace, false).await
    }

    /// With `one_cpu`, started pinned (`taskset -c`) to the first CPU this test may use: on one CPU the
    /// gateway runs the single-threaded scheduler, so the tests that take both ways cover both.
    async fn start_on(body: &str, grace: f64, one_cpu: bool) -> Proc {
        support::install_crypto_provider();
        let pki = Pki::new("test CA").unwrap();
        let dir = prepare_dir(&pki);
        std::fs::write(dir.path().join("admin.token"), ADMIN_TOKEN).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        std::fs::write(dir.path().join("gateway.toml"), whole_config(port, admin_port, grace, body)).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let bin = env!("CARGO_BIN_EXE_residency-gateway");
        let mut command = if one_cpu {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", &first_allowed_cpu(), bin]);
            c
        } else {
            tokio::process::Command::new(bin)
        };
        let child = command
            .arg("run")
            .arg("-c")
            .arg(dir.path().join("gateway.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let mut p = Proc { child, client: client_for(&pki), dir, port, admin_port, grace, _pki: pki };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("the gateway exited at start ({status}): {}", p.stderr());
            }
            let health = reqwest::get(format!("http://127.0.0.1:{admin_port}/healthz")).await;
            if health.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not serve /healthz within 15 s: {}",
                p.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// The scheduler the gateway says it runs matches the CPUs it may use.
    fn assert_scheduler(&self, one_cpu: bool) {
        let cpus = allowed_cpus(&format!("/proc/{}/status", self.child.id().unwrap()));
        let log = self.stderr();
        let line = log.lines().find(|l| l.contains("async runtime")).unwrap_or_default();
        if one_cpu {
            assert_eq!(cpus, first_allowed_cpu(), "taskset did not pin the gateway");
            assert!(line.contains("cpus=1 scheduler=\"single-threaded\""), "{log}");
        } else if cpus.contains([',', '-']) {
            assert!(line.contains("scheduler=\"multi-threaded\""), "{log}");
        }
        assert!(!log.contains('\x1b'), "colour codes in a log file: {log}");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    fn rewrite(&self, body: &str) {
        let text = whole_config(self.port, self.admin_port, self.grace, body);
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the gateway is running");
        let ok = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
        assert!(ok.unwrap().success(), "kill -{name} {pid}");
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    async fn status(&self, path: &str, token: &str) -> Result<u16, reqwest::Error> {
        self.client.get(self.url(path)).bearer_auth(token).send().await.map(|r| r.status().as_u16())
    }

    async fn metric(&self, sample: &str) -> f64 {
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port)).await {
            Ok(r) => metric_value(&r.text().await.unwrap_or_default(), sample),
            Err(_) => 0.0,
        }
    }

    /// Waits for the process to exit, for at most `limit`, and returns its exit code.
    async fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!("the gateway did not exit within {limit:?}: {}", self.stderr()),
        }
    }
}

async fn refuses_connections(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
}

async fn until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    in_flight_request_finishes_on_sigterm(false).await;
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0_on_one_cpu() {
    in_flight_request_finishes_on_sigterm(true).await;
}

async fn in_flight_request_finishes_on_sigterm(one_cpu: bool) {
    let (idp, up) = (Idp::start().await, Upstream::start().await);
    let grace = 5.0;
    let mut p = Proc::start_on(&body(&idp, &base_routes(&up)), grace, one_cpu).await;
    p.assert_scheduler(one_cpu);
    let t = idp.token(json!(["DE"]));
    assert_eq!(p.status("/de", &t).await.unwrap(), 200);

    let slow = {
        let req = p.client.get(p.url("/slow/x?ms=1500")).bearer_auth(&t);
        tokio::spawn(async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits() < 2 {
        assert!(Instant::now() < deadline, "the slow request did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    p.signal("TERM");
    assert!(
        until(Duration::from_secs(1), || refuses_connections(p.port)).await,
        "new connections were still accepted 1 s after SIGTERM"
    );
    assert!(!slow.is_finished(), "connections were refused while the request was still in flight");
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/slow/x?ms=1500");

    let code = p.exit_within(Duration::from_secs_f64(grace + 2.0).saturating_sub(signalled.elapsed())).await;
    assert_eq!(code, Some(0), "{}", p.stderr());
}

#[tokio::test]
async fn sigterm_exits_0_after_the_grace_period_even_with_a_hung_request() {
    let (idp, up) = (Idp::start().await, Upstream::start().await);
    let grace = 1.0;
    let mut p = Proc::start(&body(&idp, &base_routes(&up)), grace).await;
    let t = idp.token(json!(["DE"]));
    let hung = {
        let req = p.client.get(p.url("/slow/x?ms=20000")).bearer_auth(&t);
        tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits() < 1 {
        assert!(Instant::now() < deadline, "the slow request did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    p.signal("TERM");
    let code = p.exit_within(Duration::from_secs_f64(grace + 2.0)).await;
    assert_eq!(code, Some(0), "{}", p.stderr());
    assert!(signalled.elapsed() >= Duration::from_secs_f64(grace * 0.9), "it waited for the grace period");
    // The request that outlived the grace period was cut off, not answered.
    let r = tokio::time::timeout(Duration::from_secs(5), hung).await.unwrap().unwrap();
    assert!(r.is_err(), "the hung request got an answer: {r:?}");
}

#[tokio::test]
async fn sighup_reloads_and_sigint_drains() {
    sighup_and_sigint(false).await;
}

#[tokio::test]
async fn sighup_reloads_and_sigint_drains_on_one_cpu() {
    sighup_and_sigint(true).await;
}

async fn sighup_and_sigint(one_cpu: bool) {
    let (idp, up) = (Idp::start().await, Upstream::start().await);
    let mut p = Proc::start_on(&body(&idp, &route("de", "/de", &up, "DE")), 3.0, one_cpu).await;
    p.assert_scheduler(one_cpu);
    let t = idp.token(json!(["EU", "US"]));
    assert_eq!(p.status("/de", &t).await.unwrap(), 200);
    assert_eq!(p.status("/usca", &t).await.unwrap(), 404);

    // A broken config on SIGHUP: rejected, the process keeps serving the old one.
    p.rewrite(&format!("{}\nbogus_key = 1\n", body(&idp, &route("de", "/de", &up, "DE"))));
    p.signal("HUP");
    assert!(
        until(Duration::from_secs(5), || async { p.metric(&reloads("error")).await >= 1.0 }).await,
        "no rejected reload counted after SIGHUP: {}",
        p.stderr()
    );
    assert_eq!(p.child.try_wait().unwrap(), None, "the gateway exited on a bad reload");
    assert_eq!(p.status("/de", &t).await.unwrap(), 200);
    assert!(p.stderr().contains("bogus_key"), "the rejection is logged with the key: {}", p.stderr());

    // A new route on SIGHUP is served.
    p.rewrite(&body(&idp, &(route("de", "/de", &up, "DE") + &route("usca", "/usca", &up, "US-CA"))));
    p.signal("HUP");
    assert!(
        until(Duration::from_secs(5), || async { p.status("/usca", &t).await.ok() == Some(200) }).await,
        "the new route was not served after SIGHUP: {}",
        p.stderr()
    );
    assert_eq!(p.metric(&reloads("success")).await, 1.0);
    assert_eq!(p.status("/de", &t).await.unwrap(), 200);

    // SIGINT, idle: a prompt clean exit.
    p.signal("INT");
    let code = p.exit_within(Duration::from_secs(3 + 2)).await;
    assert_eq!(code, Some(0), "{}", p.stderr());
    assert!(refuses_connections(p.port).await);
}

#[tokio::test]
async fn a_reload_re_reads_policies_and_certificates() {
    let e = Env::start().await;
    let de = e.idp.token(json!(["DE"]));
    let us = e.idp.token(json!(["US"]));

    // A new alias in a new policy file, used by a new route.
    let policies = e.gw.dir.path().join("policies");
    std::fs::write(policies.join("extra.toml"), "[aliases]\n\"dc:fra-1\" = \"DE\"\n").unwrap();
    e.gw.rewrite_config(&body(&e.idp, &(base_routes(&e.up) + &route("fra", "/fra", &e.up, "dc:fra-1"))));
    let (status, reply) = e.reload().await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(e.gw.status("/fra", Some(&de)).await, (200, String::new()));
    assert_eq!(e.gw.status("/fra", Some(&us)).await, (403, "region_not_allowed".into()));

    // A policy file that defines a group twice is rejected, naming the file; the old policies stay.
    std::fs::write(policies.join("dup.toml"), "[groups]\nEU = [\"DE\"]\n").unwrap();
    let (status, reply) = e.reload().await;
    assert_eq!(status, 422, "{reply}");
    assert!(reply["errors"].to_string().contains("dup.toml"), "{reply}");
    std::fs::remove_file(policies.join("dup.toml")).unwrap();
    assert_eq!(e.gw.status("/fra", Some(&de)).await, (200, String::new()));

    // A certificate from another CA: new connections get it after the reload.
    let other = Pki::new("second CA").unwrap();
    let leaf = other.issue(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(e.gw.dir.path().join("gateway.crt"), format!("{}{}", leaf.cert_pem, other.ca_pem))
        .unwrap();
    std::fs::write(e.gw.dir.path().join("gateway.key"), leaf.key_pem).unwrap();
    assert_eq!(e.reload().await.0, 200);
    let url = format!("{}/de", e.gw.base);
    let fresh = client_for(&other).get(&url).bearer_auth(&de).send().await;
    assert_eq!(fresh.map(|r| r.status().as_u16()).ok(), Some(200), "the new certificate is served");
    let old = client_for(&e.gw.pki).get(&url).bearer_auth(&de).send().await;
    assert!(old.is_err(), "a client trusting only the old CA still connects: {old:?}");
}
