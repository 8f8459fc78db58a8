use super::*;
use veer_ca::{Ca, LeafSpec};

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn certs(service: &str) -> Dir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "veer-cfg-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", service).unwrap();
    std::fs::write(dir.join("roots.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    let other = ca.issue(&LeafSpec::service(TD, "dc1", "not-api")).unwrap();
    std::fs::write(dir.join("other.pem"), &other.chain_pem).unwrap();
    std::fs::write(dir.join("other-key.pem"), &other.key_pem).unwrap();
    Dir(dir)
}

const GOOD: &str = r#"
[service]
name = "api"
datacenter = "dc1"
trust_domain = "11111111-2222-3333-4444-555555555555.consul"

[tls]
ca_file = "roots.pem"
cert_file = "leaf.pem"
key_file = "key.pem"

[inbound]
bind = "0.0.0.0:20000"
local_app = "127.0.0.1:8080"

[outbound]
bind = "127.0.0.1:15001"
mesh_destinations_only = false

[intentions]
default_action = "deny"
[[intentions.rules]]
source = "web"
source_namespace = "default"
action = "allow"

[[upstreams]]
name = "billing"
datacenter = "dc1"
virtual_ips = ["10.96.0.20", "fd00::20"]
endpoints = ["10.77.0.2:20000"]

[[upstreams]]
name = "db"
dialed_directly = true
instances = ["10.77.0.5", "10.77.0.6"]

[[upstreams]]
name = "ledger"
local_bind = "127.0.0.1:9191"
endpoints = ["10.77.0.3:20000"]
"#;

fn parse_in(dir: &Dir, text: &str) -> Result<Loaded, ConfigError> {
    let p = dir.0.join("veer.toml");
    std::fs::write(&p, text).unwrap();
    load(&p)
}

#[test]
fn the_issue_example_parses() {
    let d = certs("api");
    let l = parse_in(&d, GOOD).unwrap();
    assert_eq!(
        l.spec.identity.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc1/svc/api")
    );
    assert_eq!(l.spec.upstreams.len(), 3);
    assert_eq!(
        l.spec.listen.outbound.len(),
        2,
        "v4 and v6 outbound listeners"
    );
    assert_eq!(l.spec.listen.outbound[1].to_string(), "[::1]:15001");
    assert_eq!(l.files.len(), 4);
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    assert_eq!(snap.intentions.rules().len(), 1);
    let dump = snap.dump();
    assert_eq!(
        dump["upstreams"][0]["sni"],
        format!("billing.default.dc1.internal.{TD}")
    );
    assert!(
        !dump.to_string().contains("PRIVATE"),
        "no key material in the dump"
    );
}

/// Each broken variant must fail naming the key and the line it is on.
#[test]
fn mistakes_name_key_and_line() {
    let d = certs("api");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            GOOD.replace(
                "local_app = \"127.0.0.1:8080\"",
                "local_app = \"127.0.0.1\"",
            ),
            "inbound.local_app",
            "local_app =",
        ),
        (
            GOOD.replace("\"10.96.0.20\", \"fd00::20\"", "\"10.96.0.x\""),
            "upstreams[0].virtual_ips",
            "10.96.0.x",
        ),
        (
            GOOD.replace("ca_file = \"roots.pem\"", "ca_file = \"missing.pem\""),
            "tls.ca_file",
            "missing.pem",
        ),
        (
            GOOD.replace(
                "cert_file = \"leaf.pem\"\nkey_file = \"key.pem\"",
                "cert_file = \"other.pem\"\nkey_file = \"other-key.pem\"",
            ),
            "tls.cert_file",
            "other.pem",
        ),
        (
            GOOD.replace("default_action = \"deny\"", "default_action = \"maybe\""),
            "intentions.default_action",
            "maybe",
        ),
        (
            GOOD.replace("action = \"allow\"", "action = \"permit\""),
            "intentions.rules[0].action",
            "permit",
        ),
        (
            GOOD.replace(
                "local_bind = \"127.0.0.1:9191\"",
                "local_bind = \"127.0.0.1:15001\"",
            ),
            "upstreams[2].local_bind",
            "local_bind = \"127.0.0.1:15001",
        ),
    ];
    for (text, key, needle) in cases {
        let e = parse_in(&d, &text)
            .err()
            .unwrap_or_else(|| panic!("{key} should fail"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        let want = line_of(&text, needle.split('\n').next().unwrap());
        assert_eq!(e.line, Some(want), "{e}");
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("veer.toml:{want}: {key}: ")),
            "{shown}"
        );
    }
}

#[test]
fn unknown_key_names_line() {
    let d = certs("api");
    let text = GOOD.replace(
        "mesh_destinations_only = false",
        "mesh_destinations_onl = false",
    );
    let e = parse_in(&d, &text).err().unwrap();
    assert!(
        e.msg.contains("unknown field `mesh_destinations_onl`"),
        "{e}"
    );
    let want = text
        .lines()
        .position(|l| l.contains("mesh_destinations_onl"))
        .unwrap()
        + 1;
    assert_eq!(e.line, Some(want), "{e}");
}

#[test]
fn syntax_error_names_line() {
    let d = certs("api");
    let text = GOOD.replace("name = \"db\"", "name = \"db");
    let e = parse_in(&d, &text).err().unwrap();
    let want = text
        .lines()
        .position(|l| l.contains("name = \"db"))
        .unwrap()
        + 1;
    assert_eq!(e.line, Some(want), "{e}");
}

#[test]
fn upstream_needs_a_way_in() {
    let d = certs("api");
    let text = GOOD.replace(
        "dialed_directly = true\ninstances = [\"10.77.0.5\", \"10.77.0.6\"]",
        "",
    );
    let e = parse_in(&d, &text).err().unwrap();
    assert_eq!(e.key.as_deref(), Some("upstreams[1]"), "{e}");
}

#[test]
fn ipv6_listener_can_be_turned_off() {
    let d = certs("api");
    let text = GOOD.replace(
        "mesh_destinations_only = false",
        "mesh_destinations_only = false\nbind_ipv6 = \"\"",
    );
    assert_eq!(parse_in(&d, &text).unwrap().spec.listen.outbound.len(), 1);
}

#[test]
fn admin_defaults_and_overrides() {
    let d = certs("api");
    let l = parse_in(&d, GOOD).unwrap();
    assert_eq!(l.admin.bind, AdminBind::Default);
    assert_eq!(
        l.admin.bind.addr(),
        Some("127.0.0.1:19000".parse().unwrap())
    );
    assert_eq!(
        l.admin.prometheus_bind, None,
        "prometheus is off by default"
    );

    let text = format!(
        "{GOOD}\n[admin]\nbind = \"127.0.0.1:19100\"\nprometheus_bind = \"0.0.0.0:20200\"\n"
    );
    let l = parse_in(&d, &text).unwrap();
    assert_eq!(
        l.admin.bind,
        AdminBind::Addr("127.0.0.1:19100".parse().unwrap())
    );
    assert_eq!(
        l.admin.prometheus_bind,
        Some("0.0.0.0:20200".parse().unwrap())
    );

    let text = format!("{GOOD}\n[admin]\nbind = \"\"\nprometheus_bind = \"\"\n");
    let l = parse_in(&d, &text).unwrap();
    assert_eq!(l.admin.bind, AdminBind::Off);
    assert_eq!(l.admin.bind.addr(), None);
    assert_eq!(l.admin.prometheus_bind, None);

    assert_eq!(AdminBind::parse(""), Ok(AdminBind::Off));
    assert!(AdminBind::parse("localhost:19000").is_err());
}

#[test]
fn admin_mistakes_name_key_and_line() {
    let d = certs("api");
    for (tail, key, needle) in [
        (
            "[admin]\nbind = \"19000\"\n",
            "admin.bind",
            "bind = \"19000\"",
        ),
        (
            "[admin]\nprometheus_bind = \"0.0.0.0:20000\"\n",
            "admin.prometheus_bind",
            "prometheus_bind",
        ),
        (
            "[admin]\nbind = \"127.0.0.1:20200\"\nprometheus_bind = \"0.0.0.0:20200\"\n",
            "admin.prometheus_bind",
            "prometheus_bind",
        ),
    ] {
        let text = format!("{GOOD}\n{tail}");
        let e = parse_in(&d, &text)
            .err()
            .unwrap_or_else(|| panic!("{tail} should fail"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        let want = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert_eq!(e.line, Some(want), "{e}");
    }
}

const EXPOSE: &str = r#"
[[expose]]
listener = "0.0.0.0:20300"
path = "/healthz"
local_path_port = 8080

[[expose]]
listener = "0.0.0.0:20300"
path = "/ready"
local_path_port = 8081
protocol = "http"

[[expose]]
listener = "0.0.0.0:20400"
path = "/live"
local_path_port = 8080
"#;

#[test]
fn expose_paths_parse_and_dump() {
    let d = certs("api");
    let l = parse_in(&d, &format!("{GOOD}{EXPOSE}")).unwrap();
    assert_eq!(
        l.spec.expose,
        vec![
            ExposePath::new("0.0.0.0:20300".parse().unwrap(), "/healthz", 8080),
            ExposePath::new("0.0.0.0:20300".parse().unwrap(), "/ready", 8081),
            ExposePath::new("0.0.0.0:20400".parse().unwrap(), "/live", 8080),
        ]
    );
    assert!(parse_in(&d, GOOD).unwrap().spec.expose.is_empty());
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    let dump = snap.dump();
    assert_eq!(dump["expose"][1]["path"], "/ready");
    assert_eq!(dump["expose"][1]["local_path_port"], 8081);
    assert_eq!(dump["expose"][1]["protocol"], "http");
    assert_eq!(dump["expose"][2]["listener"], "0.0.0.0:20400");
}

#[test]
fn expose_mistakes_name_key_and_line() {
    let d = certs("api");
    let cases: Vec<(String, &str, &str)> = vec![
        (
            EXPOSE.replace("\"/healthz\"", "\"healthz\""),
            "expose[0].path",
            "\"healthz\"",
        ),
        (
            EXPOSE.replace("\"/healthz\"", "\"/healthz?x=1\""),
            "expose[0].path",
            "healthz?x",
        ),
        (
            EXPOSE.replace("local_path_port = 8081", "local_path_port = 70000"),
            "expose[1].local_path_port",
            "70000",
        ),
        (
            EXPOSE.replace("local_path_port = 8081", "local_path_port = 0"),
            "expose[1].local_path_port",
            "local_path_port = 0",
        ),
        (
            EXPOSE.replace("protocol = \"http\"", "protocol = \"http2\""),
            "expose[1].protocol",
            "http2",
        ),
        (
            EXPOSE.replace("\"/ready\"", "\"/healthz\""),
            "expose[1].path",
            "path = \"/healthz\"\nlocal_path_port = 8081",
        ),
        (
            EXPOSE.replace("0.0.0.0:20400", "0.0.0.0:20000"),
            "expose[2].listener",
            "0.0.0.0:20000",
        ),
        (
            EXPOSE.replace("0.0.0.0:20400", "127.0.0.1:20300"),
            "expose[2].listener",
            "127.0.0.1:20300",
        ),
        (
            EXPOSE.replace("0.0.0.0:20400", "localhost:20400"),
            "expose[2].listener",
            "localhost:20400",
        ),
    ];
    for (tail, key, needle) in cases {
        let text = format!("{GOOD}{tail}");
        let e = parse_in(&d, &text)
            .err()
            .unwrap_or_else(|| panic!("{key} should fail:\n{tail}"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        // The last place the needle (which may span lines) starts.
        let lines: Vec<&str> = text.lines().collect();
        let parts: Vec<&str> = needle.split('\n').collect();
        let want = (0..lines.len())
            .rev()
            .find(|i| {
                parts
                    .iter()
                    .enumerate()
                    .all(|(k, p)| lines.get(i + k).is_some_and(|l| l.contains(p)))
            })
            .unwrap()
            + 1;
        assert_eq!(e.line, Some(want), "{e}");
    }
}

#[test]
fn admin_collides_with_expose() {
    let d = certs("api");
    let text = format!("{GOOD}{EXPOSE}\n[admin]\nprometheus_bind = \"0.0.0.0:20300\"\n");
    let e = parse_in(&d, &text).err().unwrap();
    assert_eq!(e.key.as_deref(), Some("admin.prometheus_bind"), "{e}");
}

#[test]
fn limits_max_connections() {
    let d = certs("api");
    let l = parse_in(&d, GOOD).unwrap();
    assert_eq!(l.spec.timeouts.max_connections, 100_000, "default");
    let text = format!("{GOOD}\n[limits]\nmax_connections = 250\n\n[timeouts]\nidle = \"90s\"\n");
    let l = parse_in(&d, &text).unwrap();
    assert_eq!(l.spec.timeouts.max_connections, 250);
    assert_eq!(l.spec.timeouts.idle, std::time::Duration::from_secs(90));
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    assert_eq!(snap.dump()["limits"]["max_connections"], 250);
    for bad in ["0", "-1"] {
        let text = format!("{GOOD}\n[limits]\nmax_connections = {bad}\n");
        let e = parse_in(&d, &text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_connections"), "{e}");
        assert_eq!(e.line, Some(text.lines().count()), "{e}");
    }
}

#[test]
fn mux_enabled_defaults_on_and_is_named_when_bad() {
    let d = certs("api");
    let l = parse_in(&d, GOOD).unwrap();
    assert!(l.spec.timeouts.mux, "default on");
    let text = format!("{GOOD}\n[mux]\nenabled = false\n");
    let l = parse_in(&d, &text).unwrap();
    assert!(!l.spec.timeouts.mux);
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    assert_eq!(snap.dump()["mux"]["enabled"], false);
    let text = format!("{GOOD}\n[mux]\nenabled = \"no\"\n");
    let e = parse_in(&d, &text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("mux.enabled"), "{e}");
    assert_eq!(e.line, Some(text.lines().count()), "{e}");
    let text = format!("{GOOD}\n[mux]\nenable = true\n");
    let e = parse_in(&d, &text).unwrap_err();
    assert!(e.to_string().contains("unknown field `enable`"), "{e}");
}

/// Fuzzing finding 4 (`fuzz/regressions/config_parse/duplicate-vip-v4-mapped`):
/// a virtual IP written once as IPv4 and once IPv4-mapped is one address.
#[test]
fn a_virtual_ip_claimed_twice_in_two_spellings_is_refused() {
    let d = certs("api");
    let text = format!(
        "{GOOD}\n[[upstreams]]\nname = \"other\"\nvirtual_ips = [\"::ffff:10.96.0.20\"]\nendpoints = [\"10.77.0.9:20000\"]\n"
    );
    let e = parse_in(&d, &text).unwrap_err();
    assert!(e.msg.contains("10.96.0.20"), "{e}");
    assert!(e.to_string().contains("virtual"), "{e}");
}

/// A new snapshot keeps the TLS configurations (and with them the session
/// tickets) when only routing or intentions changed, and builds new ones
/// when the leaf or the roots changed.
#[test]
fn tls_configs_are_kept_across_snapshots_unless_the_material_changes() {
    use crate::snapshot::Snapshot;
    use std::sync::Arc;
    let d = certs("api");
    let first = Snapshot::build(parse_in(&d, GOOD).unwrap().spec, 1).unwrap();
    let more = format!(
        "{GOOD}\n[[upstreams]]\nname = \"other\"\nvirtual_ips = [\"10.96.0.99\"]\nendpoints = [\"10.77.0.9:20000\"]\n"
    );
    let routed = Snapshot::build_after(parse_in(&d, &more).unwrap().spec, 2, Some(&first)).unwrap();
    assert!(Arc::ptr_eq(&first.tls.server, &routed.tls.server));
    assert!(Arc::ptr_eq(&first.tls.client, &routed.tls.client));
    // The same files read again: still the same configurations.
    let again = Snapshot::build_after(parse_in(&d, GOOD).unwrap().spec, 3, Some(&routed)).unwrap();
    assert!(Arc::ptr_eq(&routed.tls.server, &again.tls.server));
    // Another CA and leaf (a rotation): new configurations.
    let d2 = certs("api");
    let rotated =
        Snapshot::build_after(parse_in(&d2, GOOD).unwrap().spec, 4, Some(&again)).unwrap();
    assert!(!Arc::ptr_eq(&again.tls.server, &rotated.tls.server));
    assert!(!Arc::ptr_eq(&again.tls.client, &rotated.tls.client));
}

#[test]
fn permissive_ports_are_read_and_bad_ones_name_their_line() {
    let d = certs("api");
    let text = GOOD.replace(
        "local_app = \"127.0.0.1:8080\"\n",
        "local_app = \"127.0.0.1:8080\"\npermissive_ports = [8080, 9090]\n",
    );
    assert_eq!(
        parse_in(&d, &text).unwrap().spec.permissive_ports,
        [8080, 9090]
    );
    assert!(parse_in(&d, GOOD).unwrap().spec.permissive_ports.is_empty());
    let bad = GOOD.replace(
        "local_app = \"127.0.0.1:8080\"\n",
        "local_app = \"127.0.0.1:8080\"\npermissive_ports = [70000]\n",
    );
    let e = parse_in(&d, &bad).unwrap_err();
    let line = bad
        .lines()
        .position(|l| l.starts_with("permissive_ports"))
        .unwrap()
        + 1;
    assert_eq!(e.line, Some(line), "{e}");
}

/// Issue 15: configurations `validate` used to accept, or refused without
/// saying where, are refused with file, line and key.
#[test]
fn issue15_refusals_name_file_line_and_key() {
    let d = certs("api");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    // (config, key, a text on the line reported, words the message must have)
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            format!("{GOOD}\n[[upstreams]]\nname = \"db\"\ndialed_directly = true\ninstances = [\"10.77.0.7\"]\n"),
            "upstreams[3].name",
            "name = \"db\"\ndialed_directly = true\ninstances = [\"10.77.0.7\"]",
            "\"db\" is already upstreams[1] (line 34); one entry per upstream service",
        ),
        (
            GOOD.replace("instances = [\"10.77.0.5\", \"10.77.0.6\"]", "instances = [\"10.77.0.5\", \"10.96.0.20\"]"),
            "upstreams[1].instances",
            "instances = [",
            "also a virtual IP of upstreams[0] (billing)",
        ),
        (
            GOOD.replace(
                "action = \"allow\"",
                "action = \"allow\"\n[[intentions.rules]]\nsource = \"web\"\naction = \"deny\"",
            ),
            "intentions.rules[1].source",
            "source = \"web\"\naction = \"deny\"",
            "already has a rule (intentions.rules[0])",
        ),
        (
            GOOD.replace("local_app = \"127.0.0.1:8080\"", "local_app = \"127.0.0.1:20000\""),
            "inbound.local_app",
            "local_app =",
            "loop back into veer",
        ),
        (
            GOOD.replace("bind = \"127.0.0.1:15001\"", "bind = \"0.0.0.0:20000\""),
            "outbound.bind",
            "bind = \"0.0.0.0:20000\"\nmesh",
            "collides with the inbound listener",
        ),
        (
            GOOD.replace("[inbound]", "[limits]\nmax_connections = \"1000\"\n\n[inbound]"),
            "limits.max_connections",
            "max_connections",
            "expected a number (without quotes), found string \"1000\"",
        ),
        (
            GOOD.replace("name = \"ledger\"\n", ""),
            "upstreams[2]",
            "local_bind = \"127.0.0.1:9191\"",
            "the required key `name` is missing",
        ),
    ];
    for (text, key, needle, words) in cases {
        let e = parse_in(&d, &text)
            .err()
            .unwrap_or_else(|| panic!("{key} should fail"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        // Multi-line needles: the line of the first line after the first match of the whole.
        let want = match needle.split_once('\n') {
            None => line_of(&text, needle),
            Some(_) => {
                let at = text.find(needle).unwrap();
                text[..at].matches('\n').count() + 1
            }
        };
        let shown = e.to_string();
        assert!(shown.contains(words), "{shown}");
        assert!(
            shown.starts_with(&format!("{}:", d.0.join("veer.toml").display())),
            "{shown}"
        );
        if key != "upstreams[2]" {
            assert_eq!(e.line, Some(want), "{shown}");
        } else {
            // A missing key: the line of its table.
            assert!(e.line.is_some(), "{shown}");
        }
    }
}

/// One `[[upstreams]]` entry per service, as Consul refuses duplicate
/// upstreams (destination name, namespace, partition, datacenter); one
/// entry holds virtual IPs, a listener and dialed-directly instances.
#[test]
fn one_entry_per_upstream_service() {
    let d = certs("api");
    // (extra entry, refused with the key and the earlier entry, or accepted)
    let cases: &[(&str, Option<&str>)] = &[
        // A listener for billing: refused, billing's entry takes it.
        (
            "name = \"billing\"\nlocal_bind = \"127.0.0.1:9192\"\nendpoints = [\"10.77.0.2:20000\"]",
            Some("upstreams[3].name: \"billing\" is already upstreams[0] (line 28)"),
        ),
        // More virtual IPs with other endpoints: refused too.
        (
            "name = \"billing\"\nvirtual_ips = [\"10.96.0.99\"]\nendpoints = [\"10.77.0.9:20000\"]",
            Some("upstreams[3].name: \"billing\" is already upstreams[0]"),
        ),
        // The datacenter spelled out is the same upstream.
        (
            "name = \"ledger\"\ndatacenter = \"dc1\"\nlocal_bind = \"127.0.0.1:9192\"\nendpoints = [\"10.77.0.2:20000\"]",
            Some("upstreams[3].name: \"ledger\" is already upstreams[2] (line 39)"),
        ),
        // Another datacenter or namespace is another upstream.
        (
            "name = \"billing\"\ndatacenter = \"dc2\"\nlocal_bind = \"127.0.0.1:9192\"\nendpoints = [\"10.77.0.2:20000\"]",
            None,
        ),
        (
            "name = \"billing\"\nnamespace = \"team\"\nlocal_bind = \"127.0.0.1:9192\"\nendpoints = [\"10.77.0.2:20000\"]",
            None,
        ),
    ];
    for (entry, want) in cases {
        let text = format!("{GOOD}\n[[upstreams]]\n{entry}\n");
        match (parse_in(&d, &text), want) {
            (Err(e), Some(w)) => {
                let shown = e.to_string();
                assert!(shown.contains(w), "{shown}");
                assert_eq!(e.key.as_deref(), Some("upstreams[3].name"));
                // The line of the second entry's name.
                let at = text
                    .rfind(&format!("name = \"{}\"", entry.split('"').nth(1).unwrap()))
                    .unwrap();
                assert_eq!(
                    e.line,
                    Some(text[..at].matches('\n').count() + 1),
                    "{shown}"
                );
            }
            (Ok(l), None) => assert_eq!(l.spec.upstreams.len(), 4),
            (got, want) => panic!(
                "{entry}: want {want:?}, got {:?}",
                got.map(|l| l.spec.upstreams.len())
            ),
        }
    }
    // One entry: virtual IPs, a listener and dialed-directly instances together.
    let text = GOOD.replace(
        "virtual_ips = [\"10.96.0.20\", \"fd00::20\"]\n",
        "virtual_ips = [\"10.96.0.20\", \"fd00::20\"]\nlocal_bind = \"127.0.0.1:9192\"\ndialed_directly = true\ninstances = [\"10.77.0.8\"]\n",
    );
    let l = parse_in(&d, &text).unwrap();
    let b = &l.spec.upstreams[0];
    assert_eq!(b.identity.service, "billing");
    assert_eq!(b.virtual_ips.len(), 2);
    assert_eq!(b.local_bind, Some("127.0.0.1:9192".parse().unwrap()));
    assert!(b.dialed_directly);
    assert_eq!(
        b.instances,
        vec!["10.77.0.8".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn issue15_leaf_problems_are_named() {
    let d = certs("api");
    let ca_dir = &d.0;
    // Expired: issued by the right CA for the right service, a day ago for an hour.
    let ca = Ca::new_root(TD).unwrap();
    std::fs::write(ca_dir.join("roots2.pem"), &ca.cert_pem).unwrap();
    let old = ca
        .issue(&LeafSpec::service(TD, "dc1", "api").valid_between(-86_400, -82_800))
        .unwrap();
    std::fs::write(ca_dir.join("old.pem"), &old.chain_pem).unwrap();
    std::fs::write(ca_dir.join("old-key.pem"), &old.key_pem).unwrap();
    let text = GOOD
        .replace("ca_file = \"roots.pem\"", "ca_file = \"roots2.pem\"")
        .replace("cert_file = \"leaf.pem\"", "cert_file = \"old.pem\"")
        .replace("key_file = \"key.pem\"", "key_file = \"old-key.pem\"");
    let e = parse_in(&d, &text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("tls.cert_file"), "{e}");
    assert!(e.msg.contains("expired at 20"), "{e}");
    assert!(!e.msg.contains("chain"), "{e}");

    // The CA certificate given as the leaf.
    let text = GOOD.replace("cert_file = \"leaf.pem\"", "cert_file = \"roots.pem\"");
    let e = parse_in(&d, &text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("tls.cert_file"), "{e}");
    assert!(e.msg.contains("is a CA certificate"), "{e}");
    assert!(!e.msg.contains("CaUsedAsEndEntity"), "{e}");

    // A leaf from another CA.
    let text = GOOD.replace("ca_file = \"roots.pem\"", "ca_file = \"roots2.pem\"");
    let e = parse_in(&d, &text).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("tls.cert_file"), "{e}");
    assert!(e.msg.contains("another CA"), "{e}");
}

/// Issue 15: every listen address is known with its key and line (or as a
/// default), to name a listener that cannot bind.
#[test]
fn listen_addresses_are_known_by_key_and_line() {
    let d = certs("api");
    let text = format!(
        "{GOOD}\n[[expose]]\nlistener = \"0.0.0.0:20300\"\npath = \"/healthz\"\nlocal_path_port = 8080\n\
         [[expose]]\nlistener = \"0.0.0.0:20300\"\npath = \"/ready\"\nlocal_path_port = 8080\n"
    );
    let l = parse_in(&d, &text).unwrap();
    let file = d.0.join("veer.toml").display().to_string();
    let line = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    // (address, where)
    let cases = [
        (
            "0.0.0.0:20000",
            format!("{file}:{}: inbound.bind", line("bind = \"0.0.0.0:20000\"")),
        ),
        (
            "127.0.0.1:15001",
            format!(
                "{file}:{}: outbound.bind",
                line("bind = \"127.0.0.1:15001\"")
            ),
        ),
        (
            "[::1]:15001",
            format!("{file}: outbound.bind_ipv6 (default)"),
        ),
        (
            "127.0.0.1:9191",
            format!("{file}:{}: upstreams[2].local_bind", line("127.0.0.1:9191")),
        ),
        // Two paths on one listener: named by the first.
        (
            "0.0.0.0:20300",
            format!("{file}:{}: expose[0].listener", line("0.0.0.0:20300")),
        ),
        ("127.0.0.1:19000", format!("{file}: admin.bind (default)")),
    ];
    for (addr, want) in &cases {
        assert_eq!(
            l.key_of(addr.parse().unwrap()),
            Some(want.as_str()),
            "{addr}"
        );
    }
    assert_eq!(l.listeners.len(), cases.len(), "{:?}", l.listeners);
    assert_eq!(l.key_of("127.0.0.1:1".parse().unwrap()), None);
}

const FAILOVER: &str = r#"subset = "v1"
connect_timeout = "1s"

[[upstreams.failover]]
datacenter = "dc2"
subset = "v1"
endpoints = ["10.78.0.3:20000"]

[[upstreams.failover]]
name = "ledger-dr"
datacenter = "dc3"
endpoints = ["10.79.0.3:20000", "10.79.0.4:20000"]
connect_timeout = "3s"
"#;

#[test]
fn failover_targets_in_toml() {
    let d = certs("api");
    let text = format!("{GOOD}{FAILOVER}");
    let l = parse_in(&d, &text).unwrap();
    let u = &l.spec.upstreams[2];
    assert_eq!(
        u.sni.as_deref(),
        Some(&*format!("v1.ledger.default.dc1.internal.{TD}"))
    );
    assert_eq!(u.failover.len(), 2);
    let (a, b) = (&u.failover[0], &u.failover[1]);
    assert_eq!(
        a.identity.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc2/svc/ledger")
    );
    assert_eq!(
        a.sni.as_deref(),
        Some(&*format!("v1.ledger.default.dc2.internal.{TD}"))
    );
    assert_eq!(
        a.connect_timeout,
        Some(std::time::Duration::from_secs(1)),
        "the upstream's"
    );
    assert_eq!(
        b.identity.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc3/svc/ledger-dr")
    );
    assert_eq!(b.sni, None);
    assert_eq!(b.connect_timeout, Some(std::time::Duration::from_secs(3)));
    assert_eq!(b.endpoints.len(), 2);
    // The primary's endpoints may be empty when failover targets have some.
    let only_failover = text.replace("endpoints = [\"10.77.0.3:20000\"]\n", "");
    let l = parse_in(&d, &only_failover).unwrap();
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    let up = snap
        .routes
        .upstream_by_bind("127.0.0.1:9191".parse().unwrap())
        .unwrap();
    assert_eq!(up.target().unwrap().identity.datacenter, "dc2");
    // Mistakes name the failover entry's key and line.
    let line_of = |t: &str, n: &str| t.lines().position(|l| l.contains(n)).unwrap() + 1;
    let cases = [
        (
            text.replace(
                "endpoints = [\"10.78.0.3:20000\"]",
                "endpoints = [\"10.78.0.3\"]",
            ),
            "upstreams[2].failover[0].endpoints",
            "10.78.0.3",
        ),
        (
            text.replace("endpoints = [\"10.78.0.3:20000\"]", ""),
            "upstreams[2].failover[0].endpoints",
            "[[upstreams.failover]]",
        ),
        (
            text.replace("connect_timeout = \"3s\"", "connect_timeout = \"3x\""),
            "upstreams[2].failover[1].connect_timeout",
            "3x",
        ),
        (
            text.replace("name = \"ledger-dr\"", "name = \"bad name\""),
            "upstreams[2].failover[1].name",
            "bad name",
        ),
        (
            text.replace("datacenter = \"dc3\"", "datacenter = \"dc3\"\nweight = 2"),
            "upstreams[2].failover[1].weight",
            "weight = 2",
        ),
    ];
    for (t, key, needle) in cases {
        let e = parse_in(&d, &t)
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert_eq!(e.line, Some(line_of(&t, needle)), "{key}: {e}");
    }
}

const HTTP_UPSTREAM: &str = r#"
[[upstreams]]
name = "web"
protocol = "http"
virtual_ips = ["10.96.0.30"]
endpoints = ["10.77.0.7:20000"]

[[upstreams.clusters]]
name = "web-v2"
subset = "v2"
protocol = "http2"
endpoints = ["10.77.0.8:20000"]

[[upstreams.routes]]
name = "admin"
path_prefix = "/admin/"
methods = ["get", "PUT"]
headers = [{ name = "X-Canary", exact = "1" }, { name = "x-debug", present = true, invert = true }]
query = [{ name = "v", regex = "[0-9]+" }]
cluster = "web-v2"
prefix_rewrite = "/"
timeout = "2s"
retries = 3
retry_on_status_codes = [503]

[[upstreams.routes]]
path_regex = "/split/.*"
splits = [{ cluster = "web", weight = 90 }, { cluster = "web-v2", weight = 10 }]
retry_on_connect_failure = true
"#;

#[test]
fn http_upstream_routes_and_clusters_parse() {
    use crate::l7::{HeaderMatchKind, PathMatch, QueryMatchKind};
    let d = certs("api");
    let l = parse_in(&d, &format!("{GOOD}{HTTP_UPSTREAM}")).unwrap();
    let u = l
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "web")
        .unwrap();
    let h = u.http.as_ref().expect("an http upstream is L7");
    assert_eq!(h.clusters.len(), 2);
    assert_eq!(h.clusters[0].name, "web");
    assert_eq!(
        h.clusters[0].targets[0].endpoints[0].to_string(),
        "10.77.0.7:20000"
    );
    assert_eq!(h.clusters[1].protocol, Protocol::Http2);
    assert_eq!(
        h.clusters[1].targets[0].sni.as_deref(),
        Some(format!("v2.web.default.dc1.internal.{TD}").as_str())
    );
    assert_eq!(h.routes.len(), 3, "two routes and the catch-all");
    let r = &h.routes[0];
    assert_eq!(r.name, "admin");
    assert_eq!(r.matches.path, PathMatch::Prefix("/admin/".into()));
    assert_eq!(r.matches.methods, vec!["GET", "PUT"]);
    assert_eq!(r.matches.headers[0].name, "x-canary");
    assert_eq!(
        r.matches.headers[0].kind,
        HeaderMatchKind::Exact("1".into())
    );
    assert!(r.matches.headers[1].invert);
    assert_eq!(
        r.matches.query[0].kind,
        QueryMatchKind::Regex("[0-9]+".into())
    );
    assert_eq!(r.action.clusters[0].cluster, 1);
    assert_eq!(r.action.prefix_rewrite.as_deref(), Some("/"));
    assert_eq!(r.action.timeout, Some(std::time::Duration::from_secs(2)));
    let retry = r.action.retry.as_ref().unwrap();
    assert_eq!(
        (retry.num_retries, retry.on_status_codes.clone()),
        (3, vec![503])
    );
    let s = &h.routes[1];
    assert_eq!(s.name, "routes[1]");
    assert_eq!(s.action.clusters.len(), 2);
    assert_eq!(s.action.clusters[1].weight, 10);
    assert_eq!(
        s.action.retry.as_ref().unwrap().num_retries,
        1,
        "Envoy's default"
    );
    assert_eq!(h.routes[2].matches, Default::default());
    // Other upstreams stay L4; the whole file builds.
    assert!(l.spec.upstreams[0].http.is_none());
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    assert!(snap.routes.upstreams().iter().any(|u| u.http.is_some()));
}

#[test]
fn http_route_mistakes_name_key_and_line() {
    let d = certs("api");
    let text = format!("{GOOD}{HTTP_UPSTREAM}");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            text.replace("\"/split/.*\"", "\"/split/(\""),
            "upstreams[3].routes[1].path_regex",
            "path_regex",
        ),
        (
            text.replace("cluster = \"web-v2\"\n", "cluster = \"nope\"\n"),
            "upstreams[3].routes[0].cluster",
            "cluster = \"nope\"",
        ),
        (
            text.replace("[\"get\", \"PUT\"]", "[\"G T\"]"),
            "upstreams[3].routes[0].methods",
            "methods =",
        ),
        (
            text.replace("regex = \"[0-9]+\"", "regex = \"[0-9\""),
            "upstreams[3].routes[0].query[0].regex",
            "query =",
        ),
        (
            text.replace("protocol = \"http\"\n", ""),
            "upstreams[3].protocol",
            "name = \"web\"",
        ),
        (
            text.replace(
                "retry_on_status_codes = [503]",
                "retry_on_status_codes = [700]",
            ),
            "upstreams[3].routes[0].retry_on_status_codes",
            "retry_on_status_codes",
        ),
    ];
    for (t, key, needle) in cases {
        let e = parse_in(&d, &t).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        // The line of the value, or of the table the mistake is in.
        let want = line_of(&t, needle);
        let got = e.line.unwrap();
        assert!(
            got == want || t.lines().nth(got - 1).unwrap().starts_with("[["),
            "{e} (want line {want})"
        );
    }
}

const L7: &str = r#"
[service]
name = "api"
datacenter = "dc1"
trust_domain = "11111111-2222-3333-4444-555555555555.consul"

[tls]
ca_file = "roots.pem"
cert_file = "leaf.pem"
key_file = "key.pem"

[inbound]
bind = "0.0.0.0:20000"
local_app = "127.0.0.1:8080"
protocol = "http"
xfcc = "append_forward"
request_timeout = "30s"

[outbound]
bind = "127.0.0.1:15001"

[intentions]
default_action = "deny"
[[intentions.rules]]
source = "web"
[[intentions.rules.permissions]]
action = "deny"
path_prefix = "/admin"
[[intentions.rules.permissions]]
action = "allow"
methods = ["GET", "HEAD"]
headers = [{ name = "X-Env", exact = "prod" }, { name = "x-debug", present = true, invert = true }]
[[intentions.rules]]
source = "db"
action = "allow"
"#;

#[test]
fn inbound_l7_and_permissions() {
    use crate::l7::{HeaderMatch, HeaderMatchKind, PathMatch, Xfcc};
    let d = certs("api");
    let l = parse_in(&d, L7).unwrap();
    let h = l.spec.inbound_http.clone().unwrap();
    assert_eq!(h.protocol, Protocol::Http);
    assert_eq!(h.xfcc, Xfcc::AppendForward);
    assert_eq!(h.request_timeout, Some(std::time::Duration::from_secs(30)));
    let web = &l.spec.intentions[0];
    assert_eq!(web.permissions.len(), 2);
    assert_eq!(web.permissions[0].action, Action::Deny);
    assert_eq!(
        web.permissions[0].http.path,
        PathMatch::Prefix("/admin".into())
    );
    assert_eq!(web.permissions[1].http.methods, ["GET", "HEAD"]);
    assert_eq!(
        web.permissions[1].http.headers,
        [
            HeaderMatch {
                name: "x-env".into(),
                kind: HeaderMatchKind::Exact("prod".into()),
                invert: false
            },
            HeaderMatch {
                name: "x-debug".into(),
                kind: HeaderMatchKind::Present,
                invert: true
            }
        ]
    );
    assert!(l.spec.intentions[1].permissions.is_empty());
    let snap = crate::snapshot::Snapshot::build(l.spec, 1).unwrap();
    assert!(snap.inbound_http.is_some());
    // tcp (the default): no L7.
    let l = parse_in(&d, GOOD).unwrap();
    assert!(l.spec.inbound_http.is_none());
}

#[test]
fn inbound_l7_mistakes_name_key_and_line() {
    let d = certs("api");
    let line_of =
        |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases: Vec<(String, &str, &str)> = vec![
        (
            L7.replace("protocol = \"http\"", "protocol = \"h3\""),
            "inbound.protocol",
            "h3",
        ),
        (
            L7.replace("\"append_forward\"", "\"forward\""),
            "inbound.xfcc",
            "forward",
        ),
        (
            L7.replace("protocol = \"http\"\n", ""),
            "inbound.xfcc",
            "xfcc =",
        ),
        (
            L7.replace(
                "protocol = \"http\"\nxfcc = \"append_forward\"\nrequest_timeout = \"30s\"\n",
                "",
            ),
            "intentions.rules[0].permissions",
            "source = \"web\"",
        ),
        (
            L7.replace(
                "path_prefix = \"/admin\"",
                "path_prefix = \"/admin\"\npath_exact = \"/x\"",
            ),
            "intentions.rules[0].permissions[0].path_prefix",
            "path_prefix",
        ),
        (
            L7.replace("path_prefix = \"/admin\"", "path_regex = \"(\""),
            "intentions.rules[0].permissions[0].path_regex",
            "path_regex",
        ),
        (
            L7.replace("path_prefix = \"/admin\"", "path_prefix = \"admin\""),
            "intentions.rules[0].permissions[0].path_prefix",
            "path_prefix",
        ),
        (
            L7.replace("[\"GET\", \"HEAD\"]", "[\"get\"]"),
            "intentions.rules[0].permissions[1].methods",
            "methods",
        ),
        (
            L7.replace("exact = \"prod\"", "exact = \"prod\", regex = \"p.*\""),
            "intentions.rules[0].permissions[1].headers[0].name",
            "headers",
        ),
        (
            L7.replace(
                "action = \"deny\"\npath_prefix",
                "action = \"block\"\npath_prefix",
            ),
            "intentions.rules[0].permissions[0].action",
            "block",
        ),
        (
            L7.replace("source = \"web\"", "source = \"web\"\naction = \"allow\""),
            "intentions.rules[0].action",
            "action = \"allow\"\n[[intentions.rules.permissions]]",
        ),
    ];
    for (text, key, needle) in cases {
        let e = parse_in(&d, &text)
            .err()
            .unwrap_or_else(|| panic!("{key} should fail"));
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        let want = line_of(&text, needle.split('\n').next().unwrap());
        assert_eq!(e.line, Some(want), "{key}: {e}");
    }
}
