//! ring vs aws-lc-rs, through rustls's own provider interfaces (what veer
//! calls), on Consul-shaped certificates (veer-ca: ECDSA P-256 root and
//! leaves with one SPIFFE URI SAN).
//!
//! ```text
//! veer-crypto-bench [--provider ring|aws-lc-rs|both] [--iters N] [--rounds R] [OP...]
//! ```
//!
//! Each op runs `N` times per round (default: its own count), `R` rounds
//! (default 5); the figure is the best round's **thread CPU time** per op
//! (`CLOCK_THREAD_CPUTIME_ID`: time this thread ran, not time it waited for
//! the shared CPU). For instruction counts, run one op with `--rounds 1`
//! under `valgrind --tool=cachegrind --cache-sim=no` at two `--iters` and
//! divide the difference (see README.md); valgrind hides AVX-512 and VAES
//! from the program, so those counts are of the AVX2/AES-NI code paths.
//!
//! Ops: `aes128gcm-16k` (seal + open of one full 16 KiB TLS 1.3 record),
//! `x25519`, `p256-ecdhe`, `x25519mlkem768` (key generation + agreement,
//! one side), `ecdsa-p256-sign`, `ecdsa-p256-verify`, `tls13-full` (a
//! whole TLS 1.3 mTLS handshake, client and server, in memory, with the
//! session tickets) and `tls13-resumed` (the same, resuming a ticket).
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::cipher::{InboundOpaqueMessage, OutboundChunks, OutboundPlainMessage};
use rustls::crypto::{CryptoProvider, SupportedKxGroup, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, ContentType, DigitallySignedStruct,
    NamedGroup, ProtocolVersion, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};
use std::hint::black_box;
use std::sync::Arc;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const OPS: &[(&str, u32)] = &[
    ("aes128gcm-16k", 20_000),
    ("x25519", 5_000),
    ("p256-ecdhe", 5_000),
    ("x25519mlkem768", 2_000),
    ("ecdsa-p256-sign", 5_000),
    ("ecdsa-p256-verify", 5_000),
    ("tls13-full", 500),
    ("tls13-resumed", 1_000),
];

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Ring,
    AwsLc,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Ring => "ring",
            Which::AwsLc => "aws-lc-rs",
        }
    }

    /// The provider as veer configures it: AES-128-GCM first, and the key
    /// exchange groups X25519, P-256 (aws-lc-rs's own default puts the
    /// post-quantum hybrid and P-384 first).
    fn provider(self) -> Arc<CryptoProvider> {
        use rustls::CipherSuite as C;
        let mut p = match self {
            #[allow(deprecated)] // rustls 0.23.48 deprecates ring for its lack of ML-KEM
            Which::Ring => rustls::crypto::ring::default_provider(),
            Which::AwsLc => rustls::crypto::aws_lc_rs::default_provider(),
        };
        let rank = |s: C| match s {
            C::TLS13_AES_128_GCM_SHA256 => 0,
            C::TLS13_CHACHA20_POLY1305_SHA256 => 1,
            C::TLS13_AES_256_GCM_SHA384 => 2,
            _ => 3,
        };
        p.cipher_suites.sort_by_key(|s| rank(s.suite()));
        let rank = |g: NamedGroup| match g {
            NamedGroup::X25519 => 0,
            NamedGroup::secp256r1 => 1,
            NamedGroup::secp384r1 => 2,
            _ => 3,
        };
        p.kx_groups.sort_by_key(|g| rank(g.name()));
        p.kx_groups.retain(|g| rank(g.name()) < 3);
        Arc::new(p)
    }

    fn all_kx(self) -> &'static [&'static dyn SupportedKxGroup] {
        match self {
            Which::Ring => rustls::crypto::ring::ALL_KX_GROUPS,
            Which::AwsLc => rustls::crypto::aws_lc_rs::ALL_KX_GROUPS,
        }
    }

    fn ticketer(self) -> Arc<dyn rustls::server::ProducesTickets> {
        match self {
            Which::Ring => rustls::crypto::ring::Ticketer::new().unwrap(),
            Which::AwsLc => rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
        }
    }
}

/// Certificates and keys of two sidecars, as Consul's CA issues them.
struct Material {
    root: CertificateDer<'static>,
    web: (Vec<CertificateDer<'static>>, String),
    api: (Vec<CertificateDer<'static>>, String),
}

impl Material {
    fn new() -> Material {
        let ca = veer_ca::Ca::new_root(TD).unwrap();
        let leaf = |svc: &str| {
            let l = ca.service_leaf("dc1", svc).unwrap();
            let chain = CertificateDer::pem_slice_iter(l.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            (chain, l.key_pem)
        };
        Material {
            root: CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap(),
            web: leaf("web"),
            api: leaf("api"),
        }
    }

    fn key(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut s = RootCertStore::empty();
        s.add(self.root.clone()).unwrap();
        Arc::new(s)
    }

    fn server(&self, w: Which, tickets: bool) -> Arc<ServerConfig> {
        let p = w.provider();
        let v = WebPkiClientVerifier::builder_with_provider(self.roots(), p.clone())
            .build()
            .unwrap();
        let mut c = ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(v)
            .with_single_cert(self.api.0.clone(), Self::key(&self.api.1))
            .unwrap();
        if tickets {
            c.ticketer = w.ticketer();
            c.send_tls13_tickets = 4;
        } else {
            c.send_tls13_tickets = 0;
        }
        c.enable_secret_extraction = true;
        Arc::new(c)
    }

    fn client(&self, w: Which, resume: bool) -> Arc<ClientConfig> {
        let p = w.provider();
        let v = Arc::new(ChainOnly {
            roots: self.roots(),
            algs: p.signature_verification_algorithms,
        });
        let mut c = ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(v)
            .with_client_auth_cert(self.web.0.clone(), Self::key(&self.web.1))
            .unwrap();
        if !resume {
            c.resumption = rustls::client::Resumption::disabled();
        }
        c.enable_secret_extraction = true;
        Arc::new(c)
    }
}

/// The chain check veer's outbound verifier makes (no DNS name: a Consul
/// leaf has only a URI SAN).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Bytes each side sent during a handshake.
#[derive(Default, Clone, Copy)]
struct Sent {
    client: usize,
    server: usize,
}

/// Runs a handshake in memory to its end, tickets included; returns the
/// two connections and the bytes each side sent.
fn handshake(
    c: &Arc<ClientConfig>,
    s: &Arc<ServerConfig>,
) -> (ClientConnection, ServerConnection, Sent) {
    let name = ServerName::try_from("api.default.dc1.internal.consul").unwrap();
    let mut cl = ClientConnection::new(c.clone(), name).unwrap();
    let mut sv = ServerConnection::new(s.clone()).unwrap();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut sent = Sent::default();
    loop {
        let mut moved = false;
        while cl.wants_write() {
            buf.clear();
            cl.write_tls(&mut buf).unwrap();
            sent.client += buf.len();
            sv.read_tls(&mut &buf[..]).unwrap();
            sv.process_new_packets().unwrap();
            moved = true;
        }
        while sv.wants_write() {
            buf.clear();
            sv.write_tls(&mut buf).unwrap();
            sent.server += buf.len();
            cl.read_tls(&mut &buf[..]).unwrap();
            cl.process_new_packets().unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(!cl.is_handshaking() && !sv.is_handshaking());
    (cl, sv, sent)
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec this function owns.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One op, ready to run: `run(n)` does it `n` times.
type Op = Box<dyn FnMut(u32)>;

fn kx_op(w: Which, group: NamedGroup) -> Option<Op> {
    let g = *w.all_kx().iter().find(|g| g.name() == group)?;
    let peer = g.start().unwrap();
    let peer_pub = peer.pub_key().to_vec();
    if group == NamedGroup::X25519MLKEM768 {
        // A hybrid's client share is a KEM public key; the agreement on the
        // client side decapsulates the server's ciphertext. Time both
        // halves: the client's start + complete and the server's encapsulation.
        return Some(Box::new(move |n| {
            for _ in 0..n {
                let client = g.start().unwrap();
                let server = g.start_and_complete(client.pub_key()).unwrap();
                let secret = client.complete(&server.pub_key).unwrap();
                black_box(secret.secret_bytes());
            }
        }));
    }
    Some(Box::new(move |n| {
        for _ in 0..n {
            let kx = g.start().unwrap();
            black_box(kx.pub_key());
            let secret = kx.complete(&peer_pub).unwrap();
            black_box(secret.secret_bytes());
        }
    }))
}

/// `None`: the provider does not have it.
fn op(w: Which, name: &str, m: &Material) -> Option<Op> {
    let p = w.provider();
    Some(match name {
        "x25519" => return kx_op(w, NamedGroup::X25519),
        "p256-ecdhe" => return kx_op(w, NamedGroup::secp256r1),
        "x25519mlkem768" => return kx_op(w, NamedGroup::X25519MLKEM768),
        "aes128gcm-16k" => {
            let (cl, sv, _) = handshake(&m.client(w, false), &m.server(w, false));
            assert_eq!(
                cl.negotiated_cipher_suite().unwrap().suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            );
            let suite = match cl.negotiated_cipher_suite().unwrap() {
                rustls::SupportedCipherSuite::Tls13(s) => s,
                _ => unreachable!(),
            };
            let (seq, tx) = cl.dangerous_extract_secrets().unwrap().tx;
            let (_, rx) = sv.dangerous_extract_secrets().unwrap().rx;
            let (
                ConnectionTrafficSecrets::Aes128Gcm { key: tk, iv: ti },
                ConnectionTrafficSecrets::Aes128Gcm { key: rk, iv: ri },
            ) = (tx, rx)
            else {
                unreachable!()
            };
            let mut enc = suite.aead_alg.encrypter(tk, ti);
            let mut dec = suite.aead_alg.decrypter(rk, ri);
            let plain = vec![0x5au8; 16 * 1024];
            let mut seq = seq;
            Box::new(move |n| {
                for _ in 0..n {
                    let msg = OutboundPlainMessage {
                        typ: ContentType::ApplicationData,
                        version: ProtocolVersion::TLSv1_2,
                        payload: OutboundChunks::Single(&plain),
                    };
                    let mut wire = enc.encrypt(msg, seq).unwrap().encode();
                    let opaque = InboundOpaqueMessage::new(
                        ContentType::ApplicationData,
                        ProtocolVersion::TLSv1_2,
                        &mut wire[5..],
                    );
                    let out = dec.decrypt(opaque, seq).unwrap();
                    assert_eq!(out.payload.len(), plain.len());
                    seq += 1;
                }
            })
        }
        "ecdsa-p256-sign" | "ecdsa-p256-verify" => {
            let key = p
                .key_provider
                .load_private_key(Material::key(&m.web.1))
                .unwrap();
            let spki = key.public_key().unwrap().to_vec();
            // The uncompressed point ends a P-256 SubjectPublicKeyInfo.
            let point = spki[spki.len() - 65..].to_vec();
            let signer = key
                .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
                .unwrap();
            // What a TLS 1.3 CertificateVerify signs: 64 spaces, a context
            // string, a zero byte and a transcript hash.
            let msg = [0x20u8; 130];
            let sig = signer.sign(&msg).unwrap();
            let verify = p
                .signature_verification_algorithms
                .mapping
                .iter()
                .find(|(s, _)| *s == SignatureScheme::ECDSA_NISTP256_SHA256)
                .unwrap()
                .1[0];
            verify.verify_signature(&point, &msg, &sig).unwrap();
            if name == "ecdsa-p256-sign" {
                Box::new(move |n| {
                    for _ in 0..n {
                        black_box(signer.sign(&msg).unwrap());
                    }
                })
            } else {
                Box::new(move |n| {
                    for _ in 0..n {
                        verify.verify_signature(&point, &msg, &sig).unwrap();
                    }
                })
            }
        }
        "tls13-full" => {
            let (c, s) = (m.client(w, false), m.server(w, true));
            let (cl, _, sent) = handshake(&c, &s);
            assert_eq!(cl.handshake_kind(), Some(rustls::HandshakeKind::Full));
            let (_, _, bare) = handshake(&c, &m.server(w, false));
            eprintln!(
                "{} tls13-full: {:?}, {:?}; client sent {} B, server {} B with 4 tickets, {} B without",
                w.name(),
                cl.negotiated_cipher_suite().unwrap().suite(),
                cl.negotiated_key_exchange_group().unwrap().name(),
                sent.client,
                sent.server,
                bare.server
            );
            Box::new(move |n| {
                for _ in 0..n {
                    black_box(handshake(&c, &s));
                }
            })
        }
        "tls13-resumed" => {
            let (c, s) = (m.client(w, true), m.server(w, true));
            handshake(&c, &s);
            let (cl, sv, sent) = handshake(&c, &s);
            assert_eq!(cl.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
            assert!(sv.peer_certificates().is_some_and(|p| !p.is_empty()));
            eprintln!(
                "{} tls13-resumed: client sent {} B, server {} B (4 tickets)",
                w.name(),
                sent.client,
                sent.server
            );
            Box::new(move |n| {
                for _ in 0..n {
                    let (cl, _, _) = handshake(&c, &s);
                    debug_assert_eq!(cl.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
                    black_box(cl);
                }
            })
        }
        other => panic!(
            "unknown op {other:?}; ops: {:?}",
            OPS.iter().map(|o| o.0).collect::<Vec<_>>()
        ),
    })
}

fn main() {
    let mut which = vec![Which::Ring, Which::AwsLc];
    let mut iters = None;
    let mut rounds = 5u32;
    let mut ops = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--provider" => {
                which = match args.next().as_deref() {
                    Some("ring") => vec![Which::Ring],
                    Some("aws-lc-rs") => vec![Which::AwsLc],
                    Some("both") => vec![Which::Ring, Which::AwsLc],
                    v => panic!("--provider ring|aws-lc-rs|both, not {v:?}"),
                }
            }
            "--iters" => iters = Some(args.next().and_then(|v| v.parse().ok()).expect("--iters N")),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds R")
            }
            op => ops.push(op.to_string()),
        }
    }
    if ops.is_empty() {
        ops = OPS.iter().map(|o| o.0.to_string()).collect();
    }
    let m = Material::new();
    println!("| op | provider | iterations | µs per op (thread CPU, best of {rounds}) |");
    println!("|---|---|---:|---:|");
    for name in &ops {
        let n = iters.unwrap_or_else(|| OPS.iter().find(|o| o.0 == name).map_or(1000, |o| o.1));
        for &w in &which {
            let Some(mut f) = op(w, name, &m) else {
                println!("| {name} | {} | — | not offered |", w.name());
                continue;
            };
            f(n.min(10)); // warm-up
            let mut best = u64::MAX;
            for _ in 0..rounds {
                let t0 = thread_cpu_ns();
                f(n);
                best = best.min(thread_cpu_ns() - t0);
            }
            let us = best as f64 / 1000.0 / n as f64;
            println!("| {name} | {} | {n} | {us:.2} |", w.name());
        }
    }
}
