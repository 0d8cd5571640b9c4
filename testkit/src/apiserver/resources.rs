//! Definitions of served resources: built-ins and CRD-declared ones.

use std::collections::BTreeMap;

use serde_json::Value;

/// A printer column (CRD `additionalPrinterColumns`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResourceDef {
    /// "" for the core group.
    pub group: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
    pub storage_version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a status subresource.
    pub status: bool,
    /// Maintains metadata.generation.
    pub generation: bool,
    /// PUT without resourceVersion is allowed.
    pub unconditional_update: bool,
    /// Declared by a CRD (not built in).
    pub custom: bool,
    /// Printer columns per version (custom resources).
    pub columns: BTreeMap<String, Vec<Column>>,
    /// openAPIV3Schema per version (custom resources).
    pub schemas: BTreeMap<String, Value>,
}

impl ResourceDef {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// `secrets` or `scgtokens.scgtoken.io`, as used in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Group name for counters: "core" for the legacy group.
    pub fn counter_group(&self) -> &str {
        if self.group.is_empty() {
            "core"
        } else {
            &self.group
        }
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.iter().any(|v| v == version)
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    singular: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        versions: vec![version.into()],
        storage_version: version.into(),
        plural: plural.into(),
        singular: singular.into(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: vec![],
        status,
        generation: false,
        unconditional_update: true,
        custom: false,
        columns: BTreeMap::new(),
        schemas: BTreeMap::new(),
    }
}

pub(crate) fn builtins() -> Vec<ResourceDef> {
    let mut v = vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "namespace",
            "Namespace",
            false,
            &["ns"],
            true,
        ),
        builtin("", "v1", "secrets", "secret", "Secret", true, &[], false),
        builtin("", "v1", "pods", "pod", "Pod", true, &["po"], true),
        builtin(
            "",
            "v1",
            "configmaps",
            "configmap",
            "ConfigMap",
            true,
            &["cm"],
            false,
        ),
        builtin("", "v1", "events", "event", "Event", true, &["ev"], false),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "event",
            "Event",
            true,
            &["ev"],
            false,
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "lease",
            "Lease",
            true,
            &[],
            false,
        ),
    ];
    for (plural, singular, kind, short) in [
        ("deployments", "deployment", "Deployment", "deploy"),
        ("statefulsets", "statefulset", "StatefulSet", "sts"),
        ("daemonsets", "daemonset", "DaemonSet", "ds"),
    ] {
        let mut r = builtin("apps", "v1", plural, singular, kind, true, &[short], true);
        r.generation = true;
        r.categories = vec!["all".into()];
        v.push(r);
    }
    let mut crd = builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "customresourcedefinition",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
    );
    crd.generation = true;
    crd.unconditional_update = false;
    crd.categories = vec!["api-extensions".into()];
    v.push(crd);
    v
}

/// Orders Kubernetes versions like the API server: GA before beta before alpha,
/// higher numbers first, non-conforming names last (alphabetically).
pub(crate) fn version_priority(v: &str) -> (u8, i64, i64, String) {
    let parse = || -> Option<(u8, i64, i64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let major: i64 = digits.parse().ok()?;
        let rest = &rest[digits.len()..];
        if rest.is_empty() {
            return Some((0, -major, 0));
        }
        for (i, tag) in [(1u8, "beta"), (2u8, "alpha")] {
            if let Some(n) = rest.strip_prefix(tag) {
                let minor: i64 = if n.is_empty() { 0 } else { n.parse().ok()? };
                return Some((i, -major, -minor));
            }
        }
        None
    };
    match parse() {
        Some((a, b, c)) => (a, b, c, String::new()),
        None => (3, 0, 0, v.to_string()),
    }
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the resource a CRD declares, or an explanation of why the CRD is invalid.
pub(crate) fn from_crd(crd: &Value) -> Result<ResourceDef, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let group = spec
        .get("group")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let plural = names
        .get("plural")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("spec.names.plural: Required value")?;
    let kind = names
        .get("kind")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("spec.names.kind: Required value")?;
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let list_kind = names
        .get("listKind")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let scope = spec
        .get("scope")
        .and_then(Value::as_str)
        .ok_or("spec.scope: Required value")?;
    let namespaced = match scope {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            return Err(format!(
                "spec.scope: Unsupported value: \"{other}\": supported values: \"Cluster\", \"Namespaced\""
            ));
        }
    };
    let name = crd
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or(
            "spec.versions: Invalid value: must have exactly one version marked as storage version",
        )?;
    let mut served = Vec::new();
    let mut storage = None;
    let mut status = false;
    let mut columns = BTreeMap::new();
    let mut schemas = BTreeMap::new();
    for v in versions {
        let vname = v
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("spec.versions[].name: Required value")?;
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            if storage.is_some() {
                return Err("spec.versions: Invalid value: must have exactly one version marked as storage version".into());
            }
            storage = Some(vname.to_string());
        }
        if v.get("served").and_then(Value::as_bool) == Some(true) {
            served.push(vname.to_string());
        }
        if v.pointer("/subresources/status").is_some() {
            status = true;
        }
        let cols: Vec<Column> = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|c| Column {
                        name: c.get("name").and_then(Value::as_str).unwrap_or("").into(),
                        type_: c
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("string")
                            .into(),
                        format: c.get("format").and_then(Value::as_str).unwrap_or("").into(),
                        description: c
                            .get("description")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        json_path: c
                            .get("jsonPath")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        columns.insert(vname.to_string(), cols);
        if let Some(s) = v.pointer("/schema/openAPIV3Schema") {
            schemas.insert(vname.to_string(), s.clone());
        }
    }
    let storage = storage.ok_or(
        "spec.versions: Invalid value: must have exactly one version marked as storage version",
    )?;
    served.sort_by_key(|v| version_priority(v));
    Ok(ResourceDef {
        group: group.into(),
        versions: served,
        storage_version: storage,
        plural: plural.into(),
        singular,
        kind: kind.into(),
        list_kind,
        namespaced,
        short_names: str_list(names.get("shortNames")),
        categories: str_list(names.get("categories")),
        status,
        generation: true,
        unconditional_update: false,
        custom: true,
        columns,
        schemas,
    })
}
