//! The offline checks of deploy/: Kubernetes manifests (after kustomize) against the
//! Kubernetes API schemas and KEDA's CRD schema, alert rules with promtool, the compose
//! file against the compose-spec schema, the Dockerfile with hadolint, and the promises
//! the manifests make (probes, grace periods, non-root, the worker bound). Each checker
//! is also shown failing on a deliberately broken copy. The checkers come from the
//! package registries through `deploy/checks/tools.sh`, which `make test` runs.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use refresh_tests::repo_root;
use serde_json::Value;

/// Where `deploy/checks/tools.sh` installed the checkers.
fn tools() -> PathBuf {
    let dir = std::env::var_os("REFRESHD_TOOLS_DIR")
        .map_or_else(|| repo_root().join("target/tools"), PathBuf::from);
    assert!(
        dir.join(".installed").is_file(),
        "the deploy checkers are not installed in {}: run deploy/checks/tools.sh (make test does)",
        dir.display()
    );
    dir
}

fn tool(name: &str) -> Command {
    let tools = tools();
    let path = match name {
        "promtool" => tools.join("bin/promtool"),
        _ => tools.join("venv/bin").join(name),
    };
    let mut command = Command::new(path);
    command.env("REFRESHD_TOOLS_DIR", &tools);
    command
}

fn run(mut command: Command) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut text = String::from_utf8_lossy(&stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&stderr));
    (status.success(), text)
}

/// A fresh scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "refreshd-deploy-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Replaces `from` (which must occur) by `to` in `file`.
fn break_file(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains(from),
        "{} has no {from:?} to break",
        file.display()
    );
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

/// `kustomize build dir` (kubectl's built-in kustomize when no `kustomize` is on PATH).
fn kustomize(dir: &Path, out: &Path) -> (bool, String) {
    let mut command = if Command::new("kustomize").arg("version").output().is_ok() {
        let mut c = Command::new("kustomize");
        c.arg("build");
        c
    } else {
        let mut c = Command::new("kubectl");
        c.arg("kustomize");
        c
    };
    command.arg(dir);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run kustomize ({command:?}): {e}"));
    std::fs::write(out, &output.stdout).unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Validates `manifests` with deploy/checks/k8s.py; the objects as JSON.
fn validate_k8s(manifests: &Path, scratch: &Scratch) -> (bool, String, Vec<Value>) {
    let json = scratch.path("objects.json");
    let _ = std::fs::remove_file(&json);
    let mut command = tool("python");
    command
        .arg(repo_root().join("deploy/checks/k8s.py"))
        .arg(manifests)
        .arg("--json")
        .arg(&json);
    let (ok, text) = run(command);
    let objects = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or_default();
    (ok, text, objects)
}

/// Builds and validates the kustomization in `dir`, expecting success.
fn build_valid(dir: &Path, scratch: &Scratch) -> Vec<Value> {
    let built = scratch.path("built.yaml");
    let (ok, err) = kustomize(dir, &built);
    assert!(ok, "kustomize build {} failed: {err}", dir.display());
    let (ok, text, objects) = validate_k8s(&built, scratch);
    assert!(ok, "{} does not validate:\n{text}", dir.display());
    assert!(
        text.lines().all(|l| l.starts_with("ok ")),
        "unexpected checker output:\n{text}"
    );
    assert_eq!(text.lines().count(), objects.len(), "{text}");
    objects
}

/// Builds the kustomization in `dir`, expecting validation to fail; the checker's output.
fn build_invalid(dir: &Path, scratch: &Scratch) -> String {
    let built = scratch.path("built.yaml");
    let (ok, err) = kustomize(dir, &built);
    assert!(ok, "kustomize build {} failed: {err}", dir.display());
    let (ok, text, _) = validate_k8s(&built, scratch);
    assert!(!ok, "a broken manifest passed:\n{text}");
    text
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the manifests"))
}

fn default_config() -> toml::Table {
    std::fs::read_to_string(repo_root().join("config/default.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

fn config_int(config: &toml::Table, section: &str, key: &str) -> i64 {
    config[section][key].as_integer().unwrap()
}

#[test]
fn kubernetes_manifests_validate_against_the_api_and_keda_schemas() {
    let scratch = Scratch::new();
    let k8s = repo_root().join("deploy/k8s");
    for dir in ["base", "overlays/dev"] {
        let objects = build_valid(&k8s.join(dir), &scratch);
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        for kind in [
            "ConfigMap",
            "Job",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ScaledObject",
            "TriggerAuthentication",
        ] {
            assert!(kinds.contains(&kind), "{dir}: no {kind} in {kinds:?}");
        }
    }
    // The Secret template is applied by hand, not by kustomize: checked on its own.
    let (ok, text, objects) = validate_k8s(&k8s.join("base/secret.template.yaml"), &scratch);
    assert!(ok, "{text}");
    assert_eq!(objects[0]["metadata"]["name"], "refreshd-secrets");
}

#[test]
fn broken_manifests_fail_validation() {
    let scratch = Scratch::new();
    let copy = scratch.path("k8s");
    copy_tree(&repo_root().join("deploy/k8s"), &copy);
    let base = copy.join("base");

    // A type error in a core kind.
    break_file(
        &base.join("worker.yaml"),
        "containerPort: 9102",
        "containerPort: nine-one-oh-two",
    );
    let text = build_invalid(&base, &scratch);
    assert!(
        text.contains("error Deployment/refreshd-worker:") && text.contains("containerPort"),
        "{text}"
    );
    copy_tree(&repo_root().join("deploy/k8s/base"), &base);

    // A misspelt field: strict validation refuses what the API server would drop.
    break_file(
        &base.join("scheduler.yaml"),
        "terminationGracePeriodSeconds:",
        "terminationGracePeriodSecond:",
    );
    let text = build_invalid(&base, &scratch);
    assert!(
        text.contains("error Deployment/refreshd-scheduler:")
            && text.contains("terminationGracePeriodSecond"),
        "{text}"
    );
    copy_tree(&repo_root().join("deploy/k8s/base"), &base);

    // The KEDA object against its CRD schema.
    break_file(
        &base.join("worker-scaledobject.yaml"),
        "maxReplicaCount: 4",
        "maxReplicaCount: many",
    );
    let text = build_invalid(&base, &scratch);
    assert!(
        text.contains(
            "error ScaledObject/refreshd-worker: data/spec/maxReplicaCount must be integer"
        ),
        "{text}"
    );
    copy_tree(&repo_root().join("deploy/k8s/base"), &base);
    break_file(
        &base.join("worker-scaledobject.yaml"),
        "scaleTargetRef:\n    name: refreshd-worker",
        "scaleTargetRef:\n    kind: Deployment",
    );
    let text = build_invalid(&base, &scratch);
    assert!(
        text.contains(
            "error ScaledObject/refreshd-worker: data/spec/scaleTargetRef must have required property name"
        ),
        "{text}"
    );

    // A kind nobody has a schema for is an error, never a skip.
    let unknown = scratch.path("unknown.yaml");
    std::fs::write(
        &unknown,
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n",
    )
    .unwrap();
    let (ok, text, _) = validate_k8s(&unknown, &scratch);
    assert!(!ok);
    assert!(
        text.contains("error Widget/w: no schema for example.com/v1 Widget"),
        "{text}"
    );
}

#[test]
fn manifests_keep_the_operational_promises() {
    let scratch = Scratch::new();
    let objects = build_valid(&repo_root().join("deploy/k8s/overlays/dev"), &scratch);
    let config = default_config();
    let grace = config_int(&config, "shutdown", "grace_secs");

    // The ConfigMap is config/default.toml, byte for byte.
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("a ConfigMap");
    assert_eq!(
        config_map["data"]["default.toml"].as_str().unwrap(),
        std::fs::read_to_string(repo_root().join("config/default.toml")).unwrap(),
        "deploy/k8s/base/default.toml differs from config/default.toml: \
         cp config/default.toml deploy/k8s/base/default.toml"
    );

    // Every pod: non-root, read-only root filesystem, resource requests, a grace period
    // above shutdown.grace_secs.
    for object in objects
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "Job")
    {
        let name = object["metadata"]["name"].as_str().unwrap();
        let pod = &object["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert!(pod["securityContext"]["runAsUser"].as_i64().unwrap() > 0);
        if object["kind"] == "Deployment" {
            let termination = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
            assert!(termination > grace, "{name}: {termination} <= {grace}");
        }
        for container in pod["containers"].as_array().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert!(
                container["resources"]["requests"]["cpu"].is_string(),
                "{name}"
            );
            assert!(container["resources"]["requests"]["memory"].is_string());
        }
    }

    // Probes on /healthz and /readyz, on the port each role serves them on.
    for (name, port_env, port) in [
        ("refreshd-ingress", "REFRESHD__HTTP__BIND", 8080),
        ("refreshd-worker", "REFRESHD__WORKER__METRICS_BIND", 9102),
        (
            "refreshd-scheduler",
            "REFRESHD__SCHEDULER__METRICS_BIND",
            9103,
        ),
    ] {
        let container =
            &find(&objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = container["env"].as_array().unwrap();
        let bind = env.iter().find(|e| e["name"] == port_env).unwrap();
        assert_eq!(bind["value"], format!("0.0.0.0:{port}"), "{name}");
        assert_eq!(container["ports"][0]["containerPort"], port, "{name}");
        let role = name.trim_start_matches("refreshd-");
        assert_eq!(container["args"][0], role);
    }
    let sim = &find(&objects, "Deployment", "refreshd-bank-sim")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(sim["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sim["livenessProbe"]["httpGet"]["path"], "/healthz");

    assert_eq!(
        find(&objects, "Deployment", "refreshd-scheduler")["spec"]["replicas"],
        2
    );
    assert!(
        find(&objects, "Deployment", "refreshd-worker")["spec"]["replicas"].is_null(),
        "KEDA owns the worker's replicas"
    );

    // KEDA scales on {namespace}.jobs, one worker's concurrency per replica.
    let scaled = &find(&objects, "ScaledObject", "refreshd-worker")["spec"];
    let trigger = &scaled["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"],
        format!("{}.jobs", config["namespace"].as_str().unwrap())
    );
    assert_eq!(
        trigger["metadata"]["value"],
        config_int(&config, "worker", "concurrency").to_string()
    );
}

#[test]
fn the_worker_upper_bound_follows_the_stagger() {
    let scratch = Scratch::new();
    let objects = build_valid(&repo_root().join("deploy/k8s/base"), &scratch);
    let config = default_config();
    let limit = config_int(&config, "stagger", "limit") as f64;
    let period = config_int(&config, "stagger", "period_secs") as f64;
    let concurrency = config_int(&config, "worker", "concurrency") as f64;
    // The slow-bank latency the manifest's comment assumes.
    let latency_secs = 120.0;
    let bound = (limit / period * latency_secs / concurrency).ceil();
    let scaled = &find(&objects, "ScaledObject", "refreshd-worker")["spec"];
    assert_eq!(scaled["maxReplicaCount"].as_f64().unwrap(), bound);
    let text =
        std::fs::read_to_string(repo_root().join("deploy/k8s/base/worker-scaledobject.yaml"))
            .unwrap();
    assert!(
        text.contains("ceil(stagger rate × bank latency ÷ worker.concurrency)"),
        "the bound is documented where it is set"
    );
}

fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let mut command = tool("promtool");
    command.args(args).current_dir(dir);
    run(command)
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = repo_root().join("deploy/observability");
    let (ok, text) = promtool(&["check", "rules", "alerts.yaml"], &dir);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yaml"], &dir);
    assert!(ok, "{text}");
    let (ok, text) = promtool(&["check", "config", "prometheus.yml"], &dir);
    assert!(ok, "{text}");
}

#[test]
fn broken_alert_rules_fail_promtool() {
    let scratch = Scratch::new();
    copy_tree(&repo_root().join("deploy/observability"), &scratch.0);
    let rules = scratch.path("alerts.yaml");

    break_file(
        &rules,
        "expr: sum(rate(refreshd_refusals_total{code=\"backlog_full\"}[5m])) > 0",
        "expr: sum(rate(refreshd_refusals_total{code=\"backlog_full\"}[5m]) > 0",
    );
    let (ok, text) = promtool(&["check", "rules", "alerts.yaml"], &scratch.0);
    assert!(!ok, "an unbalanced expression passed: {text}");
    assert!(text.contains("FAILED"), "{text}");

    // A valid rule that no longer does what its unit test says also fails.
    copy_tree(&repo_root().join("deploy/observability"), &scratch.0);
    break_file(&rules, "            > 0.2\n", "            > 0.5\n");
    let (ok, _) = promtool(&["check", "rules", "alerts.yaml"], &scratch.0);
    assert!(ok, "the changed threshold is still a valid rule");
    let (ok, text) = promtool(&["test", "rules", "alerts.test.yaml"], &scratch.0);
    assert!(!ok, "a changed threshold passed the unit tests: {text}");
    assert!(text.contains("RefreshdBankErrorRatioHigh"), "{text}");
}

fn check_compose(file: &Path) -> (bool, String) {
    let mut command = tool("check-jsonschema");
    command
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(file);
    run(command)
}

/// The compose file as JSON (merge keys resolved).
fn compose_json(file: &Path) -> Value {
    let mut command = tool("python");
    command
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(file);
    let (ok, text) = run(command);
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_compose_file_matches_the_compose_spec() {
    let file = repo_root().join("deploy/compose/compose.yaml");
    let (ok, text) = check_compose(&file);
    assert!(ok, "{text}");

    let compose = compose_json(&file);
    let services = compose["services"].as_object().unwrap();
    for name in [
        "redis",
        "rabbitmq",
        "postgres",
        "migrate",
        "ingress",
        "worker",
        "scheduler",
        "bank-sim",
    ] {
        assert!(services.contains_key(name), "no service {name}");
    }
    for name in [
        "redis",
        "rabbitmq",
        "postgres",
        "ingress",
        "worker",
        "scheduler",
        "bank-sim",
    ] {
        assert!(
            services[name]["healthcheck"]["test"].is_array(),
            "{name} has no healthcheck"
        );
    }
    assert_eq!(
        services["ingress"]["depends_on"]["migrate"]["condition"],
        "service_completed_successfully"
    );
    assert_eq!(
        services["worker"]["depends_on"]["rabbitmq"]["condition"],
        "service_healthy"
    );
    // `--scale worker=N` needs a worker without fixed host ports or container name.
    let worker = &services["worker"];
    assert!(worker["ports"].is_null() && worker["container_name"].is_null());
    assert_eq!(worker["command"][0], "worker");
    assert_eq!(
        worker["environment"]["REFRESHD__WORKER__METRICS_BIND"],
        "0.0.0.0:9102"
    );
}

#[test]
fn a_broken_compose_file_fails_the_schema() {
    let scratch = Scratch::new();
    let file = scratch.path("compose.yaml");
    std::fs::copy(repo_root().join("deploy/compose/compose.yaml"), &file).unwrap();
    break_file(
        &file,
        "condition: service_completed_successfully",
        "condition: service_finished",
    );
    let (ok, text) = check_compose(&file);
    assert!(!ok, "a bad depends_on condition passed: {text}");
    assert!(text.contains("service_finished"), "{text}");
}

/// Every metric name the dashboard and the alerts use: `refreshd_*` ones must be
/// registered by the code; the others come from the named exporters.
#[test]
fn the_dashboard_and_alerts_use_metrics_that_exist() {
    let registered = registered_metrics();
    assert!(registered.len() >= 10, "{registered:?}");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/observability/grafana-dashboard.json"))
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10);
    // The rules without their comments (which describe the sources, `refreshd_*`).
    let alerts: String =
        std::fs::read_to_string(repo_root().join("deploy/observability/alerts.yaml"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
    let mut used = Vec::new();
    for text in exprs.iter().map(String::as_str).chain([alerts.as_str()]) {
        used.extend(metric_names(text));
    }
    let mut seen_refreshd = 0;
    for name in &used {
        if let Some(base) = name.strip_prefix("refreshd_") {
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| base.strip_suffix(s))
                .unwrap_or(base);
            assert!(
                registered.iter().any(|r| r == base),
                "{name} is not a metric refreshd registers ({registered:?})"
            );
            seen_refreshd += 1;
        } else {
            assert!(
                name.starts_with("rabbitmq_queue_")
                    || name.starts_with("kube_pod_")
                    || name == "up",
                "{name}: not a refreshd metric nor one of the documented exporters"
            );
        }
    }
    assert!(seen_refreshd > 10);
    // Every registered metric is on the dashboard.
    let dashboard_text = exprs.join("\n");
    for name in &registered {
        assert!(
            dashboard_text.contains(&format!("refreshd_{name}")),
            "refreshd_{name} is not on the dashboard"
        );
    }
}

/// `registry.register("name", …)` calls in the crates' sources.
fn registered_metrics() -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![repo_root().join("crates")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split(".register(").skip(1) {
                    let piece = piece.trim_start();
                    if let Some(rest) = piece.strip_prefix('"')
                        && let Some(end) = rest.find('"')
                    {
                        names.push(rest[..end].to_owned());
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Identifiers in a PromQL text that look like metric names (followed by `{`, `[` or a
/// space/paren, not a label or function).
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_')
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if !starts {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        let word = &text[start..i];
        let metric_like = word.starts_with("refreshd_")
            || word.starts_with("rabbitmq_")
            || word.starts_with("kube_")
            || (word == "up" && bytes.get(i) == Some(&b'{'));
        if metric_like {
            out.push(word.to_owned());
        }
    }
    out
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_what_it_should() {
    let file = repo_root().join("deploy/docker/Dockerfile");
    let mut command = tool("hadolint");
    command.arg(&file);
    let (ok, text) = run(command);
    assert!(ok, "{text}");

    let dockerfile = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("COPY Cargo.toml Cargo.lock"))
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric uid");
    assert!(uid > 0, "non-root");
    assert!(lines.iter().any(|l| l.starts_with("HEALTHCHECK ")));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/refreshd\"]"));

    // What the build stage copies exists, so the build context is complete.
    for line in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(repo_root().join(source).exists(), "{line}: no {source}");
        }
    }
    // The Rust image is at least the workspace's rust-version.
    let manifest: toml::Table = std::fs::read_to_string(repo_root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let wanted = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    let image = lines
        .iter()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust: build stage");
    let version = |v: &str| -> Vec<u32> {
        v.split(['.', '-'])
            .take(2)
            .map(|p| p.parse().unwrap())
            .collect()
    };
    assert!(version(image) >= version(wanted), "{image} < {wanted}");
    // `--locked` fails the image build when Cargo.lock is stale: so must this.
    let (ok, text) = run({
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // The host's dependency graph: what the image builds, from the local cache.
        c.args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "refreshd",
            "--depth",
            "0",
        ])
        .current_dir(repo_root());
        c
    });
    assert!(ok, "Cargo.lock is not up to date: {text}");
}

#[test]
fn a_broken_dockerfile_fails_hadolint() {
    let scratch = Scratch::new();
    let file = scratch.path("Dockerfile");
    std::fs::copy(repo_root().join("deploy/docker/Dockerfile"), &file).unwrap();
    break_file(&file, "USER 10001:10001", "USER root");
    let mut command = tool("hadolint");
    command.arg(&file);
    let (ok, text) = run(command);
    assert!(!ok, "a root USER passed: {text}");
    assert!(text.contains("DL3002"), "{text}");
}

/// The image's HEALTHCHECK script against a server answering `status`.
fn healthcheck_against(status: &'static str) -> bool {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // The whole request, as a real server reads it: closing with unread bytes would
        // reset the connection before the client reads the status line.
        let mut request = Vec::new();
        let mut buf = [0u8; 512];
        while !request.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").unwrap();
        request
    });
    let status = Command::new(repo_root().join("deploy/docker/healthcheck.sh"))
        .env("REFRESHD_HEALTH_URL", format!("http://{addr}/healthz"))
        .status()
        .unwrap();
    let request = server.join().unwrap();
    assert!(
        request.starts_with("GET /healthz HTTP/1.0\r\n"),
        "{request}"
    );
    status.success()
}

#[test]
fn the_image_healthcheck_follows_the_status() {
    assert!(healthcheck_against("200 OK"));
    assert!(!healthcheck_against("503 Service Unavailable"));
}

#[test]
fn dev_outside_the_repository_names_the_missing_dev_file() {
    let scratch = Scratch::new();
    let mut command = Command::new(refresh_tests::refreshd_binary());
    command.arg("dev").current_dir(&scratch.0);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFRESHD") {
            command.env_remove(key);
        }
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "refreshd: bad configuration: config/dev.toml not found: the dev environment reads \
         its settings from it; run from the repository's root or set REFRESHD_CONFIG_DIR to \
         its config folder"
    );
}

/// `deploy/local/run.sh` with the API on `api`, a free simulator port, and no other
/// REFRESHD variables; its exit success and output.
fn run_sh_with_api_on(api: std::net::SocketAddr) -> (bool, String) {
    let sim = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sim_addr = sim.local_addr().unwrap();
    drop(sim);
    // Bounded: a regression that goes on to build and start must not hang the suite.
    let mut command = Command::new("timeout");
    command
        .arg("120")
        .arg(repo_root().join("deploy/local/run.sh"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFRESHD") {
            command.env_remove(key);
        }
    }
    command
        .env("REFRESHD__HTTP__BIND", api.to_string())
        .env("REFRESHD__BANK_SIM__BIND", sim_addr.to_string());
    run(command)
}

#[test]
fn make_run_refuses_busy_ports_before_building() {
    // A port held by some other program.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let (ok, text) = run_sh_with_api_on(addr);
    assert!(!ok);
    assert!(
        text.contains(&format!("run: {addr} is in use by another program")),
        "{text}"
    );
    assert!(
        !text.contains("building"),
        "it stopped before building: {text}"
    );
    drop(other);

    // A refreshd already answering there (another `make run`).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // The port probe connects and closes; the health probe asks /healthz.
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            if request.starts_with(b"GET /healthz ") {
                let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                return;
            }
        }
    });
    let (ok, text) = run_sh_with_api_on(addr);
    server.join().unwrap();
    assert!(!ok);
    assert!(
        text.contains(&format!(
            "run: a refreshd is already running on http://{addr}"
        )),
        "{text}"
    );
}

#[test]
fn an_ingress_with_a_short_hs256_secret_exits_64_naming_the_key() {
    let mut command = Command::new(refresh_tests::refreshd_binary());
    command.arg("ingress").current_dir(repo_root());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("REFRESHD") {
            command.env_remove(key);
        }
    }
    command
        .env("REFRESHD_ENV", "production")
        .env(
            "REFRESHD__AUTH__JWT_HS256_SECRET",
            "only-twenty-six-bytes-long",
        )
        .env(
            "REFRESHD__CRYPTO__KEY",
            "ZGV2LWtleS1ub3QtZm9yLXByb2R1Y3Rpb24tMzJieXQ=",
        );
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim_end(),
        "refreshd: bad configuration: auth.jwt_hs256_secret: must be at least 32 bytes"
    );
}
