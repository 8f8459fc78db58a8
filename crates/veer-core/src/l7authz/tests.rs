use super::*;
use crate::authz::{Principal, RbacPolicy};
use crate::intentions::{Intention, Target};
use crate::l7::PermissionMatch;
use crate::spiffe::ServiceId;

/// A request for the tables: method, path, headers (lower-case names).
struct Req {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
}

impl RequestView for Req {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn authority(&self) -> &str {
        "api.example"
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let v: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .collect();
        (!v.is_empty()).then(|| Cow::Owned(v.join(",")))
    }
}

fn req(method: &'static str, path: &'static str) -> Req {
    Req {
        method,
        path,
        headers: vec![],
    }
}

fn with(mut r: Req, name: &'static str, value: &'static str) -> Req {
    r.headers.push((name, value));
    r
}

fn id(svc: &str) -> ServiceId {
    ServiceId::new("td.consul", "default", "default", "dc1", svc)
}

fn peer(svc: &str) -> Peer {
    Peer::from_id(id(svc))
}

fn perm(action: Action, http: PermissionMatch) -> Permission {
    Permission { action, http }
}

fn hdr(name: &str, kind: HeaderMatchKind, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: name.into(),
        kind,
        invert,
    }
}

fn ixn(src: &str, action: Action, permissions: Vec<Permission>) -> Intention {
    let mut i = Intention::new(
        Target::new("default", "default", src),
        Target::new("default", "default", "api"),
        action,
    );
    i.permissions = permissions;
    i
}

fn intentions(all: Vec<Intention>, default: Action) -> HttpIntentions {
    HttpIntentions::compile(&Intentions::new(&id("api"), all, default)).unwrap()
}

#[test]
fn permission_match_kinds() {
    use HeaderMatchKind::*;
    let m = |http: PermissionMatch| {
        intentions(
            vec![ixn("web", Action::Allow, vec![perm(Action::Allow, http)])],
            Action::Deny,
        )
    };
    let path = |p: PathMatch| PermissionMatch {
        path: p,
        ..Default::default()
    };
    let header = |h: HeaderMatch| PermissionMatch {
        headers: vec![h],
        ..Default::default()
    };
    #[rustfmt::skip]
    let table: Vec<(&str, PermissionMatch, Req, bool)> = vec![
        ("exact hit", path(PathMatch::Exact("/a".into())), req("GET", "/a"), true),
        ("exact miss (prefix of it)", path(PathMatch::Exact("/a".into())), req("GET", "/ab"), false),
        ("prefix hit", path(PathMatch::Prefix("/api/".into())), req("GET", "/api/v1"), true),
        ("prefix miss", path(PathMatch::Prefix("/api/".into())), req("GET", "/apix"), false),
        ("regex whole path", path(PathMatch::Regex("/v[0-9]+/.*".into())), req("GET", "/v2/x"), true),
        ("regex is anchored", path(PathMatch::Regex("/v[0-9]+".into())), req("GET", "/v2/x"), false),
        ("regex anchored at start", path(PathMatch::Regex("v[0-9]+".into())), req("GET", "/v2"), false),
        ("methods hit", PermissionMatch { methods: vec!["GET".into(), "HEAD".into()], ..Default::default() }, req("HEAD", "/"), true),
        ("methods miss", PermissionMatch { methods: vec!["GET".into()], ..Default::default() }, req("POST", "/"), false),
        ("header exact", header(hdr("x-env", Exact("prod".into()), false)), with(req("GET", "/"), "x-env", "prod"), true),
        ("header exact miss", header(hdr("x-env", Exact("prod".into()), false)), with(req("GET", "/"), "x-env", "dev"), false),
        ("header joined values", header(hdr("x-env", Exact("a,b".into()), false)), with(with(req("GET", "/"), "x-env", "a"), "x-env", "b"), true),
        ("header prefix", header(hdr("x-env", Prefix("pr".into()), false)), with(req("GET", "/"), "x-env", "prod"), true),
        ("header suffix", header(hdr("x-env", Suffix("od".into()), false)), with(req("GET", "/"), "x-env", "prod"), true),
        ("header regex", header(hdr("x-env", Regex("p.*d".into()), false)), with(req("GET", "/"), "x-env", "prod"), true),
        ("header present", header(hdr("x-env", Present, false)), with(req("GET", "/"), "x-env", ""), true),
        ("header present, absent", header(hdr("x-env", Present, false)), req("GET", "/"), false),
        ("inverted present, absent", header(hdr("x-env", Present, true)), req("GET", "/"), true),
        ("inverted present, present", header(hdr("x-env", Present, true)), with(req("GET", "/"), "x-env", "x"), false),
        ("inverted exact, other value", header(hdr("x-env", Exact("prod".into()), true)), with(req("GET", "/"), "x-env", "dev"), true),
        ("inverted exact, same value", header(hdr("x-env", Exact("prod".into()), true)), with(req("GET", "/"), "x-env", "prod"), false),
        // Envoy: an absent header has no value to compare, inverted or not.
        ("inverted exact, absent", header(hdr("x-env", Exact("prod".into()), true)), req("GET", "/"), false),
        ("pseudo-header :method", header(hdr(":method", Exact("PUT".into()), false)), req("PUT", "/"), true),
        ("pseudo-header :authority", header(hdr(":authority", Suffix(".example".into()), false)), req("GET", "/"), true),
        ("all parts must hold", PermissionMatch { path: PathMatch::Prefix("/a".into()), methods: vec!["GET".into()], headers: vec![hdr("x", Present, false)] }, req("GET", "/a"), false),
        ("empty match = any request", PermissionMatch::default(), req("DELETE", "/anything"), true),
    ];
    for (name, http, r, allowed) in table {
        let d = m(http).evaluate(&peer("web"), &r);
        assert_eq!(d.allowed(), allowed, "{name}: {d:?}");
        let want = if allowed {
            "allowed"
        } else {
            "denied_no_permission"
        };
        assert_eq!(d.classify(), want, "{name}");
    }
}

#[test]
fn first_permission_decides_then_default() {
    let admin = PermissionMatch {
        path: PathMatch::Prefix("/admin".into()),
        ..Default::default()
    };
    let get = PermissionMatch {
        methods: vec!["GET".into()],
        ..Default::default()
    };
    let perms = vec![perm(Action::Deny, admin), perm(Action::Allow, get)];
    for default in [Action::Allow, Action::Deny] {
        let h = intentions(vec![ixn("web", Action::Allow, perms.clone())], default);
        // /admin is denied even for GET: the first permission decides.
        let d = h.evaluate(&peer("web"), &req("GET", "/admin/x"));
        assert_eq!(
            d,
            HttpDecision::Permission {
                intention: 0,
                permission: 0,
                action: Action::Deny
            }
        );
        assert_eq!(d.classify(), "denied_by_permission");
        assert!(h.evaluate(&peer("web"), &req("GET", "/x")).allowed());
        // No permission matches: the default action.
        let d = h.evaluate(&peer("web"), &req("POST", "/x"));
        assert_eq!(
            d,
            HttpDecision::NoPermission {
                intention: 0,
                action: default
            }
        );
        assert_eq!(d.allowed(), default == Action::Allow);
    }
}

#[test]
fn precedence_picks_the_intention_before_permissions() {
    // web (exact, precedence 9) has permissions; `*` (8) allows all. For
    // web the exact one decides, its unmatched requests go to the default
    // (deny), not to the wildcard.
    let post = PermissionMatch {
        methods: vec!["POST".into()],
        ..Default::default()
    };
    let h = intentions(
        vec![
            ixn("*", Action::Allow, vec![]),
            ixn("web", Action::Allow, vec![perm(Action::Allow, post)]),
        ],
        Action::Deny,
    );
    assert!(h.evaluate(&peer("web"), &req("POST", "/")).allowed());
    assert!(!h.evaluate(&peer("web"), &req("GET", "/")).allowed());
    // Another source matches the wildcard without permissions.
    let d = h.evaluate(&peer("db"), &req("GET", "/"));
    assert_eq!(
        d,
        HttpDecision::Intention {
            index: 1,
            action: Action::Allow
        }
    );
    // No intention for this peer at all: the default.
    let h = intentions(vec![ixn("web", Action::Deny, vec![])], Action::Allow);
    assert_eq!(
        h.evaluate(&peer("db"), &req("GET", "/")),
        HttpDecision::Default(Action::Allow)
    );
    let d = h.evaluate(&peer("web"), &req("GET", "/"));
    assert_eq!(d.classify(), "denied_by_intention");
    // A peer without a Consul identity is denied by intentions.
    let anon = Peer {
        uris: vec![],
        subject: "CN=x".into(),
        id: None,
    };
    assert_eq!(
        h.evaluate(&anon, &req("GET", "/")),
        HttpDecision::NoIdentity
    );
}

#[test]
fn l4_listener_denies_intentions_with_permissions() {
    let get = PermissionMatch {
        methods: vec!["GET".into()],
        ..Default::default()
    };
    let all = Intentions::new(
        &id("api"),
        vec![ixn("web", Action::Allow, vec![perm(Action::Allow, get)])],
        Action::Allow,
    );
    let d = all.evaluate(&id("web"));
    assert!(!d.allowed());
    assert!(
        all.explain(&d).contains("L7 permissions"),
        "{}",
        all.explain(&d)
    );
    assert!(all.evaluate(&id("db")).allowed());
}

#[test]
fn bad_permission_regex_names_the_intention() {
    let bad = PermissionMatch {
        path: PathMatch::Regex("(".into()),
        ..Default::default()
    };
    let all = Intentions::new(
        &id("api"),
        vec![ixn("web", Action::Allow, vec![perm(Action::Allow, bad)])],
        Action::Deny,
    );
    let e = HttpIntentions::compile(&all).unwrap_err();
    assert_eq!(e.classify(), "bad_regex");
    assert!(e.to_string().contains("default/web => default/api"), "{e}");
}

fn web_principal() -> Principal {
    Principal::spiffe_regex("^spiffe://td.consul/ns/default/dc/[^/]+/svc/web$")
}

fn policy(name: &str, principals: Vec<Principal>, permissions: Vec<RbacPermission>) -> RbacPolicy {
    RbacPolicy {
        name: name.into(),
        principals,
        permissions,
    }
}

#[test]
fn http_rbac_needs_principal_and_permission() {
    // Consul's L7 shape (default deny): ALLOW web for GET under /api/, as
    // `and_rules { url_path prefix; header :method regex }`.
    let get_api = RbacPermission::And(vec![
        RbacPermission::UrlPath(StringMatch::prefix("/api/")),
        RbacPermission::Header {
            name: ":method".into(),
            value: Some(StringMatch::regex("GET|HEAD")),
            invert: false,
        },
    ]);
    let rules = vec![RbacRules {
        action: Action::Allow,
        policies: vec![policy("web-get", vec![web_principal()], vec![get_api])],
    }];
    let r = HttpRbac::compile(&rules).unwrap();
    let table = [
        ("web", "GET", "/api/x", true),
        ("web", "HEAD", "/api/x", true),
        ("web", "POST", "/api/x", false),
        ("web", "GET", "/other", false),
        ("db", "GET", "/api/x", false),
    ];
    for (svc, method, path, allowed) in table {
        let d = r.evaluate(&peer(svc), &req(method, path));
        assert_eq!(d.allowed(), allowed, "{svc} {method} {path}: {d:?}");
        if !allowed {
            assert_eq!(d.classify(), "denied_no_policy");
        }
    }
}

#[test]
fn http_rbac_deny_filter_and_combinators() {
    // Consul's default-allow shape: a DENY filter; web may not DELETE,
    // nor touch anything outside /public (a `not_rule`).
    let rules = vec![RbacRules {
        action: Action::Deny,
        policies: vec![
            policy(
                "no-delete",
                vec![web_principal()],
                vec![RbacPermission::Header {
                    name: ":method".into(),
                    value: Some(StringMatch::exact("DELETE")),
                    invert: false,
                }],
            ),
            policy(
                "public-only",
                vec![web_principal()],
                vec![RbacPermission::Not(Box::new(RbacPermission::Or(vec![
                    RbacPermission::UrlPath(StringMatch::prefix("/public")),
                    RbacPermission::UrlPath(StringMatch::exact("/")),
                ])))],
            ),
        ],
    }];
    let r = HttpRbac::compile(&rules).unwrap();
    let hz = HttpAuthz::Rbac(r);
    let d = hz.evaluate(&peer("web"), &req("DELETE", "/public/a"));
    assert_eq!(
        d,
        HttpDecision::RbacDenied {
            filter: 0,
            policy: 0
        }
    );
    assert!(hz.explain(&d).contains("no-delete"));
    let d = hz.evaluate(&peer("web"), &req("GET", "/private"));
    assert_eq!(
        d,
        HttpDecision::RbacDenied {
            filter: 0,
            policy: 1
        }
    );
    assert!(hz.evaluate(&peer("web"), &req("GET", "/")).allowed());
    assert!(hz
        .evaluate(&peer("web"), &req("GET", "/public/x"))
        .allowed());
    // Other sources are not named by the policies.
    assert_eq!(
        hz.evaluate(&peer("db"), &req("DELETE", "/private")),
        HttpDecision::RbacNothingDenied
    );
}

#[test]
fn http_rbac_bad_regex_names_the_policy() {
    let rules = vec![RbacRules {
        action: Action::Allow,
        policies: vec![policy(
            "p1",
            vec![web_principal()],
            vec![RbacPermission::UrlPath(StringMatch::regex("a{99999999}"))],
        )],
    }];
    let e = HttpRbac::compile(&rules).unwrap_err();
    assert!(e.to_string().contains("\"p1\""), "{e}");
    assert_eq!(e.classify(), "bad_regex");
}

#[test]
fn authz_source_choice() {
    let all = Intentions::new(&id("api"), vec![], Action::Deny);
    assert!(matches!(
        HttpAuthz::new(Some(&[]), &all, true).unwrap(),
        HttpAuthz::Rbac(_)
    ));
    assert!(matches!(
        HttpAuthz::new(None, &all, true).unwrap(),
        HttpAuthz::Intentions(_)
    ));
    // Network RBAC decided the connection and no HTTP filter: all allowed.
    let h = HttpAuthz::new(None, &all, false).unwrap();
    assert!(h.evaluate(&peer("x"), &req("GET", "/")).allowed());
}
