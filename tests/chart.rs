//! charts/lockstep checked with Helm's own library (scripts/chart-check): lint and the values schema,
//! then real installs on the test kube-apiserver, asserting on what Helm rendered and on the objects
//! that appeared. Templates the 1.20 server cannot take (CRDs with CEL, monitoring.coreos.com) are
//! rendered by Helm into a ConfigMap through `tpl` (see `render_files`).

mod common;

use std::{collections::BTreeSet, path::Path, process::Command};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::ServiceAccount, rbac::v1::ClusterRole};
use kube::{Api, Client};
use serde_json::{json, Value};

const APP: &str = env!("CARGO_PKG_VERSION");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Run scripts/chart-check; its stdout, or what it printed when it failed.
fn try_chart_check(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(repo().join("scripts/chart-check"));
    let out = cmd.args(args).output().expect("run scripts/chart-check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    out.status
        .success()
        .then_some(stdout.clone())
        .ok_or(format!("chart-check {args:?} failed:\n{stdout}\n{stderr}"))
}

fn chart_check(args: &[&str]) -> String {
    try_chart_check(args).unwrap_or_else(|e| panic!("{e}"))
}

struct Release {
    ns: String,
    name: String,
    docs: Vec<Value>,
    notes: String,
    installed: bool,
}

/// A test that fails midway still removes its release (its ClusterRole outlives the namespace).
impl Drop for Release {
    fn drop(&mut self) {
        if self.installed {
            let _ = try_chart_check(&["uninstall", &self.ns, &self.name]);
        }
    }
}

impl Release {
    fn install(ns: &str, values: Value, chart: &Path) -> Release {
        let name = common::unique("ls");
        let out = try_chart_check(&["install", ns, &name, &values.to_string(), chart.to_str().unwrap()]).unwrap_or_else(|e| {
            // A failed install leaves what it created: take it away before failing.
            let _ = try_chart_check(&["uninstall", ns, &name]);
            panic!("{e}")
        });
        let r: Value = serde_json::from_str(&out).unwrap();
        let docs = serde_yaml::Deserializer::from_str(r["manifest"].as_str().unwrap())
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .filter(|d| !d.is_null())
            .collect();
        Release {
            ns: ns.into(),
            name,
            docs,
            notes: r["notes"].as_str().unwrap_or_default().into(),
            installed: true,
        }
    }

    fn uninstall(mut self) {
        self.installed = false;
        chart_check(&["uninstall", &self.ns, &self.name]);
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name_suffix: &str) -> &Value {
        let found: Vec<_> = self
            .all(kind)
            .into_iter()
            .filter(|d| d["metadata"]["name"].as_str().unwrap().ends_with(name_suffix))
            .collect();
        assert_eq!(found.len(), 1, "one {kind} named *{name_suffix} in {:#?}", self.docs);
        found[0]
    }

    fn fullname(&self) -> String {
        format!("{}-lockstep", self.name)
    }

    /// The chart's ServiceAccount, as RBAC bindings name it.
    fn subjects(&self) -> Value {
        json!([{"kind": "ServiceAccount", "name": self.fullname(), "namespace": self.ns}])
    }
}

/// RBAC rules as comparable lines: `group resource verbs [names]`, one per resource, sorted.
fn rules(role: &Value) -> BTreeSet<String> {
    let strs = |v: &Value| -> Vec<String> { serde_json::from_value(v.clone()).unwrap_or_default() };
    let mut out = BTreeSet::new();
    for r in role["rules"].as_array().unwrap() {
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                let names = strs(&r["resourceNames"]);
                let names = if names.is_empty() { String::new() } else { format!(" {names:?}") };
                out.insert(format!("{g}/{res} {}{names}", strs(&r["verbs"]).join(",")));
            }
        }
    }
    out
}

fn lines(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|l| l.to_string()).collect()
}

const CLUSTER_RULES: &[&str] = &[
    r#"apiextensions.k8s.io/customresourcedefinitions get ["outboxrelays.lockstep.dev", "inboxtables.lockstep.dev", "deduppolicies.lockstep.dev"]"#,
    "/namespaces get,list,watch",
    "lockstep.dev/deduppolicies get,list,watch,patch,update",
    "lockstep.dev/deduppolicies/status get,patch,update",
];
const NAMESPACED_RULES: &[&str] = &[
    "lockstep.dev/outboxrelays get,list,watch,patch,update",
    "lockstep.dev/inboxtables get,list,watch,patch,update",
    "lockstep.dev/outboxrelays/status get,patch,update",
    "lockstep.dev/inboxtables/status get,patch,update",
    "lockstep.dev/outboxrelays/finalizers update",
    "lockstep.dev/inboxtables/finalizers update",
    "/secrets get",
    "/events create,patch",
    "events.k8s.io/events create,patch",
    "apps/deployments get,list,watch,create,patch,delete",
    "policy/poddisruptionbudgets get,create,patch,delete",
];

#[test]
fn lint_is_clean_and_the_schema_rejects_bad_values() {
    let out = chart_check(&["lint"]);
    let expected = "lint default: ok\nlint all-on: ok\nlint watch-namespace: ok\nlint watch-namespaces: ok\n\
                    lint rejects replicaCount: x: ok\nlint rejects unknown key: ok\nlint rejects watchNamespaces: [Apps]: ok\n";
    assert_eq!(out, expected);
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart: Value = serde_yaml::from_str(&std::fs::read_to_string(repo().join("charts/lockstep/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["appVersion"], APP);
    assert_eq!(chart["apiVersion"], "v2");
}

/// The operator container's arguments must parse with the operator's own flags.
fn operator_args(args: &[String]) -> lockstep::config::OperatorArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[arg(long)]
        log_format: String,
        #[command(flatten)]
        args: lockstep::config::OperatorArgs,
    }
    assert_eq!(args[0], "operator");
    Cli::try_parse_from(std::iter::once("lockstep").chain(args[1..].iter().map(String::as_str)))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .args
}

fn check_operator_deployment(r: &Release) {
    let d = r.one("Deployment", &r.fullname());
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    // The Lease's namespace and the replica's identity, from the downward API.
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    assert_eq!(
        c["env"],
        json!([{"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}, {"name": "POD_NAME", "valueFrom": field("metadata.name")}])
    );
    let image = format!("ghcr.io/lockstep-dev/lockstep:{APP}");
    assert_eq!((&c["image"], &c["imagePullPolicy"]), (&json!(image), &json!("IfNotPresent")));
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
    let parsed = operator_args(&args);
    assert_eq!((parsed.relay_image.as_str(), parsed.leader_election), (image.as_str(), true));
    assert!(
        parsed.relay_image_prefixes.is_empty(),
        "by default the relay image's repository alone"
    );
    assert_eq!(parsed.metrics_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(c["ports"], json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]));
    let probes = (&c["livenessProbe"]["httpGet"], &c["readinessProbe"]["httpGet"]);
    assert_eq!(
        probes,
        (
            &json!({"path": "/healthz", "port": "metrics"}),
            &json!({"path": "/readyz", "port": "metrics"})
        )
    );
    assert!(c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string());
}

#[tokio::test]
async fn default_install_is_cluster_wide_and_least_privilege() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "chart").await;
    let r = Release::install(&ns.name, json!({"crds": {"create": false}}), &repo().join("charts/lockstep"));
    let all_rules: Vec<&str> = [CLUSTER_RULES, NAMESPACED_RULES].concat();
    assert_eq!(rules(r.one("ClusterRole", &r.fullname())), lines(&all_rules));
    let lease = r.one("Role", "-leader-election");
    assert_eq!(lease["metadata"]["namespace"], ns.name);
    let lease_rules = [
        "coordination.k8s.io/leases create",
        r#"coordination.k8s.io/leases get,update ["lockstep-operator"]"#,
    ];
    assert_eq!(rules(lease), lines(&lease_rules));
    assert_eq!(r.all("Role").len(), 1, "only the Lease Role without watchNamespace");
    let binding = r.one("ClusterRoleBinding", &r.fullname());
    assert_eq!(binding["subjects"], r.subjects());
    check_operator_deployment(&r);
    assert!(r.all("PodDisruptionBudget").is_empty() && r.all("CustomResourceDefinition").is_empty());
    assert!(r.notes.contains("kubectl get lockstep -A") && r.notes.contains("kubectl wait --for=condition=Ready outboxrelay/"));

    // The objects exist on the server, and go with the release.
    let name = r.fullname();
    assert!(exists(&Api::<ServiceAccount>::namespaced(client.clone(), &ns.name), &name).await);
    assert!(exists(&Api::<Deployment>::namespaced(client.clone(), &ns.name), &name).await);
    let roles = Api::<ClusterRole>::all(client.clone());
    assert!(exists(&roles, &name).await);
    r.uninstall();
    assert!(!exists(&roles, &name).await, "the ClusterRole outlived the release");
    ns.delete().await;
}

/// The release workflow packages the chart stamped by scripts/release-chart: installed as it ships,
/// the operator runs that version's image and hands the same one to every relay (never `latest`).
#[tokio::test]
async fn a_release_chart_pins_the_operator_and_relay_images() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "chart").await;
    let out_dir = std::env::temp_dir().join(common::unique("release-chart"));
    let out = Command::new(repo().join("scripts/release-chart"))
        .arg("9.8.7")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = Release::install(&ns.name, json!({"crds": {"create": false}}), &out_dir.join("lockstep"));
    let c = &r.one("Deployment", &r.fullname())["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "ghcr.io/lockstep-dev/lockstep:9.8.7");
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap();
    assert_eq!(operator_args(&args).relay_image, "ghcr.io/lockstep-dev/lockstep:9.8.7");
    r.uninstall();
    let _ = std::fs::remove_dir_all(&out_dir);
    ns.delete().await;
}

#[tokio::test]
async fn watched_namespaces_narrow_rbac_to_roles() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "chart").await;
    let apps = common::TestNamespace::new(&client, "chart-apps").await;
    let billing = common::TestNamespace::new(&client, "chart-billing").await;
    // watchNamespace (the older single value) joins watchNamespaces.
    let values = json!({"crds": {"create": false}, "watchNamespaces": [apps.name], "watchNamespace": billing.name,
                        "extraArgs": ["--relay-image-prefixes=registry.example/"], "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}]});
    let r = Release::install(&ns.name, values, &repo().join("charts/lockstep"));
    assert_eq!(rules(r.one("ClusterRole", &r.fullname())), lines(CLUSTER_RULES));
    let roles = r.all("Role");
    let mut role_namespaces: Vec<&str> = roles
        .iter()
        .filter(|role| role["metadata"]["name"] == r.fullname().as_str())
        .map(|role| {
            assert_eq!(rules(role), lines(NAMESPACED_RULES));
            role["metadata"]["namespace"].as_str().unwrap()
        })
        .collect();
    role_namespaces.sort();
    let mut watched = vec![apps.name.as_str(), billing.name.as_str()];
    watched.sort();
    assert_eq!(role_namespaces, watched);
    assert!(
        roles.iter().all(|role| role["metadata"]["namespace"] != "default"),
        "no Role for DedupPolicy Events: they have none"
    );
    for b in r.all("RoleBinding") {
        assert_eq!(b["subjects"], r.subjects());
    }
    let c = &r.one("Deployment", &r.fullname())["spec"]["template"]["spec"]["containers"][0];
    let parsed = operator_args(&serde_json::from_value::<Vec<String>>(c["args"].clone()).unwrap());
    let mut parsed_ns = parsed.watch_namespaces.clone();
    parsed_ns.sort();
    assert_eq!(parsed_ns, watched);
    assert_eq!(parsed.relay_image_prefixes, ["registry.example/"], "extraArgs reach the operator");
    assert!(c["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "RUST_BACKTRACE", "value": "1"})));
    assert!(r.notes.contains("watching namespaces"), "{}", r.notes);

    use k8s_openapi::api::rbac::v1::Role;
    for n in [&apps.name, &billing.name] {
        assert!(exists(&Api::<Role>::namespaced(client.clone(), n), &r.fullname()).await);
    }
    r.uninstall();
    ns.delete().await;
}

async fn exists<K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug>(api: &Api<K>, name: &str) -> bool {
    api.get_opt(name).await.unwrap().is_some()
}

async fn serves(client: &Client, group_version: &str) -> bool {
    client.list_api_group_resources(group_version).await.is_ok()
}

#[tokio::test]
async fn every_option_on_installs_on_the_server_it_finds() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "chart").await;
    let values = json!({
        "crds": {"create": false}, "replicaCount": 2, "networkPolicy": {"enabled": true},
        "metrics": {"serviceMonitor": {"enabled": true}, "podMonitor": {"enabled": true}, "prometheusRule": {"enabled": true}},
        "grafana": {"dashboard": {"enabled": true}}, "imagePullSecrets": [{"name": "registry"}],
        "relayImagePrefixes": ["registry.example/team/", "ghcr.io/lockstep-dev/lockstep"],
    });
    let r = Release::install(&ns.name, values, &repo().join("charts/lockstep"));
    let pdb = r.one("PodDisruptionBudget", &r.fullname());
    let policy = ["policy/v1beta1", "policy/v1"][serves(&client, "policy/v1").await as usize];
    assert_eq!((&pdb["apiVersion"], &pdb["spec"]["maxUnavailable"]), (&json!(policy), &json!(1)));
    let monitoring = serves(&client, "monitoring.coreos.com/v1").await;
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert_eq!(r.all(kind).len(), monitoring as usize, "{kind}; monitoring API: {monitoring}");
    }
    if !monitoring {
        assert!(r.notes.contains("does not\nserve monitoring.coreos.com/v1"), "{}", r.notes);
    }
    let np = r.one("NetworkPolicy", &r.fullname());
    assert_eq!(np["spec"]["ingress"][0]["ports"], json!([{"port": "metrics", "protocol": "TCP"}]));
    let dash = r.one("ConfigMap", "-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let board: Value = serde_json::from_str(dash["data"]["lockstep.json"].as_str().unwrap()).unwrap();
    assert_real_metrics(&board.to_string(), 15);
    let pod = &r.one("Deployment", &r.fullname())["spec"]["template"]["spec"];
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "registry"}]));
    let args: Vec<String> = serde_json::from_value(pod["containers"][0]["args"].clone()).unwrap();
    assert_eq!(
        operator_args(&args).relay_image_prefixes,
        ["registry.example/team/", "ghcr.io/lockstep-dev/lockstep"],
        "relayImagePrefixes reaches --relay-image-prefixes"
    );
    r.uninstall();
    ns.delete().await;
}

/// Every `lockstep_*` series named in `text` is one the operator or the relay exposes.
fn assert_real_metrics(text: &str, at_least: usize) {
    use lockstep::operator::metrics::{ControllerLabel, FailureLabel};
    // Families render only once they have a series.
    let (op, relay) = (
        lockstep::operator::metrics::Metrics::default(),
        lockstep::relay::RelayMetrics::default(),
    );
    let c = ControllerLabel { controller: "c" };
    op.reconciles.get_or_create(&c).inc();
    op.reconcile_duration.get_or_create(&c).observe(0.1);
    let reason = "r".to_string();
    let failure = FailureLabel {
        controller: "c",
        reason: reason.clone(),
    };
    op.failures.get_or_create(&failure).inc();
    relay.failures.get_or_create(&lockstep::relay::ReasonLabel { reason }).inc();
    let purge = lockstep::operator::metrics::PurgeLabel {
        namespace: "n".into(),
        inboxtable: "i".into(),
        table: "t".into(),
    };
    op.purged_rows.get_or_create(&purge).inc();
    op.purge_failures.get_or_create(&purge).inc();
    op.purge_duration.get_or_create(&purge).observe(0.1);
    // The inbox library's series, in a consumer's own registry.
    let mut registry = prometheus_client::registry::Registry::default();
    let inbox = lockstep::inbox::InboxMetrics::register(&mut registry);
    inbox
        .claims
        .get_or_create(&lockstep::inbox::metrics::ClaimLabels {
            consumer: "c".into(),
            result: "new",
        })
        .inc();
    let failed = lockstep::inbox::metrics::FailureLabels {
        consumer: "c".into(),
        reason: "effect",
    };
    inbox.failures.get_or_create(&failed).inc();
    let latency = lockstep::inbox::metrics::LatencyLabels {
        consumer: "c".into(),
        r#type: "t".into(),
    };
    inbox.end_to_end.get_or_create(&latency).observe(0.1);
    let mut consumer = String::new();
    prometheus_client::encoding::text::encode(&mut consumer, &registry).unwrap();
    let text_of = [op.render(), relay.render(), consumer].join("\n");
    let samples = text_of.lines().filter(|l| !l.starts_with('#'));
    let exposed: BTreeSet<&str> = samples.map(|l| l.split(['{', ' ']).next().unwrap()).collect();
    let series = regex::Regex::new(r"\blockstep_[a-z_]+").unwrap();
    let used: BTreeSet<&str> = series.find_iter(text).map(|m| m.as_str()).collect();
    assert!(used.len() >= at_least, "{used:?}");
    let unknown: Vec<_> = used.difference(&exposed).collect();
    assert!(unknown.is_empty(), "series nobody exposes: {unknown:?} (exposed: {exposed:?})");
}

const RENDER: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered
data:
{{- range $path, $_ := .Files.Glob "files/*" }}
  {{ base $path }}: {{ tpl ($.Files.Get $path) $ | quote }}
{{- end }}
"#;

/// Have Helm render chart templates against the real server's capabilities without creating what
/// they describe: a copy of the chart (helpers and values) whose one template is a ConfigMap holding
/// `tpl` of each file. Returns the ConfigMap's data.
fn render_files(ns: &str, files: &[(String, String)], values: Value) -> serde_json::Map<String, Value> {
    let dir = std::env::temp_dir().join(common::unique("chart-render")).join("lockstep");
    let chart = repo().join("charts/lockstep");
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::create_dir_all(dir.join("files")).unwrap();
    for f in ["Chart.yaml", "values.yaml", "templates/_helpers.tpl"] {
        std::fs::copy(chart.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("templates/render.yaml"), RENDER).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join("files").join(name), text).unwrap();
    }
    let r = Release::install(ns, values, &dir);
    let data = r.one("ConfigMap", "rendered")["data"].as_object().unwrap().clone();
    r.uninstall();
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    data
}

#[tokio::test]
async fn crd_and_monitoring_templates_render_with_helm() {
    let client = common::kube_client().await;
    let ns = common::TestNamespace::new(&client, "chart").await;
    let crd_dir = repo().join(lockstep::crd::crdgen::HELM_DIR);
    let mut files: Vec<(String, String)> = lockstep::crd::crdgen::all()
        .iter()
        .map(lockstep::crd::crdgen::file_name)
        .map(|n| (n.clone(), std::fs::read_to_string(crd_dir.join(&n)).unwrap()))
        .collect();
    // The 1.20 server does not serve monitoring.coreos.com/v1: only that gate is lifted.
    for t in ["servicemonitor.yaml", "podmonitor.yaml", "prometheusrule.yaml"] {
        let text = std::fs::read_to_string(repo().join("charts/lockstep/templates").join(t)).unwrap();
        let lifted = text.replacen(r#"(include "lockstep.monitoringApi" .)"#, "true", 1);
        assert_ne!(lifted, text, "{t} is not gated on the monitoring API");
        files.push((t.to_owned(), lifted));
    }
    let on = json!({"enabled": true});
    let values = json!({"metrics": {"serviceMonitor": on, "podMonitor": on, "prometheusRule": on}});
    let data = render_files(&ns.name, &files, values);
    // Without the ServiceMonitor nobody scrapes the operator: its down alert would fire forever.
    let rule_only = json!({"metrics": {"podMonitor": on, "prometheusRule": on}});
    let alone = render_files(&ns.name, &files, rule_only);
    let rule: Value = serde_yaml::from_str(alone["prometheusrule.yaml"].as_str().unwrap()).unwrap();
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert!(
        !alerts.contains(&"LockstepOperatorDown") && alerts.contains(&"LockstepRelayNotActive"),
        "{alerts:?}"
    );
    ns.delete().await;

    let v = client.apiserver_version().await.unwrap();
    let cel = lockstep::crd::crdgen::server_supports_cel(&v.major, &v.minor);
    for crd in lockstep::crd::crdgen::all() {
        let name = lockstep::crd::crdgen::file_name(&crd);
        let mut kept = crd.clone();
        kept.metadata.annotations = Some([("helm.sh/resource-policy".to_string(), "keep".to_string())].into());
        let expected = serde_yaml::to_string(&if cel { kept } else { lockstep::crd::crdgen::strip_cel(&kept) }).unwrap();
        let rendered = data[&name].as_str().unwrap();
        let (header, body) = rendered.trim_start().split_once('\n').unwrap();
        assert!(header.starts_with("# Generated"), "{header}");
        assert!(
            body == expected,
            "{name} as Helm renders it for {}.{} (CEL: {cel}):\n{body}",
            v.major,
            v.minor
        );
    }
    check_monitoring(&data);
}

fn check_monitoring(data: &serde_json::Map<String, Value>) {
    let parse = |k: &str| -> Value { serde_yaml::from_str(data[k].as_str().unwrap()).unwrap() };
    let sm = parse("servicemonitor.yaml");
    assert_eq!(sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"], "operator");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let pm = parse("podmonitor.yaml");
    let relay = json!({"app.kubernetes.io/name": "lockstep", "app.kubernetes.io/component": "relay"});
    assert_eq!(
        (&pm["spec"]["selector"]["matchLabels"], &pm["spec"]["namespaceSelector"]),
        (&relay, &json!({"any": true}))
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let rule = parse("prometheusrule.yaml");
    let groups = rule["spec"]["groups"].as_array().unwrap();
    let alerts: Vec<&Value> = groups.iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let names: BTreeSet<&str> = alerts.iter().map(|a| a["alert"].as_str().unwrap()).collect();
    let expected = "LockstepOperatorDown LockstepReconcileFailures LockstepRelayNotActive LockstepRelayLagHigh \
                    LockstepRelayBrokerFailing LockstepDeadLetteredEvents LockstepBlockingTransaction LockstepInboxPurgeFailing";
    assert_eq!(names, expected.split_whitespace().collect());
    let troubleshooting = std::fs::read_to_string(repo().join("docs/troubleshooting.md")).unwrap();
    for a in &alerts {
        for k in ["summary", "description", "runbook"] {
            assert!(a["annotations"][k].as_str().is_some_and(|s| s.len() > 10), "{}: {k}", a["alert"]);
        }
        assert!(a["labels"]["severity"].is_string());
        // runbook_url: the alert's entry in this version's troubleshooting page, which has it.
        let name = a["alert"].as_str().unwrap();
        let url = format!(
            "https://github.com/lockstep-dev/lockstep/blob/v{APP}/docs/troubleshooting.md#{}",
            name.to_lowercase()
        );
        assert_eq!(a["annotations"]["runbook_url"], url.as_str());
        assert!(
            troubleshooting.contains(&format!("\n### {name}\n")),
            "docs/troubleshooting.md has no entry for {name}"
        );
    }
    let lag = alerts.iter().find(|a| a["alert"] == "LockstepRelayLagHigh").unwrap();
    assert!(lag["expr"].as_str().unwrap().ends_with("> 300"), "{}", lag["expr"]);
    let exprs: Vec<&str> = alerts.iter().map(|a| a["expr"].as_str().unwrap()).collect();
    assert_real_metrics(&exprs.join("\n"), 8);
}
