use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn own_dials_match_the_whole_four_tuple() {
    let own = OwnDials::default();
    let g = own.register(sa("10.77.0.1:35332"), sa("10.77.0.2:20000"), 1);
    // veer's own dial, redirected back.
    assert_eq!(
        own.hops(
            ClientAddr::from(sa("10.77.0.1:35332")),
            OrigDstAddr::from(sa("10.77.0.2:20000"))
        ),
        Some(1)
    );
    // An app's connection that got the same source port for another
    // destination (found by the benchmark) is not veer's.
    assert_eq!(
        own.hops(
            ClientAddr::from(sa("10.77.0.1:35332")),
            OrigDstAddr::from(sa("10.96.0.20:80"))
        ),
        None
    );
    // IPv4-mapped spellings are the same address.
    assert_eq!(
        own.hops(
            ClientAddr::from(sa("[::ffff:10.77.0.1]:35332")),
            OrigDstAddr::from(sa("[::ffff:10.77.0.2]:20000"))
        ),
        Some(1)
    );
    drop(g);
    assert!(own.is_empty());
}
