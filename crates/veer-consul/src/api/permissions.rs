//! L7 intention permissions (Consul ≥ 1.9: `Permissions` of an intention
//! from `/v1/connect/intentions`, or of a `service-intentions` entry's
//! `Sources[]`), sans IO → [`veer_core::l7::Permission`].
//!
//! Shape (Consul v1.16.0 `api/config_entry_intentions.go`,
//! `IntentionPermission`): `{Action, HTTP{PathExact|PathPrefix|PathRegex,
//! Header[{Name, Present|Exact|Prefix|Suffix|Regex, Invert}], Methods[]},
//! JWT}`. The first permission whose match holds decides; none matching =
//! the default action (Consul's docs). Consul 1.8.7 has none of this
//! (`Permissions` is an unknown field there).
//!
//! These are authorization: what veer cannot enforce exactly is refused,
//! never loosened. A permission with a `JWT` requirement (veer checks no
//! JWTs), an action other than allow/deny, a header condition with no
//! kind, more than one path condition, a regex that does not compile or a
//! method that is not a token makes [`parse`] fail; the caller then
//! enforces the whole intention as deny.
use crate::chain::http::{header_match, methods, path_match, RawHeader};
use serde::Deserialize;
use serde_json::Value;
use veer_core::intentions::Action;
use veer_core::l7::{Permission, PermissionMatch};

#[derive(Deserialize)]
struct RawPermission {
    #[serde(rename = "Action", default)]
    action: Option<String>,
    #[serde(rename = "HTTP", default)]
    http: Option<RawHttp>,
    #[serde(rename = "JWT", default)]
    jwt: Option<Value>,
}

#[derive(Deserialize)]
struct RawHttp {
    #[serde(rename = "PathExact", default)]
    path_exact: Option<String>,
    #[serde(rename = "PathPrefix", default)]
    path_prefix: Option<String>,
    #[serde(rename = "PathRegex", default)]
    path_regex: Option<String>,
    #[serde(rename = "Header", default)]
    header: Option<Vec<RawHeader>>,
    #[serde(rename = "Methods", default)]
    methods: Option<Vec<String>>,
}

/// Parses an intention's `Permissions` list; the error names the field
/// (`Permissions[1].HTTP.Header[0].Regex: …`).
pub fn parse(perms: &[Value]) -> Result<Vec<Permission>, String> {
    let mut out = Vec::with_capacity(perms.len());
    for (i, v) in perms.iter().enumerate() {
        let f = format!("Permissions[{i}]");
        let p: RawPermission =
            serde_json::from_value(v.clone()).map_err(|e| format!("{f}: unexpected JSON: {e}"))?;
        if p.jwt.as_ref().is_some_and(|j| !j.is_null()) {
            return Err(format!(
                "{f}.JWT: veer does not check JWTs, so it cannot enforce this permission"
            ));
        }
        let action = match p.action.as_deref().map(str::trim) {
            Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            a => return Err(format!("{f}.Action {a:?} is not allow or deny")),
        };
        let mut m = PermissionMatch::default();
        if let Some(h) = &p.http {
            let paths = [&h.path_exact, &h.path_prefix, &h.path_regex]
                .iter()
                .filter(|p| p.as_deref().is_some_and(|s| !s.is_empty()))
                .count();
            if paths > 1 {
                return Err(format!(
                    "{f}.HTTP: more than one of PathExact, PathPrefix, PathRegex"
                ));
            }
            m.path = path_match(
                &h.path_exact,
                &h.path_prefix,
                &h.path_regex,
                &format!("{f}.HTTP."),
            )?;
            for (j, hd) in h.header.iter().flatten().enumerate() {
                let hf = format!("{f}.HTTP.Header[{j}]");
                match header_match(hd, &hf)? {
                    Some(x) => m.headers.push(x),
                    None => {
                        return Err(format!(
                            "{hf}: none of Present, Exact, Prefix, Suffix, Regex is set"
                        ))
                    }
                }
            }
            m.methods = methods(
                h.methods.as_deref().unwrap_or_default(),
                &format!("{f}.HTTP.Methods"),
            )?;
        }
        out.push(Permission { action, http: m });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
