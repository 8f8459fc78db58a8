use super::*;

fn hm(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn hop_by_hop_headers_are_removed() {
    let mut h = hm(&[
        ("connection", "keep-alive, x-secret"),
        ("x-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("te", "gzip"),
        ("x-app", "kept"),
    ]);
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-app"]);
    // gRPC's `TE: trailers` is end to end.
    let mut h = hm(&[("te", "trailers")]);
    strip_hop_by_hop(&mut h);
    assert_eq!(h.get("te").unwrap(), "trailers");
}

#[test]
fn xfcc_modes() {
    let el = "By=spiffe://td/ns/default/dc/dc1/svc/api;Hash=ab;Subject=\"\";URI=spiffe://td/ns/default/dc/dc1/svc/web";
    let forged = [(
        "x-forwarded-client-cert",
        "URI=spiffe://td/ns/default/dc/dc1/svc/admin",
    )];
    let table = [
        (Xfcc::Sanitize, &forged[..], None),
        (Xfcc::Sanitize, &[][..], None),
        (Xfcc::SanitizeSet, &forged[..], Some(el.to_string())),
        (
            Xfcc::AppendForward,
            &forged[..],
            Some(format!("URI=spiffe://td/ns/default/dc/dc1/svc/admin,{el}")),
        ),
        (Xfcc::AppendForward, &[][..], Some(el.to_string())),
    ];
    for (mode, given, want) in table {
        let mut h = hm(given);
        set_xfcc(&mut h, mode, el);
        let got = h
            .get("x-forwarded-client-cert")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(got, want, "{mode:?} {given:?}");
    }
}

#[test]
fn xfcc_element_names_both_sides() {
    let peer = Peer {
        uris: vec!["spiffe://td/ns/default/dc/dc1/svc/web".into()],
        subject: "CN=we\"b".into(),
        id: None,
    };
    let e = xfcc_element("spiffe://td/ns/default/dc/dc1/svc/api", b"der", &peer);
    // sha256("der")
    let hash = ring::digest::digest(&ring::digest::SHA256, b"der");
    assert_eq!(hash.as_ref().len(), 32);
    assert!(
        e.starts_with("By=spiffe://td/ns/default/dc/dc1/svc/api;Hash="),
        "{e}"
    );
    assert!(
        e.contains(";Subject=\"CN=we\\\"b\";URI=spiffe://td/ns/default/dc/dc1/svc/web"),
        "{e}"
    );
    let hex = &e["By=spiffe://td/ns/default/dc/dc1/svc/api;Hash=".len()..][..64];
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
    assert_ne!(hex, "0".repeat(64));
}

#[test]
fn view_joins_repeated_headers() {
    let h = hm(&[("x-a", "1"), ("x-a", "2"), ("x-b", "3")]);
    let v = View {
        method: "GET",
        path: "/",
        authority: "api",
        headers: &h,
    };
    assert_eq!(v.header("x-a").as_deref(), Some("1,2"));
    assert_eq!(v.header("x-b").as_deref(), Some("3"));
    assert_eq!(v.header("x-c"), None);
}
