//! The Markdown report: one row per system, each figure with its ratio to
//! Envoy (E) and to direct (D), then the goals of issue 6 and the details.
use crate::topo::Kind;
use crate::{Results, Settings};
use std::fmt::Write as _;
use std::time::Duration;

type Get = fn(&Results, Option<&Results>) -> Option<f64>;

struct Col {
    title: &'static str,
    get: Get,
    digits: usize,
}

fn f(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if digits == 0 {
        // Thousands separators for rates.
        let s = format!("{:.0}", v);
        let (sign, num) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in num.chars().enumerate() {
            if i > 0 && (num.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return format!("{sign}{out}");
    }
    format!("{v:.digits$}")
}

fn sidecar<T>(r: &Results, v: T) -> Option<T> {
    (r.kind != Kind::Direct).then_some(v)
}

/// A byte-stream (iperf3) figure: none on the HTTP path.
fn stream<T>(r: &Results, v: T) -> Option<T> {
    (!r.kind.is_http()).then_some(v)
}

fn per_conn_kib(r: &Results) -> Option<f64> {
    if r.rss_conns.is_empty() || r.idle_open == 0 {
        return None;
    }
    let grown: i64 = r
        .rss_conns
        .iter()
        .map(|(_, before, after)| *after as i64 - *before as i64)
        .sum();
    Some(grown as f64 / (r.idle_open as f64 * r.rss_conns.len() as f64))
}

fn cols() -> Vec<Col> {
    vec![
        Col {
            title: "keep-alive req/s",
            get: |r, _| Some(r.ka.per_sec),
            digits: 0,
        },
        Col {
            title: "p50 ms",
            get: |r, _| Some(r.lat.p50_ms),
            digits: 3,
        },
        Col {
            title: "p99 ms",
            get: |r, _| Some(r.lat.p99_ms),
            digits: 3,
        },
        Col {
            title: "p99.9 ms",
            get: |r, _| Some(r.lat.p999_ms),
            digits: 3,
        },
        Col {
            title: "added p99 ms",
            get: |r, d| sidecar(r, r.lat.p99_ms - d?.lat.p99_ms),
            digits: 3,
        },
        Col {
            title: "new conn/s",
            get: |r, _| Some(r.nc.per_sec),
            digits: 0,
        },
        Col {
            title: "bulk 1 stream Gbit/s",
            get: |r, _| stream(r, r.bulk1.gbps),
            digits: 2,
        },
        Col {
            title: "bulk 8 streams Gbit/s",
            get: |r, _| stream(r, r.bulk8.gbps),
            digits: 2,
        },
        Col {
            title: "passthrough 1 stream Gbit/s",
            get: |r, _| stream(r, r.pass1.gbps),
            digits: 2,
        },
        Col {
            title: "passthrough 8 streams Gbit/s",
            get: |r, _| stream(r, r.pass8.gbps),
            digits: 2,
        },
        Col {
            title: "RSS idle MiB (both)",
            get: |r, _| {
                sidecar(
                    r,
                    r.rss_idle.iter().map(|x| x.1).sum::<u64>() as f64 / 1024.0,
                )
            },
            digits: 1,
        },
        Col {
            title: "KiB per idle conn per sidecar",
            get: |r, _| per_conn_kib(r),
            digits: 2,
        },
        Col {
            title: "CPU s, whole run (both)",
            get: |r, _| sidecar(r, r.cpu_total),
            digits: 2,
        },
        Col {
            title: "CPU µs/req",
            get: |r, _| sidecar(r, r.ka_cpu / r.ka.done as f64 * 1e6),
            digits: 1,
        },
        Col {
            title: "CPU µs/new conn",
            get: |r, _| sidecar(r, r.nc_cpu / r.nc.done as f64 * 1e6),
            digits: 0,
        },
        Col {
            title: "CPU s/GB (1 stream)",
            get: |r, _| stream(r, r.bulk1.s_per_gb()).and_then(|v| sidecar(r, v)),
            digits: 2,
        },
    ]
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Goal {
    what: &'static str,
    target: &'static str,
    veer: String,
    envoy: String,
    ratio: f64,
    met: bool,
}

fn goals(v: &Results, e: Option<&Results>, d: Option<&Results>) -> Vec<Goal> {
    let mut out = Vec::new();
    let us_req = |r: &Results| r.ka_cpu / r.ka.done as f64 * 1e6;
    if let Some(e) = e {
        let (rv, re) = (1e6 / us_req(v), 1e6 / us_req(e));
        out.push(Goal {
            what: "requests per sidecar CPU second (keep-alive)",
            target: "≥ 1.5× Envoy",
            veer: f(rv, 0),
            envoy: f(re, 0),
            ratio: rv / re,
            met: rv / re >= 1.5,
        });
        if v.kind.is_http() {
            out.push(Goal {
                what: "sidecar CPU per request on the HTTP path (keep-alive)",
                target: "≤ 0.6× Envoy",
                veer: f(us_req(v), 1),
                envoy: f(us_req(e), 1),
                ratio: us_req(v) / us_req(e),
                met: us_req(v) / us_req(e) <= 0.6,
            });
        }
        for (what, bv, be) in [
            (
                "bulk GB per sidecar CPU second, 1 stream",
                v.bulk1.s_per_gb(),
                e.bulk1.s_per_gb(),
            ),
            (
                "bulk GB per sidecar CPU second, 8 streams",
                v.bulk8.s_per_gb(),
                e.bulk8.s_per_gb(),
            ),
        ]
        .into_iter()
        .filter(|_| !v.kind.is_http())
        {
            out.push(Goal {
                what,
                target: "≥ 1.5× Envoy",
                veer: f(1.0 / bv, 2),
                envoy: f(1.0 / be, 2),
                ratio: be / bv,
                met: be / bv >= 1.5,
            });
        }
        if let Some(d) = d {
            let (av, ae) = (v.lat.p99_ms - d.lat.p99_ms, e.lat.p99_ms - d.lat.p99_ms);
            out.push(Goal {
                what: "added p99 latency at the fixed rate (ms)",
                target: "≤ 0.5× Envoy",
                veer: f(av, 3),
                envoy: f(ae, 3),
                ratio: av / ae,
                met: av <= 0.5 * ae,
            });
        }
        out.push(Goal {
            what: "new connections per second",
            target: "≥ 1.5× Envoy",
            veer: f(v.nc.per_sec, 0),
            envoy: f(e.nc.per_sec, 0),
            ratio: v.nc.per_sec / e.nc.per_sec,
            met: v.nc.per_sec >= 1.5 * e.nc.per_sec,
        });
        let rss = |r: &Results| r.rss_idle.iter().map(|x| x.1).sum::<u64>() as f64 / 1024.0;
        out.push(Goal {
            what: "idle RSS, both sidecars (MiB)",
            target: "≤ 0.25× Envoy",
            veer: f(rss(v), 1),
            envoy: f(rss(e), 1),
            ratio: rss(v) / rss(e),
            met: rss(v) <= 0.25 * rss(e),
        });
    }
    if let Some(kib) = per_conn_kib(v) {
        let ek = e.and_then(per_conn_kib).unwrap_or(f64::NAN);
        out.push(Goal {
            what: "KiB per idle connection per sidecar",
            target: "< 8 KiB",
            veer: f(kib, 2),
            envoy: f(ek, 2),
            ratio: kib / ek,
            met: kib < 8.0,
        });
    }
    if let Some(d) = d {
        for (what, pv, pd) in [
            ("passthrough 1 stream vs direct", v.pass1.gbps, d.pass1.gbps),
            (
                "passthrough 8 streams vs direct",
                v.pass8.gbps,
                d.pass8.gbps,
            ),
        ] {
            out.push(Goal {
                what,
                target: "≥ 0.9× direct",
                veer: format!("{} Gbit/s", f(pv, 2)),
                envoy: format!(
                    "{} Gbit/s",
                    f(
                        e.map_or(f64::NAN, |e| if what.contains('8') {
                            e.pass8.gbps
                        } else {
                            e.pass1.gbps
                        }),
                        2
                    )
                ),
                ratio: pv / pd,
                met: pv >= 0.9 * pd,
            });
        }
    }
    out
}

pub fn markdown(results: &[Results], set: &Settings, took: Duration) -> String {
    let find = |k: Kind| results.iter().find(|r| r.kind == k);
    let (d, e, v) = (find(Kind::Direct), find(Kind::Envoy), find(Kind::Veer));
    // The goals table: static veer vs static Envoy; when only the xDS
    // systems ran, veer over xDS vs Envoy over xDS.
    let (gv, ge) = match v {
        Some(v) => (Some(v), e),
        None => match find(Kind::VeerXds) {
            Some(x) => (Some(x), find(Kind::EnvoyXds).or(e)),
            None => (find(Kind::VeerHttp), find(Kind::EnvoyHttp)),
        },
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## veer vs Envoy vs direct ({} sidecar worker thread(s), {} CPUs, one run)\n",
        set.concurrency,
        sh("nproc")
    );
    let under_load: Vec<String> = results
        .iter()
        .filter(|r| r.outside_cpu / r.wall.max(1.0) > 0.1)
        .map(|r| {
            format!(
                "{} ({:.2} cores busy with other work on average; load average {} before)",
                r.kind.name(),
                r.outside_cpu / r.wall.max(1.0),
                r.load_before,
            )
        })
        .collect();
    if !under_load.is_empty() {
        let _ = writeln!(
            md,
            "> **Taken under outside load**: {}. Compare ratios within this run, not absolute figures.\n",
            under_load.join("; ")
        );
    }
    let cols = cols();
    md.push_str("| system |");
    for c in &cols {
        let _ = write!(md, " {} |", c.title);
    }
    md.push_str("\n|---|");
    for _ in &cols {
        md.push_str("---:|");
    }
    md.push('\n');
    for r in results {
        let _ = write!(md, "| {} |", r.kind.name());
        for c in &cols {
            let Some(val) = (c.get)(r, d) else {
                md.push_str(" — |");
                continue;
            };
            let mut cell = f(val, c.digits);
            let mut ratios = Vec::new();
            // veer over xDS is compared with Envoy over xDS, veer's HTTP
            // path with Envoy's, when both ran.
            let e = match r.kind.envoy_peer() {
                Some(k) if k != Kind::Envoy => find(k).or(e),
                _ => e,
            };
            if let Some(e) = e.filter(|_| !r.kind.is_envoy()) {
                if let Some(ev) = (c.get)(e, d) {
                    ratios.push(format!("{:.2}×E", val / ev));
                }
            }
            if let Some(d) = d.filter(|_| r.kind != Kind::Direct) {
                if let Some(dv) = (c.get)(d, Some(d)) {
                    ratios.push(format!("{:.2}×D", val / dv));
                }
            }
            if !ratios.is_empty() {
                let _ = write!(cell, " ({})", ratios.join(", "));
            }
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\nE = ratio to Envoy, D = ratio to direct (no sidecars). Latency at a fixed {} req/s \
         (open loop, {} connections); keep-alive rate closed loop with {} connections; new \
         connections with {} workers; bulk = iperf3 {} s; idle = {} connections held open; \
         CPU = utime+stime of both sidecars.",
        f(set.rate, 0),
        set.rate_conns,
        set.ka_conns,
        set.nc_workers,
        set.bulk_secs,
        f(set.idle as f64, 0)
    );
    if let Some(v) = gv {
        let e = ge;
        let _ = writeln!(
            md,
            "\n### Goals (issue 6; {} vs {})\n",
            v.kind.name(),
            e.map_or("-", |e| e.kind.name())
        );
        md.push_str(
            "| goal | target | veer | Envoy | ratio | met |\n|---|---|---:|---:|---:|---|\n",
        );
        for g in goals(v, e, d) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.2} | {} |",
                g.what,
                g.target,
                g.veer,
                g.envoy,
                g.ratio,
                if g.met { "yes" } else { "**no**" }
            );
        }
    }
    let _ = writeln!(md, "\n### Details\n");
    for r in results {
        let _ = writeln!(
            md,
            "- **{}**: up in {:.0} ms; load average {} → {}; outside CPU {:.1} s in {:.0} s; keep-alive {} req/s ({} errors); \
             fixed rate achieved {:.0}/s, max {:.3} ms, {} samples, {} errors, sidecar CPU {:.1} µs/req; \
             new conn {} errors; idle conns {} open, {} errors; RSS idle {:?} KiB; RSS before/with idle conns {:?} KiB; \
             CPU s/GB: bulk 8 streams {:.2}, passthrough 1/8 streams {:.2}/{:.2}",
            r.kind.name(),
            r.ready_ms,
            r.load_before,
            r.load_after,
            r.outside_cpu,
            r.wall,
            f(r.ka.per_sec, 0),
            r.ka.errors,
            r.lat.achieved,
            r.lat.max_ms,
            r.lat.samples,
            r.lat.errors,
            r.lat_cpu / r.lat.samples.max(1) as f64 * 1e6,
            r.nc.errors,
            r.idle_open,
            r.idle_errors,
            r.rss_idle,
            r.rss_conns,
            r.bulk8.s_per_gb(),
            r.pass1.s_per_gb(),
            r.pass8.s_per_gb(),
        );
        for s in &r.syscalls {
            let _ = writeln!(md, "  - {s}");
        }
    }
    let _ = writeln!(
        md,
        "- machine: {} ({} CPUs), kernel {}; envoy {}; veer {}; whole run {:.0} s",
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        sh("nproc"),
        sh("uname -r"),
        veer_testsupport::tool("envoy").map_or("absent".into(), |p| sh(&format!(
            "{} --version 2>/dev/null | grep -o '[0-9.]*/Clean/[A-Z]*/[A-Za-z]*'",
            p.display()
        ))),
        sh(&format!(
            "cd {} && git rev-parse --short HEAD && (git diff --quiet HEAD || echo '+ uncommitted changes')",
            env!("CARGO_MANIFEST_DIR")
        ))
        .replace('\n', " "),
        took.as_secs_f64()
    );
    md
}
