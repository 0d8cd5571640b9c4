{{/* Chart name, or nameOverride. */}}
{{- define "scg-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Base name of every object. `helm install scg-token-operator ...` gives the names of the
kustomize install (scg-token-operator, scg-token-operator-metrics, ...).
*/}}
{{- define "scg-token-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "scg-token-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "scg-token-operator.labels" -}}
helm.sh/chart: {{ include "scg-token-operator.chart" . }}
app.kubernetes.io/name: {{ include "scg-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the operator's pods (Deployment, PDB, Service, anti-affinity). */}}
{{- define "scg-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scg-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "scg-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scg-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "scg-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Lease's name; the leader-election Role is limited to it. */}}
{{- define "scg-token-operator.leaseName" -}}
{{- default (include "scg-token-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "scg-token-operator.watchNamespace" -}}
{{- default .Release.Namespace .Values.namespaced.watchNamespace }}
{{- end }}

{{/*
What the operator may do in the namespaces it watches. Each verb is listed because the
operator uses it; no wildcards. Shared by the ClusterRole and the namespaced Role.
*/}}
{{- define "scg-token-operator.rules" -}}
# Watch ScgToken objects; the operator never changes their spec.
- apiGroups: ["scgtoken.io"]
  resources: ["scgtokens"]
  verbs: ["get", "list", "watch"]
# Status is written with server-side apply, which is a PATCH.
- apiGroups: ["scgtoken.io"]
  resources: ["scgtokens/status"]
  verbs: ["patch"]
# Read the credentials Secret and create/update the target Secret. RBAC cannot narrow this
# to the Secrets named in ScgTokens: cluster-wide, this reads every Secret in the cluster
# (namespaced.enabled limits it to one namespace).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update"]
# Events about ScgTokens; each is created once and never patched (src/events.rs).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.consumers.reports }}
# consumers.reports: the agents' report Leases, read from a cache (never get or written).
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["list", "watch"]
# ... and the pod a silent agent's Lease names, by name: still running (lost) or gone.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
{{- end }}
{{- if .Values.consumers.podNudges }}
# consumers.podNudges: list the pods of a podSelector and annotate them. No watch.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
{{- end }}
{{- if .Values.consumers.rolloutRestarts }}
# consumers.rolloutRestarts: read the pod template's restart annotations, then patch them.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}
