//! Pure rule generation: [`Config`] → Consul's rule list ([`rules`]) and the
//! `iptables-restore --noflush` texts that apply it idempotently
//! ([`restore_text`]), remove it ([`cleanup_text`]) or undo an apply
//! ([`rollback_text`]), given the table read with `iptables-save -t nat`
//! ([`NatState`]).
//!
//! [`rules`] returns exactly the commands Consul's `sdk/iptables` would run,
//! in the same order (`-N` for the five chains, `-A` and `-I`), so
//! [`Rule::command`] prints them as `iptables -t nat ...` lines. The restore
//! text turns each `-N CHAIN` into a `:CHAIN - [0:0]` declaration (which in a
//! `--noflush` restore creates the chain or flushes it) and puts `-D` lines for
//! the jump rules already present in front, so re-applying replaces rather than
//! duplicates.
use std::fmt;

use crate::config::Config;
use crate::Error;

/// Consul's inbound intercept chain (hooked from `PREROUTING`).
pub const CHAIN_INBOUND: &str = "CONSUL_PROXY_INBOUND";
/// Consul's inbound redirect chain (`REDIRECT` to the inbound port).
pub const CHAIN_IN_REDIRECT: &str = "CONSUL_PROXY_IN_REDIRECT";
/// Consul's outbound intercept chain (hooked from `OUTPUT`).
pub const CHAIN_OUTPUT: &str = "CONSUL_PROXY_OUTPUT";
/// Consul's outbound redirect chain (`REDIRECT` to the outbound port).
pub const CHAIN_REDIRECT: &str = "CONSUL_PROXY_REDIRECT";
/// Consul's DNS chain (`DNAT` of port 53).
pub const CHAIN_DNS: &str = "CONSUL_DNS_REDIRECT";
/// The five chains, in the order Consul creates them.
pub const CHAINS: [&str; 5] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
    CHAIN_DNS,
];
/// The built-in chains of the `nat` table.
pub const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// An address family: which of `iptables` / `ip6tables` a rule set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `iptables` or `ip6tables`.
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The loopback exemption Consul uses: `127.0.0.1/32` or `::1/128`.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn loopback_addr(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1",
            Family::V6 => "::1",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One Consul command: the arguments after `iptables -t nat`, e.g.
/// `["-A", "OUTPUT", "-p", "tcp", "-j", "CONSUL_PROXY_OUTPUT"]`. Every argument
/// is a single token without whitespace or quotes (the config is validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<String>);

impl Rule {
    fn new(args: &[&str]) -> Rule {
        Rule(args.iter().map(|s| s.to_string()).collect())
    }

    /// The arguments after `-t nat`.
    pub fn args(&self) -> &[String] {
        &self.0
    }

    /// The command Consul would run, e.g. `iptables -t nat -N CONSUL_PROXY_INBOUND`.
    pub fn command(&self, family: Family) -> String {
        format!("{} -t nat {}", family.command(), self)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// The families a configuration is applied to: IPv4, plus IPv6 when dual stack.
pub fn families(cfg: &Config) -> Vec<Family> {
    if cfg.dual_stack {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Consul's rule list for one family, in Consul's order (reference §1.2–§1.4).
///
/// As in Consul's dual-stack setup, DNS rules go to the IPv4 list only when
/// not dual stack and to the IPv6 list only when dual stack. Exclusion CIDRs
/// go to the list of their own family. The configuration is validated first.
pub fn rules(cfg: &Config, family: Family) -> Result<Vec<Rule>, Error> {
    cfg.validate()?;
    let mut r = Vec::new();
    // 1. chains: always all five.
    for c in CHAINS {
        r.push(Rule::new(&["-N", c]));
    }
    // 2. outbound.
    let outbound = cfg.outbound_port().to_string();
    r.push(Rule::new(&[
        "-A",
        CHAIN_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-port",
        &outbound,
    ]));
    let dns_here = match family {
        Family::V4 => !cfg.dual_stack,
        Family::V6 => cfg.dual_stack,
    };
    if dns_here {
        dns_rules(cfg, family, &mut r);
    }
    r.push(Rule::new(&[
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        CHAIN_OUTPUT,
    ]));
    r.push(Rule::new(&[
        "-A",
        CHAIN_OUTPUT,
        "-m",
        "owner",
        "--uid-owner",
        &cfg.proxy_user_id,
        "-j",
        "RETURN",
    ]));
    r.push(Rule::new(&[
        "-A",
        CHAIN_OUTPUT,
        "-d",
        family.loopback(),
        "-j",
        "RETURN",
    ]));
    r.push(Rule::new(&["-A", CHAIN_OUTPUT, "-j", CHAIN_REDIRECT]));
    // Exclusions are inserted at the top, in this order: ports, CIDRs, UIDs.
    for p in &cfg.exclude_outbound_ports {
        r.push(Rule::new(&[
            "-I",
            CHAIN_OUTPUT,
            "-p",
            "tcp",
            "--dport",
            p,
            "-j",
            "RETURN",
        ]));
    }
    for c in &cfg.exclude_outbound_cidrs {
        let is_v6 = crate::config::parse_cidr(c)?.is_ipv6();
        if is_v6 == (family == Family::V6) {
            r.push(Rule::new(&["-I", CHAIN_OUTPUT, "-d", c, "-j", "RETURN"]));
        }
    }
    for u in &cfg.exclude_uids {
        r.push(Rule::new(&[
            "-I",
            CHAIN_OUTPUT,
            "-m",
            "owner",
            "--uid-owner",
            u,
            "-j",
            "RETURN",
        ]));
    }
    // 3. inbound.
    let inbound = cfg.proxy_inbound_port.to_string();
    r.push(Rule::new(&[
        "-A",
        CHAIN_IN_REDIRECT,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-port",
        &inbound,
    ]));
    r.push(Rule::new(&[
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-j",
        CHAIN_INBOUND,
    ]));
    r.push(Rule::new(&[
        "-A",
        CHAIN_INBOUND,
        "-p",
        "tcp",
        "-j",
        CHAIN_IN_REDIRECT,
    ]));
    for p in &cfg.exclude_inbound_ports {
        r.push(Rule::new(&[
            "-I",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "--dport",
            p,
            "-j",
            "RETURN",
        ]));
    }
    Ok(r)
}

/// Consul's DNS variants (reference §1.3): IP only rewrites all port-53
/// traffic to that IP; a port (with the given IP or the loopback address)
/// rewrites only queries sent to that IP's port 53; neither adds nothing.
fn dns_rules(cfg: &Config, family: Family, r: &mut Vec<Rule>) {
    let has_ip = !cfg.consul_dns_ip.is_empty();
    if cfg.consul_dns_port != 0 {
        let ip = if has_ip {
            cfg.consul_dns_ip.as_str()
        } else {
            family.loopback_addr()
        };
        let to = match family {
            Family::V4 => format!("{ip}:{}", cfg.consul_dns_port),
            Family::V6 => format!("[{ip}]:{}", cfg.consul_dns_port),
        };
        for proto in ["udp", "tcp"] {
            r.push(Rule::new(&[
                "-A",
                CHAIN_DNS,
                "-p",
                proto,
                "-d",
                ip,
                "--dport",
                "53",
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]));
        }
        for proto in ["udp", "tcp"] {
            r.push(Rule::new(&[
                "-A", "OUTPUT", "-p", proto, "-d", ip, "--dport", "53", "-j", CHAIN_DNS,
            ]));
        }
    } else if has_ip {
        for proto in ["udp", "tcp"] {
            r.push(Rule::new(&[
                "-A",
                CHAIN_DNS,
                "-p",
                proto,
                "--dport",
                "53",
                "-j",
                "DNAT",
                "--to-destination",
                &cfg.consul_dns_ip,
            ]));
        }
        for proto in ["udp", "tcp"] {
            r.push(Rule::new(&[
                "-A", "OUTPUT", "-p", proto, "--dport", "53", "-j", CHAIN_DNS,
            ]));
        }
    }
}

/// One `-A CHAIN spec` line of `iptables-save`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    /// The chain the rule is in.
    pub chain: String,
    /// Everything after `-A CHAIN `, verbatim (iptables-save quoting kept).
    pub spec: String,
    /// The `-j`/`-g` target, if any.
    pub target: Option<String>,
}

impl SavedRule {
    fn targets_consul(&self) -> bool {
        self.target.as_deref().is_some_and(|t| CHAINS.contains(&t))
    }
}

/// The `nat` table as `iptables-save -t nat` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    /// Every chain declared (`:NAME ...`), built-in and user-defined.
    pub chains: Vec<String>,
    /// Every rule, in order.
    pub rules: Vec<SavedRule>,
}

impl NatState {
    /// Parses the `*nat` section of `iptables-save` output (other tables and
    /// comment lines are ignored).
    pub fn parse(save: &str) -> NatState {
        let mut st = NatState::default();
        let mut in_nat = false;
        for line in save.lines() {
            let line = line.trim_end();
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
                continue;
            }
            if !in_nat || line.starts_with('#') {
                continue;
            }
            if line == "COMMIT" {
                in_nat = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    st.chains.push(name.to_string());
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                let tokens = tokenize(spec);
                let target = tokens
                    .windows(2)
                    .find(|w| w[0] == "-j" || w[0] == "-g" || w[0] == "--jump" || w[0] == "--goto")
                    .map(|w| w[1].clone());
                st.rules.push(SavedRule {
                    chain: chain.to_string(),
                    spec: spec.to_string(),
                    target,
                });
            }
        }
        st
    }

    /// Consul chains present in the table.
    pub fn consul_chains(&self) -> Vec<&str> {
        CHAINS
            .into_iter()
            .filter(|c| self.chains.iter().any(|d| d == c))
            .collect()
    }

    /// Rules outside the Consul chains that jump to one of them; with
    /// `builtin_only`, only those in `PREROUTING`/`INPUT`/`OUTPUT`/`POSTROUTING`.
    pub fn consul_jumps(&self, builtin_only: bool) -> impl Iterator<Item = &SavedRule> {
        self.rules.iter().filter(move |r| {
            r.targets_consul()
                && !CHAINS.contains(&r.chain.as_str())
                && (!builtin_only || BUILTIN_CHAINS.contains(&r.chain.as_str()))
        })
    }

    /// True when any Consul chain or jump to one exists.
    pub fn has_consul(&self) -> bool {
        !self.consul_chains().is_empty() || self.consul_jumps(false).next().is_some()
    }
}

/// Splits an iptables-save rule spec into tokens, honouring its `"..."`
/// quoting (with `\"` escapes) so quoted comments are one token.
fn tokenize(spec: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = spec.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    out.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        out.push(cur);
    }
    out
}

const HEADER: &str =
    "# veer redirect-traffic: Consul transparent-proxy rules (iptables-restore --noflush)";

/// The `iptables-restore --noflush` input that makes the `nat` table hold
/// exactly `rules` (from [`rules`]) in the Consul chains, whatever Consul state
/// `current` has: the chains are declared (created or flushed), jump rules to
/// them already in the built-in chains are deleted, then `rules` are added in
/// Consul's order. Applying it twice gives the same table as applying it once.
pub fn restore_text(rules: &[Rule], current: &NatState) -> String {
    let mut t = String::new();
    t.push_str(HEADER);
    t.push_str("\n*nat\n");
    for r in rules {
        if let [n, chain] = r.args() {
            if n == "-N" {
                t.push_str(&format!(":{chain} - [0:0]\n"));
            }
        }
    }
    for j in current.consul_jumps(true) {
        t.push_str(&format!("-D {} {}\n", j.chain, j.spec));
    }
    for r in rules {
        if r.args().first().map(String::as_str) != Some("-N") {
            t.push_str(&format!("{r}\n"));
        }
    }
    t.push_str("COMMIT\n");
    t
}

/// The `iptables-restore --noflush` input that removes the five Consul chains
/// and every rule (in any other chain) jumping to them, and nothing else.
/// Idempotent: with no Consul state it changes nothing.
pub fn cleanup_text(current: &NatState) -> String {
    let mut t = String::new();
    t.push_str("# veer redirect-traffic cleanup: remove Consul's chains and hooks\n*nat\n");
    for c in CHAINS {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    for j in current.consul_jumps(false) {
        t.push_str(&format!("-D {} {}\n", j.chain, j.spec));
    }
    for c in CHAINS {
        t.push_str(&format!("-X {c}\n"));
    }
    t.push_str("COMMIT\n");
    t
}

/// The `iptables-restore --noflush` input that puts the Consul part of the
/// table back from `current` to `previous` (used when the IPv6 commit of a
/// dual-stack apply fails after IPv4 was committed): Consul chains get their
/// previous rules or are removed, built-in jumps are re-inserted at their
/// previous positions.
pub fn rollback_text(previous: &NatState, current: &NatState) -> String {
    let mut t = String::new();
    t.push_str("# veer redirect-traffic rollback: restore the previous Consul rules\n*nat\n");
    for c in CHAINS {
        t.push_str(&format!(":{c} - [0:0]\n"));
    }
    for j in current.consul_jumps(true) {
        t.push_str(&format!("-D {} {}\n", j.chain, j.spec));
    }
    let existed = previous.consul_chains();
    for c in CHAINS {
        if existed.contains(&c) {
            for r in previous.rules.iter().filter(|r| r.chain == c) {
                t.push_str(&format!("-A {c} {}\n", r.spec));
            }
        } else {
            t.push_str(&format!("-X {c}\n"));
        }
    }
    for b in BUILTIN_CHAINS {
        for (i, r) in previous.rules.iter().filter(|r| r.chain == b).enumerate() {
            if r.targets_consul() {
                t.push_str(&format!("-I {b} {} {}\n", i + 1, r.spec));
            }
        }
    }
    t.push_str("COMMIT\n");
    t
}

#[cfg(test)]
mod tests;
