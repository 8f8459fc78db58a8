use super::*;

#[test]
fn classify_outputs() {
    assert_eq!(
        classify("iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"),
        ProblemKind::PermissionDenied
    );
    assert_eq!(
        classify("iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)"),
        ProblemKind::PermissionDenied
    );
    // consul-k8s#960: legacy binary on an nf_tables-only kernel.
    assert_eq!(
        classify("iptables-restore v1.8.7 (legacy): can't initialize iptables table `nat': Table does not exist (do you need to insmod?)\nPerhaps iptables or your kernel needs to be upgraded."),
        ProblemKind::MissingKernelSupport
    );
    assert_eq!(
        classify("iptables-nft-restore: Could not process rule: No such file or directory"),
        ProblemKind::MissingKernelSupport
    );
    assert_eq!(
        classify("iptables-nft-restore: line 5 failed: Bad rule (does a matching rule exist in that chain?)."),
        ProblemKind::Other
    );
}

#[test]
fn failed_line_numbers() {
    assert_eq!(
        failed_line("Error occurred at line: 3\nTry `iptables-nft-restore -h'"),
        Some(3)
    );
    assert_eq!(failed_line("iptables-restore: line 5 failed"), Some(5));
    assert_eq!(failed_line("nothing here"), None);
}

#[test]
fn no_backend_lists_every_reason() {
    let m = no_backend_message(&[
        BackendProblem {
            backend: Backend::Nft,
            family: Family::V4,
            kind: ProblemKind::MissingBinary,
            detail: "iptables-nft-restore not found in PATH (/x)".into(),
        },
        BackendProblem {
            backend: Backend::Legacy,
            family: Family::V4,
            kind: ProblemKind::PermissionDenied,
            detail: "denied".into(),
        },
    ]);
    assert_eq!(
        m,
        "no usable iptables nat table
  nft (IPv4): missing binary: iptables-nft-restore not found in PATH (/x)
  legacy (IPv4): permission denied (needs root or the NET_ADMIN capability): denied"
    );
}

#[test]
fn missing_binaries_are_reported() {
    let r = Runner::new(None, Some("/nonexistent-veer-path".into()));
    assert!(r.which("sh").is_none());
    assert!(r.system_default().is_none());
    let p = probe(&r, Backend::Nft, Family::V4).unwrap().unwrap_err();
    assert_eq!(p.kind, ProblemKind::MissingBinary);
    assert!(
        p.detail.contains("iptables-nft-restore not found"),
        "{}",
        p.detail
    );
}

#[test]
fn netns_must_exist() {
    let r = Runner::new(Some("/nonexistent/netns".into()), None);
    let e = r.run(Path::new("/bin/true"), &[], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "network namespace /nonexistent/netns: no such file"
    );
}

#[test]
fn run_reports_status_and_output() {
    let r = Runner::new(None, None);
    let ran = r
        .run(
            Path::new("/bin/sh"),
            &["-c", "cat; echo err >&2; exit 3"],
            Some("in\n"),
        )
        .unwrap();
    assert!(!ran.success);
    assert_eq!(ran.status, "exit status 3");
    assert_eq!(ran.output, "in\nerr");
    assert_eq!(ran.command, "/bin/sh -c cat; echo err >&2; exit 3");
}

#[test]
fn backend_names() {
    assert_eq!("nft".parse::<Backend>(), Ok(Backend::Nft));
    assert_eq!("legacy".parse::<Backend>(), Ok(Backend::Legacy));
    assert!("x".parse::<Backend>().is_err());
    assert_eq!(
        variant_of(Path::new("/usr/sbin/xtables-nft-multi")),
        Backend::Nft
    );
    assert_eq!(
        variant_of(Path::new("/usr/sbin/xtables-legacy-multi")),
        Backend::Legacy
    );
}
