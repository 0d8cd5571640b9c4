//! The `ScgToken` custom resource: spec, status, defaults and the schema rules the API
//! server enforces. No I/O lives here; runtime validation is in [`crate::policy`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Label put on every target Secret the operator creates; the ownership marker together
/// with [`OWNER_ANNOTATION`]. The operator only writes Secrets that carry it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "scg-token-operator";
/// Annotation on a target Secret naming the `ScgToken` (in the same namespace) it belongs to.
pub const OWNER_ANNOTATION: &str = "scgtoken.io/owner";
/// Annotation on a target Secret: the uid of the `ScgToken` it belongs to. A Secret kept
/// by `deletionPolicy: Retain` outlives its ScgToken; a new ScgToken of the same name is
/// another object, and takes the Secret over only with [`ADOPT_TARGET_ANNOTATION`].
/// Targets written before this annotation existed carry none, and are taken by the
/// ScgToken of their name, which records its uid.
pub const OWNER_UID_ANNOTATION: &str = "scgtoken.io/owner-uid";
/// Annotation on an `ScgToken`, value `"true"`: take over a target Secret that another
/// ScgToken of the same name (an earlier, deleted one) left behind.
pub const ADOPT_TARGET_ANNOTATION: &str = "scgtoken.io/adopt-target";
/// Annotation on an `ScgToken` asking for one immediate refresh. Any new value triggers
/// one refresh: `kubectl annotate scgtoken NAME scgtoken.io/refresh-requested-at="$(date -u +%FT%TZ)" --overwrite`.
pub const REFRESH_REQUEST_ANNOTATION: &str = "scgtoken.io/refresh-requested-at";

/// Label on a token agent's report Lease naming the `ScgToken` (in the Lease's namespace)
/// whose token the agent serves. The operator selects reports by it.
pub const AGENT_SCGTOKEN_LABEL: &str = "scgtoken.io/scgtoken";
/// Annotation on a token agent's report Lease naming the Secret the agent watches.
pub const AGENT_SECRET_ANNOTATION: &str = "scgtoken.io/secret";
/// Annotation on a report Lease: the salted fingerprint of the token the pod serves, the
/// same value as `status.tokenFingerprint` once the pod is current. Absent while the agent
/// serves nothing.
pub const SERVED_FINGERPRINT_ANNOTATION: &str = "scgtoken.io/served-fingerprint";
/// Annotation on a report Lease: when (RFC 3339) the pod started serving that token.
pub const SERVED_SINCE_ANNOTATION: &str = "scgtoken.io/served-since";
/// Annotation on a report Lease: how the agent serves the token (`file`, `proxy`,
/// `file+proxy`).
pub const AGENT_MODE_ANNOTATION: &str = "scgtoken.io/agent-mode";
/// Annotation the operator sets on pods matched by `spec.consumers.podSelector`: the
/// fingerprint of the token they were nudged for. Changing it makes the kubelet sync the
/// pod, and with it its Secret volumes, at once.
pub const NUDGED_FOR_ANNOTATION: &str = "scgtoken.io/nudged-for";
/// Annotation by which a workload (on its own metadata) or a pod opts in to being
/// restarted or nudged for the ScgTokens it names (comma-separated names of ScgTokens in
/// its namespace). Whoever writes a ScgToken cannot set it on someone else's workload, so
/// a ScgToken cannot make the operator touch a workload that did not ask for it.
pub const RESTART_FOR_ANNOTATION: &str = "scgtoken.io/restart-for";
/// Pod-template annotation the operator sets on rollout-restart targets: the fingerprint
/// of the token the restart was for. Changing the template rolls the workload.
pub const RESTARTED_FOR_ANNOTATION: &str = "scgtoken.io/restarted-for";
/// Pod-template annotation set with [`RESTARTED_FOR_ANNOTATION`]: when (RFC 3339) the
/// restart was asked for. Used to debounce restarts.
pub const RESTARTED_AT_ANNOTATION: &str = "scgtoken.io/restarted-at";

/// Go-style duration as the API server's CEL `duration()` accepts it, restricted to whole
/// hours, minutes and seconds ("90s", "12h", "1h30m"). With at most
/// [`DURATION_MAX_LENGTH`] characters, at most 6 digits of hours, 8 of minutes and 9 of
/// seconds, no such string overflows `duration()` (about 2,562,047 hours): each CEL rule
/// that calls it checks this pattern first, so a bad value gets the rule's own message and
/// never a type conversion error. The CEL rules spell the pattern out (a test checks that
/// they agree); [`crate::policy::parse_duration`] applies the same limits.
pub const DURATION_PATTERN: &str = "^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$";
/// Longest duration string: enough for any value the rules admit ("8759h59m59s",
/// "31536000s"), short enough that no string of the pattern overflows.
pub const DURATION_MAX_LENGTH: usize = 15;

/// Keeps a Syniverse SCG access token fresh in a Secret.
///
/// The operator reads the consumer key, consumer secret and a seed access token from
/// `credentialsSecretRef`, calls the SCG `apptoken-refresh` API before the current token
/// expires, and writes each new token into the target Secret that workloads mount.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "scgtoken.io",
    version = "v1alpha1",
    kind = "ScgToken",
    plural = "scgtokens",
    shortname = "scgt",
    category = "scg",
    namespaced,
    status = "ScgTokenStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Consumers","type":"string","jsonPath":".status.consumers.summary","description":"Pods serving the current token, of those reporting"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt"}"#,
    printcolumn = r#"{"name":"Next Refresh","type":"string","jsonPath":".status.nextRefreshAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!(has(self.refreshBefore) && has(self.refreshBeforePercentage))").message("set refreshBefore or refreshBeforePercentage, not both"))]
#[x_kube(validation = Rule::new("!has(self.refreshBefore) || !self.refreshBefore.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$') || !self.validity.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$') || (duration(self.refreshBefore) > duration('0s') && duration(self.refreshBefore) < duration(self.validity))").message("refreshBefore must be longer than 0s and shorter than validity"))]
#[serde(rename_all = "camelCase")]
pub struct ScgTokenSpec {
    /// The Secret, in the ScgToken's own namespace, holding the application's consumer
    /// key, consumer secret and seed access token. A Secret in another namespace cannot be
    /// named. The seed is used once, to start a token chain; when its value changes (a
    /// human re-generated the token in the SDC UI), a new chain starts from it at once.
    /// The Secret must be opted in by whoever may write it: label
    /// `scgtoken.io/credentials: "true"`, or annotation `scgtoken.io/allowed-scgtokens`
    /// listing this ScgToken's name; else nothing is read (`CredentialsNotAllowed`).
    pub credentials_secret_ref: CredentialsSecretRef,

    /// Requested lifetime of each new token, sent as the `validity` of the refresh call.
    /// The lifetime the API returns (`validityTime`) is what the operator schedules by.
    /// A Go duration of whole hours, minutes and seconds, e.g. `60s`, `12h`, `1h30m`.
    /// Default `24h`; at least `30s`, at most `8760h` (a year).
    #[serde(default = "default_validity")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$')").message("validity is not a duration such as 90s, 10m or 12h"))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$') || (duration(self) >= duration('30s') && duration(self) <= duration('8760h'))").message("validity must be between 30s and 8760h"))]
    pub validity: String,

    /// How long before expiry to refresh, e.g. `10m`. Longer than `0s` and shorter than
    /// `validity`; excludes `refreshBeforePercentage`. When the API returns a lifetime
    /// shorter than this margin, the operator refreshes after a tenth of the lifetime
    /// instead, so a short lifetime never causes a refresh loop. Pods that read a mounted Secret volume
    /// need room for the kubelet, which takes up to about 90 s to update it; pods served by the
    /// token agent switch within a second. Unset by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$')").message("refreshBefore is not a duration such as 90s, 10m or 12h"))]
    pub refresh_before: Option<String>,

    /// How much of each token's returned lifetime is left when it is refreshed, in
    /// percent (1-90), e.g. `25` refreshes a 1h token 45 minutes after it was issued.
    /// Excludes `refreshBefore`. When neither is set, a token is refreshed when a third of
    /// its lifetime is left (the equivalent of `33`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 90))]
    pub refresh_before_percentage: Option<u8>,

    /// Full URL of the refresh call. Default
    /// `https://api.syniverse.com/apptoken-refresh` (some accounts use
    /// `https://api.syniverse.com/v1/apptoken-refresh`). It starts with `https://`, in
    /// lower case (the CRD's rule and the operator agree). Plain `http://` is refused unless
    /// the operator runs with `--allow-insecure-endpoints` (tests and local trials only).
    /// Its host must be one the operator allows (`--allowed-endpoints`, default
    /// `api.syniverse.com`); any other is refused before any call is made.
    #[serde(default = "default_endpoint")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("endpoint must be an http(s) URL"))]
    pub endpoint: String,

    /// A Secret in the same namespace whose keys become extra request headers of the
    /// refresh call, e.g. a key `Cookie`. Values are treated as secrets. Unset by default.
    /// Like the credentials Secret, it must be opted in (label `scgtoken.io/credentials:
    /// "true"` or annotation `scgtoken.io/allowed-scgtokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<SecretName>,

    /// Time limit of one refresh call, a Go duration. Default `10s`; between `1s` and `2m`.
    #[serde(default = "default_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$')").message("timeout is not a duration such as 90s, 10m or 12h"))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$') || (duration(self) >= duration('1s') && duration(self) <= duration('2m'))").message("timeout must be between 1s and 2m"))]
    pub timeout: String,

    /// The Secret the operator writes each token into, and workloads read it from.
    #[serde(default)]
    pub target: TargetSpec,

    /// Stops refreshing without deleting anything: the target Secret keeps its last token,
    /// which expires as usual. Default `false`.
    #[serde(default)]
    pub suspend: bool,

    /// The workloads that use the token: whether to watch that they switch to each new
    /// token, and how to make those that cannot notice by themselves switch. Unset by
    /// default: the operator only writes the target Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<ConsumersSpec>,
}

/// The consumers of the token and how they are kept current.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumersSpec {
    /// Aggregate the reports of token agents (`scg-token-operator agent` sidecars) into
    /// `status.consumers` and the `ConsumersUpToDate` condition. Each agent reports, in a
    /// Lease of its own labelled `scgtoken.io/scgtoken: <this ScgToken's name>` in this
    /// namespace, the fingerprint of the token its pod serves. An agent whose Lease is not
    /// renewed drops out, unless its pod still runs: then it counts as `lost`. Needs the
    /// operator's `--consumer-reports`, leases list/watch and pods get
    /// (`deploy/components/consumer-reports` sets them all); without them `ConsumersUpToDate`
    /// is `Unknown` with reason `ReportsDisabled`. Default `false`.
    #[serde(default)]
    pub agents: bool,

    /// How long after the first refresh a reporting pod missed (the one that issued the
    /// token after the one it serves, as far as the operator saw; at first the current
    /// token's, `status.lastRefreshAt`) it may still serve an older token before it counts
    /// as stale, e.g. `10s`. A pod stuck on an old token stays stale while tokens keep
    /// coming. A stale pod sets `ConsumersUpToDate` to `False` with its name. A Go duration
    /// of whole hours, minutes and seconds; default `10s`; between `1s` and `10m`.
    #[serde(default = "default_stale_after")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = DURATION_MAX_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$')").message("staleAfter is not a duration such as 90s, 10m or 12h"))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]{1,6}h|[0-9]{1,8}m|[0-9]{1,9}s)+$') || (duration(self) >= duration('1s') && duration(self) <= duration('10m'))").message("staleAfter must be between 1s and 10m"))]
    pub stale_after: String,

    /// Pods in this namespace that mount the target Secret as a plain volume, without an
    /// agent, e.g. `{matchLabels: {app: messaging-client}}`. After each new token the
    /// operator sets the annotation `scgtoken.io/nudged-for` on every matching pod, which
    /// makes the kubelet update the pod's Secret volumes within seconds instead of on its
    /// next periodic sync (up to about 90 s). Tried once per token; a failure is a Warning
    /// Event (`NudgeFailed`) and never holds back the token. Needs the operator's optional
    /// pods list/patch permission (`deploy/components/consumer-nudge`). An empty selector
    /// (matching every pod) is refused. Only pods that opt in are touched: annotation
    /// `scgtoken.io/restart-for` naming this ScgToken (set it in the pod template); the
    /// others are a `NudgeNotAllowed` Warning. Unset by default: no pod is touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("podSelector must not be empty: it would match every pod in the namespace"))]
    pub pod_selector: Option<LabelSelector>,

    /// Workloads in this namespace that read the token from an environment variable,
    /// which never changes in a running container. After each new token the operator
    /// restarts them the way `kubectl rollout restart` does (a pod-template annotation),
    /// at most once per token and at most once every 2 minutes per workload. Refused, with
    /// the `ConsumersUpToDate` condition saying why, when tokens live less than 10 minutes
    /// or are refreshed more often than every 5 minutes: the workload would be rolling all
    /// the time, and its pods would hold a dead token for the length of every rollout.
    /// Each restart is a `RolloutRestarted` Event; a failed one a `RestartFailed` Warning,
    /// tried again 30 s later. Needs the optional permission in
    /// `deploy/components/rollout-restart`. A workload is restarted only if it opts in
    /// with the annotation `scgtoken.io/restart-for` naming this ScgToken on its own
    /// metadata; otherwise it is left unchanged, with a `RestartNotAllowed` Warning. At
    /// most 20.
    /// Empty by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,
}

/// A workload to restart after each new token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartTarget {
    /// Kind of the workload: `Deployment`, `StatefulSet` or `DaemonSet` (group `apps`).
    pub kind: RestartKind,
    /// Name of the workload, in the ScgToken's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kinds of workload that can be rollout-restarted.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RestartKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// Where the credentials are: a Secret in the ScgToken's namespace and its keys.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret, e.g. `scg-credentials`. Always in the ScgToken's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the consumer key. Default `consumerKey`.
    #[serde(default = "default_consumer_key_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN))]
    pub consumer_key_key: String,
    /// Key holding the consumer secret. Default `consumerSecret`.
    #[serde(default = "default_consumer_secret_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN))]
    pub consumer_secret_key: String,
    /// Key holding the seed access token: the token generated in the SDC UI. Default
    /// `accessToken`.
    #[serde(default = "default_access_token_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN))]
    pub access_token_key: String,
}

/// A Secret in the ScgToken's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretName {
    /// Name of the Secret, e.g. `scg-headers`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Valid characters of a Secret data key.
const SECRET_KEY_PATTERN: &str = "^[-._a-zA-Z0-9]+$";

/// The target Secret: where the current token lives.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.expiryKey) || self.expiryKey != (has(self.tokenKey) ? self.tokenKey : 'accessToken')").message("target expiryKey must differ from tokenKey: the expiry would overwrite the token"))]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the Secret, in the ScgToken's namespace: a DNS-1123 subdomain, as every
    /// Secret name (lower case letters, digits, `-` and `.`). Default: the ScgToken's name. An
    /// existing Secret is only taken over when it carries the operator's ownership marker
    /// (label `app.kubernetes.io/managed-by: scg-token-operator` and annotation
    /// `scgtoken.io/owner: <ScgToken name>`). The Secret holds the token chain: renaming
    /// the target of a running chain starts over from the seed, which is usually revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("target name is not a valid Secret name: at most 253 lowercase letters, digits, '-' and '.', each part between dots starting and ending with a letter or digit"))]
    #[x_kube(validation = Rule::new("!self.startsWith('sh.helm.release.')").message("target name is reserved for Helm's release Secrets"))]
    pub name: Option<String>,
    /// Key holding the access token. Default `accessToken`.
    #[serde(default = "default_access_token_key")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub token_key: String,
    /// Optional key holding the token's expiry time as RFC 3339, e.g. `expiresAt`; it must
    /// differ from `tokenKey`. Unset by default (the expiry is always in the annotation
    /// `scgtoken.io/expires-at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = 253))]
    pub expiry_key: Option<String>,
    /// Extra labels of the target Secret. Labels removed here are not removed from an
    /// existing Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations of the target Secret, e.g. for reloaders. Annotations removed here
    /// are not removed from an existing Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Type of a Secret the operator creates. Default `Opaque`. Kubernetes does not allow
    /// changing the type of an existing Secret. Types of the `kubernetes.io`, `k8s.io`,
    /// `helm.sh` and `scgtoken.io` domains are refused: their controllers trust a Secret
    /// by its type. Labels and annotations with those prefixes are refused too, at
    /// runtime (condition `Ready` False, `InvalidSpec`), except Kubernetes' recommended
    /// `app.kubernetes.io/` labels other than `managed-by`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("!self.matches('^([^/]*[.])?(kubernetes[.]io|k8s[.]io|helm[.]sh|scgtoken[.]io)/')").message("target type belongs to Kubernetes or Helm, whose controllers trust Secrets of that type"))]
    pub type_: Option<String>,
    /// What happens to the target Secret when the ScgToken is deleted: `Retain` (default)
    /// keeps it and its last token; `Delete` gives it an owner reference so Kubernetes
    /// garbage-collects it with the ScgToken.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What happens to the target Secret when its ScgToken is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum DeletionPolicy {
    /// Keep the Secret and its last token.
    #[default]
    Retain,
    /// Delete the Secret with the ScgToken (owner reference, garbage collection).
    Delete,
}

/// Observed state of an ScgToken. Never holds a token: only its fingerprint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ScgTokenStatus {
    /// `Ready` is `True` while the target Secret holds a token that has not expired and
    /// the last refresh attempt did not fail. Its reason says why not otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Name of the target Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_secret: Option<String>,
    /// When the current token expires. Unset while the chain runs on a seed whose expiry
    /// is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the operator will next try to refresh (a scheduled refresh or a retry).
    /// While attempts keep failing for the same reason, this and the two fields below
    /// are rewritten at most once a minute, so they may be up to a minute behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_at: Option<Time>,
    /// When the current token was received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_at: Option<Time>,
    /// When the last refresh attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<Time>,
    /// Refresh attempts that failed in a row; 0 after a success. The operator counts
    /// the back-off in memory and resumes it from here after a restart.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Short salted SHA-256 fingerprint of the current token, to tell tokens apart
    /// without revealing them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_fingerprint: Option<String>,
    /// Salted fingerprint of the consumer key, consumer secret and current token of the
    /// last attempt: when it changes (a human fixed the credentials), a back-off ends at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_fingerprint: Option<String>,
    /// The last value of the `scgtoken.io/refresh-requested-at` annotation that was
    /// acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_request: Option<String>,
    /// Which reporting pods serve the current token. Set only with
    /// `spec.consumers.agents`, when the operator reads reports (`--consumer-reports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<ConsumersStatus>,
}

/// What the token agents report, aggregated.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConsumersStatus {
    /// `current/total`, e.g. `3/3`: the `CONSUMERS` column of `kubectl get scgtokens`.
    pub summary: String,
    /// Pods with a token agent for this ScgToken: those whose agent reported within its
    /// Lease duration, and the `lost` ones.
    pub total: u32,
    /// Of those, pods serving the current token (the fingerprint in `tokenFingerprint`).
    pub current: u32,
    /// Of those, pods still serving another token (or none) longer than
    /// `spec.consumers.staleAfter` after the first token they missed was issued. Pods still
    /// within that grace count neither as current nor as stale.
    pub stale: u32,
    /// Names of the stale pods, sorted, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_pods: Vec<String>,
    /// Of those, pods that still run (not deleted, not finished) although their agent
    /// stopped reporting without a clean stop: its Lease expired. Which token they serve is
    /// unknown; they count until the pod is deleted or its agent reports again.
    #[serde(default)]
    pub lost: u32,
    /// Names of the lost pods, sorted, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_pods: Vec<String>,
    /// Seconds from the refresh call that issued the current token (`lastRefreshAt`, to
    /// the millisecond) to the last reporting pod serving it, counting only pods that were
    /// running then. Unset until one has switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slowest_switch_seconds: Option<f64>,
}

fn default_validity() -> String {
    "24h".into()
}
fn default_endpoint() -> String {
    "https://api.syniverse.com/apptoken-refresh".into()
}
fn default_timeout() -> String {
    "10s".into()
}
fn default_stale_after() -> String {
    "10s".into()
}
fn default_consumer_key_key() -> String {
    "consumerKey".into()
}
fn default_consumer_secret_key() -> String {
    "consumerSecret".into()
}
fn default_access_token_key() -> String {
    "accessToken".into()
}

impl Default for CredentialsSecretRef {
    fn default() -> Self {
        CredentialsSecretRef {
            name: String::new(),
            consumer_key_key: default_consumer_key_key(),
            consumer_secret_key: default_consumer_secret_key(),
            access_token_key: default_access_token_key(),
        }
    }
}

impl Default for TargetSpec {
    fn default() -> Self {
        TargetSpec {
            name: None,
            token_key: default_access_token_key(),
            expiry_key: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            type_: None,
            deletion_policy: DeletionPolicy::Retain,
        }
    }
}

impl Default for ConsumersSpec {
    fn default() -> Self {
        ConsumersSpec {
            agents: false,
            stale_after: default_stale_after(),
            pod_selector: None,
            rollout_restart_targets: Vec::new(),
        }
    }
}

impl ScgTokenSpec {
    /// A spec with every default and the given credentials Secret.
    pub fn new(credentials_secret: &str) -> Self {
        ScgTokenSpec {
            credentials_secret_ref: CredentialsSecretRef {
                name: credentials_secret.into(),
                ..Default::default()
            },
            validity: default_validity(),
            refresh_before: None,
            refresh_before_percentage: None,
            endpoint: default_endpoint(),
            headers_from: None,
            timeout: default_timeout(),
            target: TargetSpec::default(),
            suspend: false,
            consumers: None,
        }
    }
}

impl ScgToken {
    /// Name of the target Secret: `spec.target.name`, or the ScgToken's own name.
    pub fn target_name(&self) -> String {
        self.spec
            .target
            .name
            .clone()
            .unwrap_or_else(|| kube::ResourceExt::name_any(self))
    }

    /// The `Ready` condition, if any.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
    }
}

/// The CRD as YAML, exactly as committed in `crds/scgtoken.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&ScgToken::crd()).unwrap_or_default();
    format!("# Generated by `scg-token-operator crd`; do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: ScgTokenSpec =
            serde_json::from_value(serde_json::json!({"credentialsSecretRef": {"name": "c"}}))
                .unwrap();
        assert_eq!(spec, ScgTokenSpec::new("c"));
        assert_eq!(spec.target.token_key, "accessToken");
        assert_eq!(spec.target.deletion_policy, DeletionPolicy::Retain);
    }

    #[test]
    fn consumers_default_to_off_and_fill_a_minimal_block() {
        assert_eq!(ScgTokenSpec::new("c").consumers, None);
        let spec: ScgTokenSpec = serde_json::from_value(serde_json::json!({
            "credentialsSecretRef": {"name": "c"},
            "consumers": {"rolloutRestartTargets": [{"kind": "StatefulSet", "name": "db"}]}
        }))
        .unwrap();
        let c = spec.consumers.unwrap();
        assert!(!c.agents);
        assert_eq!(c.stale_after, "10s");
        assert_eq!(c.pod_selector, None);
        assert_eq!(
            c.rollout_restart_targets,
            [RolloutRestartTarget {
                kind: RestartKind::StatefulSet,
                name: "db".into()
            }]
        );
    }

    #[test]
    fn target_name_defaults_to_the_scgtoken_name() {
        let mut t = ScgToken::new("messaging", ScgTokenSpec::new("c"));
        assert_eq!(t.target_name(), "messaging");
        t.spec.target.name = Some("other".into());
        assert_eq!(t.target_name(), "other");
    }

    #[test]
    fn committed_crd_matches_the_code() {
        let committed = include_str!("../crds/scgtoken.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/scgtoken.yaml is stale: run `cargo run -- crd > crds/scgtoken.yaml`"
        );
    }

    /// Every rule that calls CEL's `duration()` on a field first checks that field against
    /// [`DURATION_PATTERN`], so a malformed value gets a rule's message, never a type
    /// conversion error; and the CEL spelling of the pattern is the schema's.
    #[test]
    fn every_duration_rule_checks_the_pattern_first() {
        use kube::CustomResourceExt;
        fn rules(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        if k == "x-kubernetes-validations" {
                            for r in v.as_array().into_iter().flatten() {
                                out.push(r["rule"].as_str().unwrap_or_default().to_string());
                            }
                        } else {
                            rules(v, out);
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| rules(v, out)),
                _ => {}
            }
        }
        let crd = serde_json::to_value(ScgToken::crd()).unwrap();
        let mut all = Vec::new();
        rules(&crd, &mut all);
        let mut checked = 0;
        for rule in &all {
            for field in ["self", "self.refreshBefore", "self.validity"] {
                if rule.contains(&format!("duration({field})")) {
                    checked += 1;
                    let guard = format!("!{field}.matches('{DURATION_PATTERN}')");
                    let at = rule.find(&guard);
                    assert!(
                        at.is_some_and(|at| at < rule.find("duration(").unwrap_or(0)),
                        "{rule} does not check {field} against the pattern first"
                    );
                }
            }
        }
        assert_eq!(checked, 5, "{all:#?}");
        let formats = all
            .iter()
            .filter(|r| **r == format!("self.matches('{DURATION_PATTERN}')"))
            .count();
        assert_eq!(formats, 4, "one format rule per duration field: {all:#?}");
    }

    #[test]
    fn crd_carries_the_schema_rules() {
        let yaml = crd_yaml();
        for needle in [
            "x-kubernetes-validations",
            "refreshBefore must be longer than 0s and shorter than validity",
            "set refreshBefore or refreshBeforePercentage, not both",
            "validity must be between 30s and 8760h",
            "validity is not a duration such as 90s, 10m or 12h",
            "target name is not a valid Secret name",
            "target expiryKey must differ from tokenKey",
            "maximum: 90",
            "shortNames",
            "Next Refresh",
            "Consumers",
            "staleAfter must be between 1s and 10m",
            "podSelector must not be empty",
        ] {
            assert!(yaml.contains(needle), "CRD lacks {needle}");
        }
    }
}
