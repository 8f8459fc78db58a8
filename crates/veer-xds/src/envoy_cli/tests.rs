use super::*;

fn p(args: &[&str]) -> EnvoyArgs {
    parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// consul-dataplane's log patterns (pkg/envoy/proxy.go, HEAD 28a963a).
const DP_PLAIN: &str = "%Y-%m-%dT%T.%eZ%z [%l] envoy.%n(%t) %v";
const DP_JSON: &str = r#"{"@timestamp":"%Y-%m-%dT%T.%fZ%z","@module":"envoy.%n","@level":"%l","@message":"%j","thread":%t}"#;

/// consul-dataplane >= v1.3.0 (and v1.0.6+, v1.1.5+, v1.2.2+):
/// `--config-yaml <json> --log-format … --log-level … --disable-hot-restart
/// [extra] "--concurrency 2" "--drain-time-s 30" "--drain-strategy immediate"`,
/// the last three in Go map order (random): every order must parse alike.
#[test]
fn consul_dataplane_current_shape_in_every_order() {
    let tail = [
        "--concurrency 2",
        "--drain-time-s 30",
        "--drain-strategy immediate",
    ];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for o in orders {
        let mut argv = vec![
            "--config-yaml",
            "{\"node\":{}}",
            "--log-format",
            DP_PLAIN,
            "--log-level",
            "info",
            "--disable-hot-restart",
        ];
        argv.extend(o.iter().map(|&i| tail[i]));
        let a = p(&argv);
        assert_eq!(a.mode, Mode::Serve);
        assert_eq!(a.config_yaml.as_deref(), Some("{\"node\":{}}"));
        assert_eq!(a.concurrency, Some(2), "{o:?}");
        assert_eq!(a.drain_time, Some(Duration::from_secs(30)));
        assert_eq!(a.drain_strategy, DrainStrategy::Immediate);
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.log_level, LogLevel::Info);
        assert!(a.warnings.is_empty());
    }
}

/// consul-dataplane before 45453c1 (v1.0.0–v1.0.5, v1.1.0–v1.1.4, v1.2.0–1):
/// `--config-path <fifo> --log-format … --log-level … --disable-hot-restart
/// [extra]`, plus consul-k8s' `--base-id` for multi-port pods.
#[test]
fn consul_dataplane_fifo_shape_with_json_logs_and_extra_args() {
    let a = p(&[
        "--config-path",
        "/consul/connect-inject/envoy-1a2b-bootstrap.json",
        "--log-format",
        DP_JSON,
        "--log-level",
        "debug",
        "--disable-hot-restart",
        "--base-id",
        "1",
        "--concurrency 2",
    ]);
    assert_eq!(
        a.config_path,
        Some(PathBuf::from(
            "/consul/connect-inject/envoy-1a2b-bootstrap.json"
        ))
    );
    assert_eq!(a.log_format, LogFormat::Json);
    assert_eq!(a.log_level, LogLevel::Debug);
    assert_eq!(a.concurrency, Some(2));
    assert!(
        a.ignored.iter().any(|i| i == "--base-id 1"),
        "{:?}",
        a.ignored
    );
}

/// `consul connect envoy`: `--config-path <fifo> --disable-hot-restart [args after --]`.
#[test]
fn consul_connect_envoy_shape() {
    let a = p(&[
        "--config-path",
        "/tmp/envoy-0123abcd-bootstrap.json",
        "--disable-hot-restart",
        "-l",
        "warning",
    ]);
    assert_eq!(
        a.config_path.as_deref(),
        Some(std::path::Path::new("/tmp/envoy-0123abcd-bootstrap.json"))
    );
    assert_eq!(a.log_level, LogLevel::Warn);
    assert_eq!(a.mode, Mode::Serve);
}

/// A user's `--concurrency` in the extra args comes before
/// consul-dataplane's appended one: the first wins, with a warning.
#[test]
fn repeated_flag_keeps_the_first_value() {
    let a = p(&[
        "--config-yaml",
        "{}",
        "--concurrency",
        "4",
        "--concurrency 2",
    ]);
    assert_eq!(a.concurrency, Some(4));
    assert_eq!(a.warnings.len(), 1);
    assert!(a.warnings[0].contains("--concurrency"), "{:?}", a.warnings);
}

#[test]
fn equals_and_short_forms() {
    let a = p(&["-c", "/b.yaml", "--log-level=trace", "--mode=validate"]);
    assert_eq!(a.config_path, Some(PathBuf::from("/b.yaml")));
    assert_eq!(a.log_level, LogLevel::Trace);
    assert_eq!(a.mode, Mode::Validate);
    let a = p(&["-l", "off", "--config-path=/x.json"]);
    assert_eq!(a.log_level, LogLevel::Off);
    assert_eq!(a.config_path, Some(PathBuf::from("/x.json")));
}

#[test]
fn every_envoy_log_level() {
    for (s, l, f) in [
        ("trace", LogLevel::Trace, "trace"),
        ("debug", LogLevel::Debug, "debug"),
        ("info", LogLevel::Info, "info"),
        ("warning", LogLevel::Warn, "warn"),
        ("warn", LogLevel::Warn, "warn"),
        ("error", LogLevel::Error, "error"),
        ("critical", LogLevel::Critical, "error"),
        ("off", LogLevel::Off, "off"),
    ] {
        let a = p(&["--log-level", s]);
        assert_eq!(a.log_level, l, "{s}");
        assert_eq!(a.log_level.as_filter(), f);
    }
    assert!(matches!(
        parse(&["--log-level", "loud"]),
        Err(CliError::BadValue { .. })
    ));
}

#[test]
fn log_format_patterns() {
    assert_eq!(LogFormat::from_pattern(DP_PLAIN), LogFormat::Text);
    assert_eq!(LogFormat::from_pattern(DP_JSON), LogFormat::Json);
    assert_eq!(
        LogFormat::from_pattern("[%Y-%m-%d %T.%e][%t][%l][%n] %v"),
        LogFormat::Text
    );
    assert_eq!(
        LogFormat::from_pattern(r#"{"msg":"%v","lvl":"%l"}"#),
        LogFormat::Json
    );
}

#[test]
fn component_log_levels() {
    let a = p(&["--component-log-level", "upstream:debug,connection:trace"]);
    assert_eq!(
        a.component_log_levels,
        vec![
            ("upstream".to_string(), LogLevel::Debug),
            ("connection".to_string(), LogLevel::Trace)
        ]
    );
    assert!(parse(&["--component-log-level", "upstream"]).is_err());
}

#[test]
fn errors_name_the_flag() {
    let e = parse(&["--config-yaml", "{}", "--frobnicate", "3"]).unwrap_err();
    assert_eq!(e, CliError::UnknownFlag("--frobnicate".into()));
    assert!(e.to_string().contains("--frobnicate"));
    assert_eq!(e.classify(), "unknown_flag");
    let e = parse(&["--concurrency"]).unwrap_err();
    assert_eq!(e, CliError::MissingValue("--concurrency".into()));
    let e = parse(&["--concurrency", "two"]).unwrap_err();
    assert!(e.to_string().contains("--concurrency"), "{e}");
    let e = parse(&["--disable-hot-restart=yes"]).unwrap_err();
    assert_eq!(e, CliError::UnexpectedValue("--disable-hot-restart".into()));
    let e = parse(&["bootstrap.json"]).unwrap_err();
    assert_eq!(e.classify(), "positional");
    let e = parse(&["--drain-strategy", "slow"]).unwrap_err();
    assert!(e.to_string().contains("gradual or immediate"), "{e}");
    let e = parse(&["--mode", "run"]).unwrap_err();
    assert!(e.to_string().contains("--mode"), "{e}");
}

#[test]
fn hot_restart_is_refused_but_epoch_zero_is_fine() {
    assert_eq!(p(&["--restart-epoch", "0"]).mode, Mode::Serve);
    let e = parse(&["--restart-epoch", "1"]).unwrap_err();
    assert_eq!(e.classify(), "unsupported");
}

#[test]
fn version_and_modes() {
    assert_eq!(p(&["--version"]).mode, Mode::Version);
    assert_eq!(p(&["--hot-restart-version"]).mode, Mode::HotRestartVersion);
    assert_eq!(p(&["--mode", "validate", "--version"]).mode, Mode::Version);
    assert_eq!(p(&["--mode", "init_only"]).mode, Mode::InitOnly);
    assert_eq!(p(&["-h"]).mode, Mode::Help);
}

/// Consul's `parseEnvoyVersionNumber` (v1.16.0 command/connect/envoy/exec.go)
/// takes the first `(\d+\.\d+\.\d+)`: it must be the Envoy version, not
/// veer's own.
#[test]
fn version_line_puts_the_envoy_version_first() {
    let line = version_line(DEFAULT_ENVOY_VERSION, "0.1.0");
    let first = first_semver(&line).unwrap();
    assert_eq!(first, DEFAULT_ENVOY_VERSION);
    assert!(line.contains("veer 0.1.0"));
    // Consul 1.16 accepts minors 1.23..=1.26.
    let minor: u32 = first.split('.').nth(1).unwrap().parse().unwrap();
    assert!((23..=26).contains(&minor));
    assert_eq!(envoy_version(Some("1.31.2")).unwrap(), "1.31.2");
    assert_eq!(envoy_version(None).unwrap(), DEFAULT_ENVOY_VERSION);
    assert!(envoy_version(Some("1.31")).is_err());
    assert!(envoy_version(Some("v1.31.0")).is_err());
}

/// The first `\d+\.\d+\.\d+` in `s`, as Go's regexp finds it.
fn first_semver(s: &str) -> Option<String> {
    let b = s.as_bytes();
    for start in 0..b.len() {
        if !b[start].is_ascii_digit() || (start > 0 && b[start - 1].is_ascii_digit()) {
            continue;
        }
        let mut parts = 0;
        let mut i = start;
        loop {
            let d = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i == d {
                break;
            }
            parts += 1;
            if parts == 3 {
                return Some(s[start..i].to_string());
            }
            if i < b.len() && b[i] == b'.' {
                i += 1;
            } else {
                break;
            }
        }
    }
    None
}

#[test]
fn looks_like_envoy_by_first_argument() {
    assert!(looks_like_envoy(&["--config-yaml", "{}"]));
    assert!(looks_like_envoy(&["-c", "/b.json"]));
    assert!(looks_like_envoy(&["--version"]));
    assert!(looks_like_envoy(&["--mode=validate"]));
    assert!(looks_like_envoy(&["--concurrency 2"]));
    assert!(!looks_like_envoy(&["run", "--config", "x"]));
    assert!(!looks_like_envoy(&["--help"]));
    assert!(!looks_like_envoy::<&str>(&[]));
    assert!(!looks_like_envoy(&["--frobnicate"]));
}
