//! Envoy's stat names and tag extraction, for the `envoy_*` metrics that
//! Consul's UI, dashboards and alerts read.
//!
//! Envoy names a stat with dots (`cluster.<cluster>.upstream_cx_total`,
//! `tcp.<stat_prefix>.downstream_cx_total`), then runs tag extractors over
//! the name: each one that matches adds a tag (a Prometheus label) and cuts
//! a part out of the name. What is left, dots made underscores and prefixed
//! `envoy_`, is the Prometheus metric name. Consul's bootstrap adds its own
//! extractors (`stats_config.stats_tags`): regular expressions that take
//! `consul_destination_service` and friends out of cluster names,
//! `consul_upstream_*` out of upstream listeners' TCP stat prefixes, and
//! fixed tags (`local_cluster`, `consul_source_service`, ...).
//!
//! [`TagRules`] is that list: read from a bootstrap's `stats_config`
//! ([`TagRules::from_stats_config`], regular expressions applied with
//! Envoy's rule: the first capture group is cut out of the name, the second
//! (or the first when there is one) is the value), or built for the TOML
//! and Consul agent sources ([`TagRules::consul`]), which extracts the same
//! tags from Consul's naming scheme without regular expressions. Envoy's
//! own default extractors for the stats veer emits (`envoy.cluster_name`,
//! `envoy.tcp_prefix`, `envoy.listener_address`, `envoy.rbac_prefix`) come
//! with each [`StatName`].
//!
//! Tags are extracted once per series, when it is created (the first use of
//! an upstream), never per connection.
use crate::spiffe::ServiceId;
use std::net::SocketAddr;
use std::ops::Range;

#[cfg(test)]
mod tests;

/// One tag extractor.
#[derive(Clone, Debug)]
pub enum TagRule {
    /// A tag with the same value on every stat (`fixed_value`).
    Fixed { name: String, value: String },
    /// Envoy's regex extractor.
    Regex { name: String, regex: regex::Regex },
    /// Consul's resource tags (`consul.destination.*` from cluster names,
    /// `consul.upstream.*` from upstream TCP stat prefixes), computed from
    /// Consul's naming scheme: what the regular expressions of its
    /// bootstrap extract from the names veer produces.
    ConsulResources,
}

impl TagRule {
    fn name(&self) -> Option<&str> {
        match self {
            TagRule::Fixed { name, .. } | TagRule::Regex { name, .. } => Some(name),
            TagRule::ConsulResources => None,
        }
    }
}

/// The tag extractors in force, in order.
#[derive(Clone, Debug, Default)]
pub struct TagRules {
    rules: Vec<TagRule>,
}

/// Where a stat comes from; what [`TagRule::ConsulResources`] reads.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resource {
    None,
    Cluster(String),
    TcpPrefix(String),
}

/// A stat's Envoy name with its Envoy default tag.
#[derive(Clone, Debug)]
pub struct StatName {
    text: String,
    default: Option<(&'static str, Range<usize>, Range<usize>)>,
    resource: Resource,
}

/// A stat's Prometheus name and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tagged {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// The first dot-separated token of `s` starting at `at`: (value range,
/// range cut out of the name, its dot included).
fn first_token(text: &str, at: usize) -> (Range<usize>, Range<usize>) {
    let end = text[at..].find('.').map_or(text.len(), |i| at + i);
    (at..end, at..(end + 1).min(text.len()))
}

impl StatName {
    /// `cluster.<cluster>.<stat>`; Envoy's `envoy.cluster_name` tag is the
    /// cluster name's first dot-separated token (`api` for Consul's
    /// `api.default.dc1.internal.<trust domain>.consul`).
    pub fn cluster(cluster: &str, stat: &str) -> StatName {
        let text = format!("cluster.{cluster}.{stat}");
        let (v, cut) = first_token(&text, "cluster.".len());
        StatName {
            text,
            default: Some(("envoy.cluster_name", v, cut)),
            resource: Resource::Cluster(cluster.to_string()),
        }
    }

    /// `tcp.<stat_prefix>.<stat>` (the TCP proxy filter); Envoy's
    /// `envoy.tcp_prefix` is the prefix's first token (`upstream` for
    /// Consul's `upstream.api.default.default.dc1`).
    pub fn tcp(prefix: &str, stat: &str) -> StatName {
        let text = format!("tcp.{prefix}.{stat}");
        let (v, cut) = first_token(&text, "tcp.".len());
        StatName {
            text,
            default: Some(("envoy.tcp_prefix", v, cut)),
            resource: Resource::TcpPrefix(prefix.to_string()),
        }
    }

    /// `listener.<ip>_<port>.<stat>`; `envoy.listener_address` is the
    /// whole address (`0.0.0.0_20000`, `[::]_15001`).
    pub fn listener(addr: SocketAddr, stat: &str) -> StatName {
        let a = match addr {
            SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]_{}", a.ip(), a.port()),
        };
        let text = format!("listener.{a}.{stat}");
        let at = "listener.".len();
        let end = at + a.len();
        StatName {
            text,
            default: Some(("envoy.listener_address", at..end, at..end + 1)),
            resource: Resource::None,
        }
    }

    /// `<prefix>.rbac.<stat>` (the network RBAC filter; Consul's prefix is
    /// `connect_authz`); `envoy.rbac_prefix` is the prefix.
    pub fn rbac(prefix: &str, stat: &str) -> StatName {
        let text = format!("{prefix}.rbac.{stat}");
        StatName {
            text,
            default: Some(("envoy.rbac_prefix", 0..prefix.len(), 0..prefix.len() + 1)),
            resource: Resource::None,
        }
    }

    /// `http.<stat_prefix>.<stat>` (the HTTP connection manager);
    /// `envoy.http_conn_manager_prefix` is the prefix's first token
    /// (`public_listener`).
    pub fn http(prefix: &str, stat: &str) -> StatName {
        let text = format!("http.{prefix}.{stat}");
        let (v, cut) = first_token(&text, "http.".len());
        StatName {
            text,
            default: Some(("envoy.http_conn_manager_prefix", v, cut)),
            resource: Resource::None,
        }
    }

    /// `server.<stat>`: no default tag.
    pub fn server(stat: &str) -> StatName {
        StatName {
            text: format!("server.{stat}"),
            default: None,
            resource: Resource::None,
        }
    }

    /// The dotted Envoy name (`/stats` shows it).
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Envoy's Prometheus sanitising: anything but `[a-zA-Z0-9_]` becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Why a `stats_config` cannot be used; names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stats_config.stats_tags[{index}]: {reason}")]
pub struct StatsTagsError {
    pub index: usize,
    pub reason: String,
}

impl TagRules {
    pub fn new(rules: Vec<TagRule>) -> TagRules {
        TagRules { rules }
    }

    pub fn rules(&self) -> &[TagRule] {
        &self.rules
    }

    /// The tags `consul connect envoy` and consul-dataplane put in the
    /// bootstrap for the sidecar of `local`: `local_cluster` and
    /// `consul.source.*` as fixed tags, and Consul's resource tags.
    pub fn consul(local: &ServiceId) -> TagRules {
        let fixed = |n: &str, v: &str| TagRule::Fixed {
            name: n.into(),
            value: v.into(),
        };
        TagRules::new(vec![
            TagRule::ConsulResources,
            fixed("local_cluster", &local.service),
            fixed("consul.source.service", &local.service),
            fixed("consul.source.namespace", &local.namespace),
            fixed("consul.source.partition", &local.partition),
            fixed("consul.source.datacenter", &local.datacenter),
        ])
    }

    /// The extractors of a bootstrap's `stats_config` (its `stats_tags`:
    /// `tag_name` with `regex` or `fixed_value`). Other keys of
    /// `stats_config` do not change the tags and are left to the caller.
    pub fn from_stats_config(v: &serde_json::Value) -> Result<TagRules, StatsTagsError> {
        let mut rules = Vec::new();
        let tags = v
            .get("stats_tags")
            .or_else(|| v.get("statsTags"))
            .cloned()
            .unwrap_or(serde_json::Value::Array(Vec::new()));
        let Some(tags) = tags.as_array() else {
            return Err(StatsTagsError {
                index: 0,
                reason: "stats_tags is not a list".into(),
            });
        };
        for (index, t) in tags.iter().enumerate() {
            let err = |reason: String| StatsTagsError { index, reason };
            let get = |k: &str, alt: &str| {
                t.get(k)
                    .or_else(|| t.get(alt))
                    .map(|x| {
                        x.as_str()
                            .ok_or_else(|| err(format!("{k} is not a string")))
                    })
                    .transpose()
            };
            let name = get("tag_name", "tagName")?.ok_or_else(|| err("no tag_name".into()))?;
            let regex = get("regex", "regex")?;
            let fixed = get("fixed_value", "fixedValue")?;
            let rule = match (regex, fixed) {
                (Some(r), None) => TagRule::Regex {
                    name: name.into(),
                    regex: regex::Regex::new(r)
                        .map_err(|e| err(format!("tag {name:?}: regex: {e}")))?,
                },
                (None, Some(f)) => TagRule::Fixed {
                    name: name.into(),
                    value: f.into(),
                },
                (Some(_), Some(_)) => {
                    return Err(err(format!("tag {name:?} has both regex and fixed_value")))
                }
                // Envoy looks a named default extractor up: the defaults
                // are in force anyway (use_all_default_tags).
                (None, None) => continue,
            };
            rules.push(rule);
        }
        Ok(TagRules { rules })
    }

    /// The Prometheus name and labels of `stat`.
    pub fn tagged(&self, stat: &StatName) -> Tagged {
        let text = &stat.text;
        let mut cut: Vec<Range<usize>> = Vec::new();
        let mut labels: Vec<(String, String)> = Vec::new();
        for rule in &self.rules {
            match rule {
                TagRule::Fixed { name, value } => labels.push((sanitize(name), value.clone())),
                TagRule::Regex { name, regex } => {
                    if let Some(c) = regex.captures(text) {
                        let Some(remove) = c.get(1) else { continue };
                        let value = if c.len() > 2 {
                            c.get(2).map_or("", |m| m.as_str())
                        } else {
                            remove.as_str()
                        };
                        labels.push((sanitize(name), value.to_string()));
                        cut.push(remove.range());
                    }
                }
                TagRule::ConsulResources => consul_resources(stat, &mut labels, &mut cut),
            }
        }
        if let Some((name, value, remove)) = &stat.default {
            let overridden = self.rules.iter().any(|r| r.name() == Some(name));
            if !overridden {
                labels.push((sanitize(name), text[value.clone()].to_string()));
                cut.push(remove.clone());
            }
        }
        let mut name = String::with_capacity(text.len() + 6);
        name.push_str("envoy_");
        let kept: String = text
            .char_indices()
            .filter(|(i, _)| !cut.iter().any(|r| r.contains(i)))
            .map(|(_, c)| c)
            .collect();
        name.push_str(&sanitize(&kept));
        Tagged { name, labels }
    }
}

/// Consul's resource tags for the names veer produces: cluster names
/// `<service>.<namespace>.<datacenter>.internal.<trust domain>` (default
/// partition) or `<service>.<namespace>.<partition>.<datacenter>.internal-v1.<trust domain>`
/// (the trust domain ends in `.consul`), and upstream TCP stat prefixes
/// `upstream.<service>.<namespace>.<partition>.<datacenter>`.
fn consul_resources(
    stat: &StatName,
    labels: &mut Vec<(String, String)>,
    cut: &mut Vec<Range<usize>>,
) {
    let mut tag = |n: &str, v: &str| labels.push((format!("consul_{n}"), v.to_string()));
    match &stat.resource {
        Resource::Cluster(c) => {
            let t: Vec<&str> = c.split('.').collect();
            // ... <routing type>.<trust domain id>.consul
            if t.len() < 6 || t[t.len() - 1] != "consul" {
                return;
            }
            let n = t.len();
            let (rt, td) = (t[n - 3], t[n - 2]);
            let head = &t[..n - 3];
            // Consul's regular expressions try the optional service
            // subset before the optional partition, so in a partition's
            // name (`api.default.ap1.dc1.internal-v1...`) they read the
            // service as the subset, the namespace as the service and the
            // partition as the namespace. Envoy with Consul's bootstrap
            // renders those labels; veer renders the same.
            let (subset, svc, ns, dc) = match (rt, head) {
                ("internal", [svc, ns, dc]) => ("", *svc, *ns, *dc),
                (rt, [a, b, c, dc]) if rt.starts_with("internal") => (*a, *b, *c, *dc),
                _ => return,
            };
            let target = head.join(".");
            let full = format!("{target}.{rt}.{td}");
            tag("destination_custom_hash", "");
            tag("destination_service_subset", subset);
            tag("destination_service", svc);
            tag("destination_namespace", ns);
            tag("destination_partition", "");
            tag("destination_datacenter", dc);
            tag("destination_routing_type", rt);
            tag("destination_trust_domain", td);
            tag("destination_target", &target);
            tag("destination_full_target", &full);
            let at = "cluster.".len();
            cut.push(at..at + c.len() + 1);
        }
        Resource::TcpPrefix(p) => {
            let Some(rest) = p.strip_prefix("upstream.") else {
                return;
            };
            let [svc, ns, ap, dc] = rest.split('.').collect::<Vec<_>>()[..] else {
                return;
            };
            tag("upstream_service", svc);
            tag("upstream_datacenter", dc);
            tag("upstream_namespace", ns);
            tag("upstream_partition", ap);
            let at = "tcp.upstream.".len();
            cut.push(at..at + rest.len() + 1);
        }
        Resource::None => {}
    }
}

/// The TCP stat prefix Consul gives an upstream's listener (and its
/// transparent-proxy filter chain): `upstream.<service>.<namespace>.<partition>.<datacenter>`.
pub fn upstream_tcp_prefix(id: &ServiceId) -> String {
    format!(
        "upstream.{}.{}.{}.{}",
        id.service, id.namespace, id.partition, id.datacenter
    )
}
