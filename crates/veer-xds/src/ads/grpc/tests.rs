use super::*;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse;

fn resp(nonce: &str, pad: usize) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        nonce: nonce.into(),
        system_version_info: "x".repeat(pad),
        ..Default::default()
    }
}

fn decode(b: Bytes) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse::decode(b).unwrap()
}

#[test]
fn messages_are_taken_whole_however_the_bytes_arrive() {
    let a = frame(&resp("a", 10));
    let b = frame(&resp("b", 3000));
    let all: Vec<u8> = [a.as_ref(), b.as_ref()].concat();
    // Every split of the two frames into two reads gives both, in order.
    for cut in 0..=all.len() {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for part in [&all[..cut], &all[cut..]] {
            buf.extend_from_slice(part);
            while let Some(m) = take_message(&mut buf, 1 << 20).unwrap() {
                got.push(decode(m).nonce);
            }
        }
        assert_eq!(got, ["a", "b"], "cut at {cut}");
        assert!(buf.is_empty());
    }
}

#[test]
fn refusals() {
    let cases: [(&[u8], &str, Code); 2] = [
        (&[1, 0, 0, 0, 1, 0], "compressed", Code::Internal),
        (&[0, 0, 0, 4, 1], "over the limit of 1024", Code::OutOfRange),
    ];
    for (bytes, says, code) in cases {
        let mut buf = BytesMut::from(bytes);
        let e = take_message(&mut buf, 1024).unwrap_err();
        assert_eq!(e.code(), code, "{bytes:?}");
        assert!(e.message().contains(says), "{bytes:?}: {}", e.message());
    }
}

#[test]
fn a_large_message_does_not_keep_its_buffer() {
    let big = frame(&resp("big", 4 << 20));
    let mut buf = BytesMut::new();
    // As the server sends it: 16 KiB frames.
    let mut got = None;
    for chunk in big.chunks(16 * 1024) {
        buf.extend_from_slice(chunk);
        if let Some(m) = take_message(&mut buf, 16 << 20).unwrap() {
            got = Some(m);
        }
    }
    let m = got.expect("the message");
    assert_eq!(decode(m).nonce, "big");
    assert_eq!(buf.capacity(), 0, "the 4 MiB buffer was given back");
    // A small one afterwards keeps its (small) buffer.
    buf.extend_from_slice(&frame(&resp("small", 10)));
    let small = take_message(&mut buf, 1 << 20).unwrap().unwrap();
    assert_eq!(decode(small).nonce, "small");
    assert!(buf.capacity() <= KEEP_BUFFER);
}
