//! The deployment artifacts (`Dockerfile`, `deploy/kubernetes`,
//! `deploy/systemd`) checked for what can be checked without a cluster or
//! a Docker daemon: the manifests are real Kubernetes objects whose ports,
//! probes, users and flags agree with each other and with veer's own
//! configuration (parsed by veer itself); the Dockerfile is well formed and
//! its images run the binary the build stage produces, as 5995:5995; the
//! systemd unit passes `systemd-analyze verify`.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn loud_skip(what: &str) {
    // Straight to stderr, past the test harness's capture.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {what} ***\n");
}

/// A temporary folder, removed on drop.
struct Tmp(PathBuf);
impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("veer-deploy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Validates a shipped veer configuration with veer's own parser, after
/// pointing its `[tls]` files at certificates made for the identity it
/// declares. Returns the loaded configuration.
fn validate_veer_config(text: &str, tag: &str) -> (veer_core::config::Loaded, Tmp) {
    let v: toml::Value = toml::from_str(text).expect("veer.toml is TOML");
    let svc = &v["service"];
    let td = svc["trust_domain"].as_str().unwrap();
    let dc = svc["datacenter"].as_str().unwrap();
    let name = svc["name"].as_str().unwrap();
    let tmp = Tmp::new(tag);
    let ca = veer_ca::Ca::new_root(td).unwrap();
    let leaf = ca.service_leaf(dc, name).unwrap();
    let files = [
        ("ca_file", ca.cert_pem.clone()),
        ("cert_file", leaf.chain_pem),
        ("key_file", leaf.key_pem),
    ];
    let mut text = text.to_string();
    for (key, pem) in files {
        let orig = v["tls"][key].as_str().unwrap();
        assert!(orig.starts_with("/etc/veer/"), "{key} = {orig}");
        let local = tmp.0.join(key);
        std::fs::write(&local, pem).unwrap();
        text = text.replace(&format!("\"{orig}\""), &format!("\"{}\"", local.display()));
    }
    let path = tmp.0.join("veer.toml");
    let loaded = veer_core::config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    (loaded, tmp)
}

/// The values of a Go-style flag (`-name=v` or `-name v`) in `args`.
fn flag(args: &[String], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let bare = a.trim_start_matches('-');
        if bare == name {
            out.push(it.next().cloned().unwrap_or_default());
        } else if let Some(v) = bare.strip_prefix(&format!("{name}=")) {
            out.push(v.to_string());
        }
    }
    out
}

// ---------------------------------------------------------------- Kubernetes

/// Every document of every manifest, as JSON.
fn manifests() -> Vec<(String, serde_json::Value)> {
    let dir = repo().join("deploy/kubernetes/static");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let y = serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if y.is_null() {
                continue;
            }
            docs.push((
                f.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::to_value(y).unwrap(),
            ));
        }
    }
    docs
}

/// Parses `v` as `T` and checks nothing was dropped on the way: a field
/// Kubernetes does not know (a typo, a wrong level) fails here as it would
/// fail `kubectl apply --validate=strict`.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    file: &str,
    v: &serde_json::Value,
) -> T {
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", v["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    if back != *v {
        panic!(
            "{file}: {} {} has fields Kubernetes does not know (or wrong types):\n{}",
            v["kind"],
            v["metadata"]["name"],
            diff(v, &back, "")
        );
    }
    t
}

fn diff(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> String {
    use serde_json::Value::{Array, Object};
    match (a, b) {
        (Object(x), Object(y)) => x
            .iter()
            .map(|(k, v)| match y.get(k) {
                None => format!("{at}.{k}: dropped\n"),
                Some(w) => diff(v, w, &format!("{at}.{k}")),
            })
            .collect(),
        (Array(x), Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .map(|(i, (v, w))| diff(v, w, &format!("{at}[{i}]")))
            .collect(),
        _ if a == b => String::new(),
        _ => format!("{at}: {a} became {b}\n"),
    }
}

struct K8s {
    config: ConfigMap,
    service: Service,
    deployment: Deployment,
}

fn k8s() -> K8s {
    let mut config = None;
    let mut service = None;
    let mut deployment = None;
    for (file, v) in manifests() {
        match v["kind"].as_str() {
            Some("ConfigMap") => config = Some(typed::<ConfigMap>(&file, &v)),
            Some("Service") => service = Some(typed::<Service>(&file, &v)),
            Some("Deployment") => deployment = Some(typed::<Deployment>(&file, &v)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    K8s {
        config: config.expect("a ConfigMap"),
        service: service.expect("a Service"),
        deployment: deployment.expect("a Deployment"),
    }
}

fn port_of(p: &IntOrString) -> u16 {
    match p {
        IntOrString::Int(i) => *i as u16,
        IntOrString::String(s) => panic!("named port {s}: use numbers in these manifests"),
    }
}

/// (path, port) of an httpGet probe.
fn http_probe(p: Option<&k8s_openapi::api::core::v1::Probe>) -> Option<(String, u16)> {
    let g = p?.http_get.as_ref()?;
    Some((g.path.clone().unwrap_or_default(), port_of(&g.port)))
}

#[test]
fn kubernetes_manifests_are_real_objects_that_agree() {
    let k = k8s();
    let spec = k.deployment.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let inits = pod.init_containers.as_ref().expect("init containers");
    assert_eq!(inits.len(), 2, "redirect-traffic, then the veer sidecar");
    let (redirect, sidecar) = (&inits[0], &inits[1]);
    assert_eq!(pod.containers.len(), 1);
    let app: &Container = &pod.containers[0];

    // The veer configuration in the ConfigMap is valid for veer.
    let toml_text = k.config.data.as_ref().unwrap()["veer.toml"].clone();
    let (loaded, _tmp) = validate_veer_config(&toml_text, "k8s");
    let cfg = &loaded.spec;

    // redirect-traffic: root with NET_ADMIN and nothing else.
    let rargs = redirect.args.clone().unwrap_or_default();
    assert_eq!(rargs[0], "redirect-traffic");
    let sc = redirect.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.run_as_non_root, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(redirect.restart_policy, None, "a plain init container");
    assert_eq!(flag(&rargs, "proxy-uid"), ["5995"]);
    assert_eq!(
        flag(&rargs, "proxy-inbound-port"),
        [cfg.listen.inbound.port().to_string()]
    );
    assert_eq!(
        flag(&rargs, "proxy-outbound-port"),
        [cfg.listen.outbound[0].port().to_string()]
    );
    let excluded: Vec<u16> = flag(&rargs, "exclude-inbound-port")
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();

    // The sidecar: native, as 5995, probed on /ready of the Prometheus
    // listener, which is excluded from redirection.
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(5995), Some(5995)));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    let prom = loaded.admin.prometheus_bind.expect("prometheus_bind");
    assert!(prom.ip().is_unspecified(), "kubelet probes the pod IP");
    assert!(excluded.contains(&prom.port()), "metrics port redirected");
    for p in [&sidecar.startup_probe, &sidecar.readiness_probe] {
        assert_eq!(
            http_probe(p.as_ref()),
            Some(("/ready".to_string(), prom.port()))
        );
    }
    let (live_path, live_port) = http_probe(sidecar.liveness_probe.as_ref()).unwrap();
    assert_ne!(live_path, "/ready", "liveness must not fail while draining");
    assert_eq!(live_port, prom.port());
    let sargs = sidecar.args.clone().unwrap();
    assert_eq!(sargs[0], "run");
    let config_path = &flag(&sargs, "config")[0];
    let mounted = sidecar
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| Path::new(config_path).parent() == Some(Path::new(&m.mount_path)));
    assert!(mounted, "{config_path} is not in a mounted volume");
    let grace: u64 = veer_core::duration::parse(&flag(&sargs, "shutdown-grace-period")[0])
        .unwrap()
        .as_secs();
    assert!(
        pod.termination_grace_period_seconds.unwrap() as u64 > grace,
        "the pod must outlive veer's grace period"
    );

    // The app: not the proxy UID; its HTTP probes go to expose paths that
    // forward to its own port, on excluded ports.
    let app_port = app.ports.as_ref().unwrap()[0].container_port as u16;
    assert_eq!(cfg.local_app.port(), app_port);
    assert_ne!(
        app.security_context.as_ref().and_then(|s| s.run_as_user),
        Some(5995),
        "consul-k8s refuses apps running as the proxy UID"
    );
    let mut probed = 0;
    for p in [
        &app.readiness_probe,
        &app.liveness_probe,
        &app.startup_probe,
    ] {
        let Some((path, port)) = http_probe(p.as_ref()) else {
            continue;
        };
        probed += 1;
        let e = cfg
            .expose
            .iter()
            .find(|e| e.listener.port() == port && e.path == path)
            .unwrap_or_else(|| panic!("probe {path} on {port} has no expose path"));
        assert_eq!(e.local_path_port, app_port);
        assert!(e.listener.ip().is_unspecified());
        assert!(excluded.contains(&port), "probe port {port} is redirected");
    }
    assert!(probed >= 2);
    assert!(
        app.lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .is_some(),
        "the app gets a preStop so endpoints drop it before it stops"
    );

    // The Service sends to the app's port (redirected to 20000 in the pod).
    let sp = &k.service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(sp.target_port.as_ref().map(port_of), Some(app_port));
    let selector = k.service.spec.as_ref().unwrap().selector.clone().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));

    // The images are the Dockerfile's two targets.
    assert!(redirect.image.as_deref().unwrap().starts_with("veer-init:"));
    assert!(sidecar.image.as_deref().unwrap().starts_with("veer:"));
}

#[test]
fn strict_parsing_catches_a_misplaced_field() {
    let (file, mut v) = manifests()
        .into_iter()
        .find(|(_, v)| v["kind"] == "Deployment")
        .unwrap();
    v["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] =
        v["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].clone();
    let r = std::panic::catch_unwind(|| typed::<Deployment>(&file, &v));
    assert!(r.is_err(), "a misspelt field must not pass");
}

/// The documents of one YAML file, as JSON.
fn yaml_docs(rel: &str) -> Vec<serde_json::Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|y| !y.is_null())
        .map(|y| serde_json::to_value(y).unwrap())
        .collect()
}

/// `kubernetes-validate` (PyPI; `.ci/install-deps` puts it in
/// /opt/veer-tools/bin): the API server's OpenAPI schemas, strict.
fn kubernetes_validate() -> Option<PathBuf> {
    veer_testsupport_tool("kubernetes-validate").or_else(|| {
        let p = PathBuf::from("/opt/veer-tools/bin/kubernetes-validate");
        p.exists().then_some(p)
    })
}

/// Runs `kubernetes-validate --strict` for Kubernetes 1.29 (the oldest
/// with native sidecars) and 1.33 on `file`: Ok, or its complaint.
fn validate_strict(tool: &Path, file: &Path) -> Result<(), String> {
    for k in ["1.29", "1.33"] {
        let out = Command::new(tool)
            .args(["-k", k, "--strict", "--quiet"])
            .arg(file)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// The injected pod fixture (consul-k8s 1.9.11's webhook output, image
/// swapped; served for real in tests/k8s_injected.rs) is a Pod the API
/// server would store: k8s-openapi's types with nothing dropped, and the
/// API's own schema in strict mode when `kubernetes-validate` is installed.
#[test]
fn injected_pod_fixture_is_a_strict_kubernetes_pod() {
    let rel = "deploy/kubernetes/testdata/injected-pod.yaml";
    let docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1);
    let pod: Pod = typed(rel, &docs[0]);
    let spec = pod.spec.as_ref().unwrap();
    let dp = &spec.containers[0];
    assert_eq!(
        dp.name, "consul-dataplane",
        "prepended (proxy lifecycle on)"
    );
    assert!(dp.command.is_none(), "consul-k8s sets args only");
    assert!(dp
        .image
        .as_deref()
        .unwrap()
        .starts_with("veer-consul-dataplane:"));
    let sc = dp.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_user, sc.run_as_group), (Some(5995), Some(5995)));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // No app container runs as the proxy UID (consul-k8s refuses those).
    for c in &spec.containers[1..] {
        assert_ne!(
            c.security_context.as_ref().and_then(|s| s.run_as_user),
            Some(5995)
        );
    }

    let Some(tool) = kubernetes_validate() else {
        loud_skip(
            "kubernetes-validate: not installed (run .ci/install-deps); k8s-openapi checks ran",
        );
        return;
    };
    validate_strict(&tool, &repo().join(rel)).unwrap_or_else(|e| panic!("{e}"));
    // The static example too (native sidecars: Kubernetes >= 1.29).
    validate_strict(&tool, &repo().join("deploy/kubernetes/static/web.yaml"))
        .unwrap_or_else(|e| panic!("static/web.yaml: {e}"));
    // And it does reject a misplaced field.
    let tmp = Tmp::new("pod");
    let bad = tmp.0.join("bad.yaml");
    std::fs::write(&bad, read(rel).replace("readinessProbe:", "readinesProbe:")).unwrap();
    let e = validate_strict(&tool, &bad).expect_err("a misspelt field must not pass");
    assert!(e.contains("readinesProbe"), "{e}");
}

/// The Helm post-renderer changes the injector's `-consul-dataplane-image`
/// and nothing else (gateways keep HashiCorp's image), and refuses input
/// where it cannot find that flag exactly once instead of passing it
/// through unchanged.
#[test]
fn helm_post_renderer_swaps_only_the_injectors_dataplane_image() {
    let script = repo().join("deploy/kubernetes/helm/veer-dataplane-image.sh");
    let input_rel = "deploy/kubernetes/testdata/consul-1.9.11-rendered-excerpt.yaml";
    let input = read(input_rel);
    let image = "registry.example.com/veer-consul-dataplane:0.1.0";
    let run = |args: &[&str], env: Option<&str>, stdin: &str| {
        use std::io::Write;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg(&script).args(args);
        cmd.env_remove("VEER_DATAPLANE_IMAGE");
        if let Some(v) = env {
            cmd.env("VEER_DATAPLANE_IMAGE", v);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A renderer that refuses its input may exit before reading all of
        // it: a broken pipe here is that refusal, judged by the exit
        // status and stderr below.
        match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.unwrap(),
        }
        child.wait_with_output().unwrap()
    };

    let out = run(&[image], None, &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    // The environment variable form gives the same.
    let out2 = run(&[], Some(image), &input);
    assert_eq!(String::from_utf8(out2.stdout).unwrap(), rendered);

    let before: Vec<serde_json::Value> = yaml_docs(input_rel);
    let tmp = Tmp::new("postrender");
    let out_file = tmp.0.join("rendered.yaml");
    std::fs::write(&out_file, &rendered).unwrap();
    let after: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(before.len(), after.len());
    let script_of = |v: &serde_json::Value| {
        v["spec"]["template"]["spec"]["containers"][0]["command"][2]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (b, a) in before.iter().zip(&after) {
        let _: Deployment = typed(input_rel, a);
        if b["metadata"]["name"] == "consul-connect-injector" {
            let (sb, sa) = (script_of(b), script_of(a));
            assert!(
                sa.contains(&format!("-consul-dataplane-image=\"{image}\" \\\n")),
                "{sa}"
            );
            assert_eq!(
                sa.replace(image, "hashicorp/consul-dataplane:1.9.11"),
                sb,
                "only the image changed"
            );
            let mut b2 = b.clone();
            b2["spec"]["template"]["spec"]["containers"][0]["command"][2] = sa.into();
            assert_eq!(&b2, a, "nothing else in the injector changed");
        } else {
            assert_eq!(b, a, "{} must not change", b["metadata"]["name"]);
            assert!(a.to_string().contains("hashicorp/consul-dataplane:1.9.11"));
        }
    }
    if let Some(tool) = kubernetes_validate() {
        validate_strict(&tool, &out_file).unwrap_or_else(|e| panic!("{e}"));
    }

    // Refusals: no flag (not the consul-k8s 1.x chart, or connectInject
    // off), the flag twice, no image, a bad image. Nothing on stdout.
    let gateway_only = input
        .split("\n---\n")
        .filter(|d| !d.contains("consul-connect-injector"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let twice = format!("{input}\n---\n{input}");
    for (args, stdin, code, why) in [
        (&[image][..], gateway_only.as_str(), 1, "found it 0 times"),
        (&[image][..], twice.as_str(), 1, "found it 2 times"),
        (&[][..], input.as_str(), 2, "give the image"),
        (&["a|b"][..], input.as_str(), 2, "not an image reference"),
    ] {
        let out = run(args, None, stdin);
        assert_eq!(out.status.code(), Some(code), "{why}");
        assert!(out.stdout.is_empty(), "{why}: wrote output");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{why}");
    }

    // The Helm 4 plugin runs this very script.
    let plugin: serde_json::Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(&read("deploy/kubernetes/helm/plugin.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(plugin["type"], "postrenderer/v1");
    assert_eq!(
        plugin["runtimeConfig"]["platformCommand"][0]["command"],
        "${HELM_PLUGIN_DIR}/veer-dataplane-image.sh"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&script).unwrap().permissions().mode();
    assert!(mode & 0o111 != 0, "the script must be executable for Helm");
}

// ---------------------------------------------------------------- Dockerfile

#[derive(Debug, Clone)]
struct Instr {
    line: usize,
    op: String,
    args: String,
}

const OPS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

/// Splits a Dockerfile into instructions: comments and blank lines
/// dropped, `\` continuations joined; the instruction must be known and
/// upper-case.
fn parse_dockerfile(text: &str) -> Result<Vec<Instr>, String> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_none()) {
            continue;
        }
        let (start, mut acc) = cur.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = t.strip_suffix('\\') {
            acc.push_str(body);
            acc.push(' ');
            cur = Some((start, acc));
            continue;
        }
        acc.push_str(t);
        let (op, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
        if !OPS.contains(&op) {
            return Err(format!(
                "line {start}: unknown or not upper-case instruction {op:?}"
            ));
        }
        out.push(Instr {
            line: start,
            op: op.to_string(),
            args: args.trim().to_string(),
        });
    }
    if cur.is_some() {
        return Err("the file ends inside a continued line".into());
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct Stage {
    name: String,
    base: String,
    instrs: Vec<Instr>,
    /// ARG/ENV names with their values, as declared so far.
    vars: HashMap<String, String>,
    workdir: String,
}

/// Replaces `${NAME}` and `$NAME`; every name must be declared.
fn expand(s: &str, vars: &HashMap<String, String>, line: usize) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        let (name, after) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or(format!("line {line}: unclosed ${{"))?;
            (&r[..end], &r[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        if name.is_empty() {
            out.push('$');
            rest = after;
            continue;
        }
        let v = vars.get(name).ok_or(format!(
            "line {line}: ${name} is not declared (ARG/ENV) in this stage"
        ))?;
        out.push_str(v);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// Stages with variables resolved; checks the cross-stage rules.
fn stages(instrs: &[Instr]) -> Result<Vec<Stage>, String> {
    let mut global = HashMap::new();
    let mut stages: Vec<Stage> = Vec::new();
    for ins in instrs {
        let decl = |s: &str| -> (String, String) {
            let (k, v) = s.split_once('=').unwrap_or((s, ""));
            (k.trim().to_string(), v.trim().trim_matches('"').to_string())
        };
        if ins.op == "FROM" {
            let a: Vec<&str> = ins.args.split_whitespace().collect();
            let base = expand(a[0], &global, ins.line)?;
            let name = match a.as_slice() {
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => n.to_string(),
                [_] => String::new(),
                _ => return Err(format!("line {}: FROM {}", ins.line, ins.args)),
            };
            if !name.is_empty() && stages.iter().any(|s| s.name == name) {
                return Err(format!("line {}: stage {name} defined twice", ins.line));
            }
            stages.push(Stage {
                name,
                base,
                ..Default::default()
            });
            continue;
        }
        let Some(st) = stages.last_mut() else {
            if ins.op == "ARG" {
                let (k, v) = decl(&ins.args);
                global.insert(k, v);
                continue;
            }
            return Err(format!(
                "line {}: {} before the first FROM",
                ins.line, ins.op
            ));
        };
        match ins.op.as_str() {
            "ARG" => {
                let (k, v) = decl(&ins.args);
                // A global ARG redeclared without a value keeps its default.
                let v = if v.is_empty() {
                    global.get(&k).cloned().unwrap_or_default()
                } else {
                    v
                };
                st.vars.insert(k, v);
            }
            "ENV" => {
                let (k, v) = decl(&ins.args);
                st.vars.insert(k, v);
            }
            _ => {}
        }
        let args = expand(&ins.args, &st.vars, ins.line)?;
        if ins.op == "WORKDIR" {
            st.workdir = args.clone();
        }
        if let Some(from) = args.strip_prefix("--from=") {
            let from = from.split_whitespace().next().unwrap();
            let known = stages[..stages.len() - 1].iter().any(|s| s.name == from);
            if !known {
                return Err(format!(
                    "line {}: COPY --from={from}: no such earlier stage",
                    ins.line
                ));
            }
        }
        let st = stages.last_mut().unwrap();
        st.instrs.push(Instr {
            args,
            ..ins.clone()
        });
    }
    Ok(stages)
}

fn exec_form(ins: &Instr) -> Vec<String> {
    serde_json::from_str(&ins.args).unwrap_or_else(|e| {
        panic!(
            "line {}: {} must be exec form (a JSON array): {e}",
            ins.line, ins.op
        )
    })
}

fn last<'a>(st: &'a Stage, op: &str) -> Option<&'a Instr> {
    st.instrs.iter().rev().find(|i| i.op == op)
}

/// `COPY --from=<stage> <src> <dst>` in `st`: (stage, src, dst).
fn copies_from(st: &Stage) -> Vec<(String, String, String)> {
    st.instrs
        .iter()
        .filter(|i| i.op == "COPY")
        .filter_map(|i| {
            let a: Vec<&str> = i.args.split_whitespace().collect();
            let from = a.first()?.strip_prefix("--from=")?;
            Some((from.to_string(), a[1].to_string(), a[2].to_string()))
        })
        .collect()
}

#[test]
fn dockerfile_builds_a_static_image_running_as_5995() {
    let text = read("Dockerfile");
    let instrs = parse_dockerfile(&text).unwrap();
    let stages = stages(&instrs).unwrap();
    let build = stages
        .iter()
        .find(|s| s.name == "build")
        .expect("a build stage");

    // The build stage: a static (musl) release build of the veer binary.
    let cargo = build
        .instrs
        .iter()
        .find(|i| i.op == "RUN" && i.args.contains("cargo build"))
        .expect("cargo build");
    let words: Vec<&str> = cargo.args.split_whitespace().collect();
    let after = |f: &str| words.iter().position(|w| *w == f).map(|i| words[i + 1]);
    assert!(words.contains(&"--release") && words.contains(&"--locked"));
    let target = after("--target").expect("--target");
    assert!(
        target.ends_with("-unknown-linux-musl"),
        "{target}: not static"
    );
    assert_eq!(after("--bin"), Some("veer"));
    assert!(build
        .instrs
        .iter()
        .any(|i| i.op == "COPY" && i.args == ". ."));
    let produced = format!("{}/target/{target}/release/veer", build.workdir);

    // The sidecar image (the last stage, docker build's default).
    let sidecar = stages.last().unwrap();
    assert!(
        sidecar.base.starts_with("gcr.io/distroless/static") || sidecar.base == "scratch",
        "{}: not a static base",
        sidecar.base
    );
    assert_eq!(
        last(sidecar, "USER").map(|i| i.args.as_str()),
        Some("5995:5995")
    );
    for st in [
        sidecar,
        stages
            .iter()
            .find(|s| s.name == "init")
            .expect("an init stage"),
    ] {
        let entry = exec_form(last(st, "ENTRYPOINT").expect("ENTRYPOINT"));
        let copies = copies_from(st);
        let (from, src, dst) = copies
            .iter()
            .find(|(_, _, dst)| *dst == entry[0])
            .unwrap_or_else(|| panic!("{}: ENTRYPOINT {} is not copied in", st.name, entry[0]));
        assert_eq!(from, "build");
        assert_eq!(
            *src, produced,
            "{}: copies a path the build does not produce",
            st.name
        );
        assert_eq!(dst, "/usr/local/bin/veer");
        let _ = exec_form(last(st, "CMD").expect("CMD"));
    }
    let cmd = exec_form(last(sidecar, "CMD").unwrap());
    assert_eq!(cmd[0], "run");

    // The init image: iptables, as root.
    let init = stages.iter().find(|s| s.name == "init").unwrap();
    assert!(init
        .instrs
        .iter()
        .any(|i| i.op == "RUN" && i.args.contains("install") && i.args.contains("iptables")));
    assert_eq!(last(init, "USER").map(|i| i.args.as_str()), Some("0:0"));

    // The build context keeps what the build needs and drops the rest.
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target", ".git"] {
        assert!(patterns.contains(&must), ".dockerignore lacks {must}");
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "crates",
        "benches",
        "tests",
    ] {
        assert!(!patterns.contains(&needed), ".dockerignore drops {needed}");
    }

    match veer_testsupport_tool("hadolint") {
        Some(h) => {
            let out = Command::new(h)
                .arg(repo().join("Dockerfile"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "hadolint:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        None => loud_skip("hadolint: not installed (the built-in checks above ran)"),
    }
}

/// The `dataplane` target: HashiCorp's consul-dataplane image with veer
/// where consul-dataplane looks for Envoy. Facts from consul-dataplane's
/// own `Dockerfile` (release-default stage, tags v1.9.9 and HEAD 28a963a):
/// Envoy at `/usr/local/bin/envoy` (found by `exec.LookPath("envoy")` in
/// pkg/envoy/proxy.go when `-envoy-executable-path` is unset), entrypoint
/// `["/usr/local/bin/dumb-init", "/usr/local/bin/consul-dataplane"]`, `USER
/// 100` (consul-k8s runs it as 5995 regardless). consul-k8s 1.x probes the
/// native sidecar with `/usr/local/bin/consul-dataplane -check-proxy-health`
/// (control-plane/connect-inject/webhook/consul_dataplane_sidecar.go,
/// v1.9.11), so that binary must stay consul-dataplane's.
#[test]
fn dataplane_image_puts_veer_where_consul_dataplane_looks_for_envoy() {
    let text = read("Dockerfile");
    let stages = stages(&parse_dockerfile(&text).unwrap()).unwrap();
    let build = stages.iter().find(|s| s.name == "build").unwrap();
    let cargo = build
        .instrs
        .iter()
        .find(|i| i.op == "RUN" && i.args.contains("cargo build"))
        .unwrap();
    let words: Vec<&str> = cargo.args.split_whitespace().collect();
    let target = words[words.iter().position(|w| *w == "--target").unwrap() + 1];
    let produced = format!("{}/target/{target}/release/veer", build.workdir);

    let dp = stages
        .iter()
        .find(|s| s.name == "dataplane")
        .expect("a dataplane stage");
    let (image, tag) = dp.base.split_once(':').expect("a pinned tag");
    assert_eq!(image, "hashicorp/consul-dataplane");
    let v: Vec<&str> = tag.split('.').collect();
    assert!(
        v.len() == 3 && v.iter().all(|p| p.parse::<u32>().is_ok()),
        "{tag}: pin a release (x.y.z), as global.imageConsulDataplane does"
    );

    // veer, from the build stage, exactly where Envoy was.
    let copies = copies_from(dp);
    assert_eq!(
        copies,
        [(
            "build".to_string(),
            produced.clone(),
            "/usr/local/bin/envoy".to_string()
        )],
        "the stage copies veer over Envoy and nothing else"
    );
    // Nothing else changes: no RUN (the base has no shell anyway, and no
    // setcap or chmod can add a capability), no other file, no ADD.
    for i in &dp.instrs {
        assert!(
            matches!(
                i.op.as_str(),
                "ARG" | "COPY" | "USER" | "ENTRYPOINT" | "LABEL"
            ),
            "line {}: {} in the dataplane stage",
            i.line,
            i.op
        );
        assert!(
            !i.args.contains("--chmod") && !i.args.contains("--chown"),
            "line {}: {}",
            i.line,
            i.args
        );
    }
    // consul-k8s runs it as 5995:5995; the image says so too.
    assert_eq!(last(dp, "USER").map(|i| i.args.as_str()), Some("5995:5995"));
    // consul-dataplane stays the entrypoint (the injected container has
    // args only, no command).
    assert_eq!(
        exec_form(last(dp, "ENTRYPOINT").unwrap()),
        [
            "/usr/local/bin/dumb-init",
            "/usr/local/bin/consul-dataplane"
        ]
    );
    // `docker build .` still gives the plain sidecar.
    assert_eq!(stages.last().unwrap().name, "sidecar");
    // The checker notices a copy to the wrong place.
    let broken = text.replace(
        "/release/veer /usr/local/bin/envoy",
        "/release/veer /usr/local/bin/veer",
    );
    let st = stages_of(&broken);
    let dp = st.iter().find(|s| s.name == "dataplane").unwrap();
    assert_ne!(copies_from(dp)[0].2, "/usr/local/bin/envoy");
}

fn stages_of(text: &str) -> Vec<Stage> {
    stages(&parse_dockerfile(text).unwrap()).unwrap()
}

#[test]
fn dockerfile_checker_rejects_broken_files() {
    let bad = [
        ("FROM rust AS build\nrun echo\n", "upper-case"),
        ("FROM rust AS build\nRUN echo \\\n", "continued"),
        ("FROM a AS x\nFROM b AS x\n", "twice"),
        (
            "FROM a AS x\nCOPY --from=y /a /b\n",
            "no such earlier stage",
        ),
        ("FROM a AS x\nRUN echo ${NOPE}\n", "not declared"),
        ("ARG T=1\nFROM a AS x\nRUN echo ${T}\n", "not declared"),
        ("RUN echo\n", "before the first FROM"),
    ];
    for (text, why) in bad {
        let e = parse_dockerfile(text)
            .and_then(|i| stages(&i).map(|_| ()))
            .expect_err(text);
        assert!(e.contains(why), "{text:?}: {e}");
    }
    let ok = "ARG T=1\nFROM a:${T} AS x\nARG T\nRUN echo ${T} \\\n  # comment\n  && true\n";
    let s = stages(&parse_dockerfile(ok).unwrap()).unwrap();
    assert_eq!(s[0].base, "a:1");
    assert_eq!(s[0].instrs.last().unwrap().args, "echo 1  && true");
}

fn veer_testsupport_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

// ---------------------------------------------------------------- systemd

/// `[Section] Key=Value` lines of a unit file, in order.
fn unit(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for l in text.lines().map(str::trim) {
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = l.split_once('=').expect("Key=Value");
        out.entry((section.clone(), k.trim().to_string()))
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn systemd_unit_is_valid_and_agrees_with_its_config() {
    let text = read("deploy/systemd/veer.service");
    let u = unit(&text);
    let one = |s: &str, k: &str| -> String {
        let v = u
            .get(&(s.to_string(), k.to_string()))
            .unwrap_or_else(|| panic!("[{s}] {k} missing"));
        assert_eq!(v.len(), 1, "[{s}] {k} given {} times", v.len());
        v[0].clone()
    };
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(one("Service", "User"), "veer");
    assert_eq!(one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(one("Service", "CapabilityBoundingSet"), "");
    assert!(
        text.contains("--uid 5995"),
        "install notes create the veer user as 5995"
    );
    let pre = one("Service", "ExecStartPre");
    let pre = pre
        .strip_prefix('+')
        .expect("redirect-traffic runs privileged (+)");
    let pre: Vec<String> = pre.split_whitespace().map(String::from).collect();
    assert_eq!(pre[1], "redirect-traffic");
    assert_eq!(flag(&pre, "proxy-uid"), ["5995"]);
    let post = one("Service", "ExecStopPost");
    assert!(
        post.starts_with('+') && post.ends_with("redirect-traffic cleanup"),
        "{post}"
    );
    let start: Vec<String> = one("Service", "ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(start[1], "run");
    assert_eq!(start[0], pre[0], "one binary");
    let grace = veer_core::duration::parse(&flag(&start, "shutdown-grace-period")[0]).unwrap();
    let stop = veer_core::duration::parse(&one("Service", "TimeoutStopSec")).unwrap();
    assert!(stop > grace, "systemd would kill veer while it drains");
    assert_eq!(one("Service", "ExecReload"), "/bin/kill -HUP $MAINPID");

    // The example configuration it names is valid, and its ports agree.
    let config = &flag(&start, "config")[0];
    assert_eq!(config, "/etc/veer/veer.toml");
    let (loaded, _tmp) = validate_veer_config(&read("deploy/systemd/veer.toml"), "systemd");
    assert_eq!(
        flag(&pre, "proxy-inbound-port"),
        [loaded.spec.listen.inbound.port().to_string()]
    );
    assert_eq!(
        flag(&pre, "proxy-outbound-port"),
        [loaded.spec.listen.outbound[0].port().to_string()]
    );
    let excluded = flag(&pre, "exclude-inbound-port");
    assert!(
        excluded.contains(&"22".to_string()),
        "SSH would be redirected"
    );
    if let Some(p) = loaded.admin.prometheus_bind {
        assert!(excluded.contains(&p.port().to_string()));
    }

    // systemd's own checker, with the binary path pointed at an executable
    // that exists here (it checks that ExecStart programs are executable).
    let Some(analyze) = veer_testsupport_tool("systemd-analyze") else {
        loud_skip("systemd-analyze verify: systemd-analyze not installed");
        return;
    };
    let tmp = Tmp::new("unit");
    let me = std::env::current_exe().unwrap();
    let unit_path = tmp.0.join("veer.service");
    std::fs::write(
        &unit_path,
        text.replace("/usr/local/bin/veer", &me.display().to_string()),
    )
    .unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let about_us: Vec<&str> = err.lines().filter(|l| l.contains("veer.service")).collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify:\n{err}"
    );

    // And it does flag mistakes.
    std::fs::write(&unit_path, text.replace("Type=notify", "Type=notifyy")).unwrap();
    let out = Command::new(veer_testsupport_tool("systemd-analyze").unwrap())
        .arg("verify")
        .arg(&unit_path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("notifyy"));
}
