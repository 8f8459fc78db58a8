//! L7 permissions from Consul's documented JSON (fixtures named in
//! `tests/fixtures/README.md`: Consul 1.8.7 has no L7 intentions).
use super::*;
use crate::api::{parse_intentions, parse_service_intentions};
use veer_core::l7::{HeaderMatch, HeaderMatchKind, PathMatch};

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn intention_list_keeps_permissions_in_order() {
    let (ixns, warnings) = parse_intentions(&fixture("1.16-doc-intentions-l7.json")).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(ixns.len(), 2);
    let l7 = &ixns[0];
    assert_eq!(l7.source.name.to_string(), "frontend-web");
    assert_eq!(l7.destination.name.to_string(), "billing");
    // Deny is what counts at L4.
    assert_eq!(l7.action, Action::Deny);
    assert_eq!(
        l7.permissions,
        vec![
            Permission {
                action: Action::Deny,
                http: PermissionMatch {
                    path: PathMatch::Exact("/mycompany.BillingService/IssueRefund".into()),
                    ..Default::default()
                },
            },
            Permission {
                action: Action::Allow,
                http: PermissionMatch {
                    path: PathMatch::Prefix("/mycompany.BillingService/".into()),
                    headers: vec![
                        HeaderMatch {
                            name: "x-tenant".into(),
                            kind: HeaderMatchKind::Regex("t-[0-9]+".into()),
                            invert: false,
                        },
                        HeaderMatch {
                            name: "x-debug".into(),
                            kind: HeaderMatchKind::Present,
                            invert: true,
                        },
                    ],
                    methods: vec!["POST".into()],
                },
            },
        ]
    );
    // An L4 intention has none.
    assert_eq!(ixns[1].action, Action::Allow);
    assert!(ixns[1].permissions.is_empty());
}

#[test]
fn service_intentions_entries_become_one_intention_per_source() {
    let (ixns, warnings) =
        parse_service_intentions(&fixture("1.16-doc-service-intentions.json")).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let pairs: Vec<(String, String, usize)> = ixns
        .iter()
        .map(|i| {
            (
                i.source.name.to_string(),
                i.destination.name.to_string(),
                i.permissions.len(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("admin-dashboard".into(), "api".into(), 1),
            ("report-generator".into(), "api".into(), 1),
            ("frontend-web".into(), "billing".into(), 2),
            ("support-portal".into(), "billing".into(), 1),
        ]
    );
    let p = &ixns[0].permissions[0];
    assert_eq!(p.action, Action::Allow);
    assert_eq!(p.http.path, PathMatch::Prefix("/v2".into()));
    assert_eq!(p.http.methods, ["GET", "PUT", "POST", "DELETE", "HEAD"]);
    // One entry alone is read too; an L4 source keeps its action.
    let one = serde_json::json!({
        "Kind": "service-intentions", "Name": "db",
        "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}]
    });
    let (ixns, _) = parse_service_intentions(&serde_json::to_vec(&one).unwrap()).unwrap();
    assert_eq!(ixns.len(), 2);
    assert_eq!(ixns[0].action, Action::Allow);
    assert!(ixns[0].permissions.is_empty());
    assert_eq!(ixns[0].destination.name.to_string(), "db");
}

/// What veer cannot enforce exactly makes the whole intention a plain
/// deny, with a warning naming the intention and the field.
#[test]
fn unenforceable_permissions_make_the_intention_deny() {
    use serde_json::json;
    let rows = [
        (
            json!({"Action": "allow", "JWT": {"Providers": [{"Name": "okta"}]}}),
            "Permissions[0].JWT",
        ),
        (
            json!({"Action": "maybe", "HTTP": {}}),
            "Permissions[0].Action Some(\"maybe\")",
        ),
        (
            json!({"HTTP": {"PathPrefix": "/"}}),
            "Permissions[0].Action None",
        ),
        (
            json!({"Action": "allow", "HTTP": {"PathRegex": "(("}}),
            "Permissions[0].HTTP.PathRegex: regex \"((\" does not compile",
        ),
        (
            json!({"Action": "allow", "HTTP": {"Header": [{"Name": "x-a"}]}}),
            "Permissions[0].HTTP.Header[0]: none of Present",
        ),
        (
            json!({"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}),
            "more than one of PathExact",
        ),
        (
            json!({"Action": "allow", "HTTP": {"Methods": ["GET", "BAD METHOD"]}}),
            "Permissions[0].HTTP.Methods[1]",
        ),
        (
            json!({"Action": "allow", "HTTP": {"PathPrefix": "v2"}}),
            "PathPrefix \"v2\" does not start with /",
        ),
    ];
    for (perm, want) in rows {
        let body = json!([{
            "ID": "abc", "SourceName": "web", "DestinationName": "api",
            "Permissions": [perm]
        }]);
        let (ixns, warnings) = parse_intentions(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(ixns.len(), 1);
        assert_eq!(ixns[0].action, Action::Deny, "{want}");
        assert!(ixns[0].permissions.is_empty(), "{want}");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains(want) && warnings[0].contains("intention abc"),
            "{warnings:?} (want {want})"
        );
    }
    // A permission without HTTP matches every request.
    let p = parse(&[json!({"Action": "deny"})]).unwrap();
    assert_eq!(p[0].http, PermissionMatch::default());
}
