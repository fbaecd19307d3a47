{{/* Names and labels. */}}
{{- define "arbiter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "arbiter.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "arbiter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arbiter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "arbiter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "arbiter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "arbiter.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding the database URL, keys and tokens: the operator's, or the chart's. */}}
{{- define "arbiter.secretName" -}}
{{- default (include "arbiter.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* "true" when PostgreSQL is external (a URL given, or an existing Secret assumed to hold one). */}}
{{- define "arbiter.externalDatabase" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.databaseUrl -}}true{{- end -}}
{{- end -}}

{{/* Whether the Secret has a key: always assumed for an existing Secret, else when the value is set. */}}
{{- define "arbiter.hasSecret" -}}
{{- $root := index . 0 -}}{{- $field := index . 1 -}}
{{- if or $root.Values.secrets.existingSecret (index $root.Values.secrets $field) -}}true{{- end -}}
{{- end -}}

{{/*
Seconds Kubernetes waits after SIGTERM before SIGKILL: the drain delay, the in-flight grace, the audit
queue's drain to the store, and 5 s for the process to exit. Shorter would kill audit records in flight.
*/}}
{{- define "arbiter.terminationGrace" -}}
{{- $c := .Values.config -}}
{{- $audit := default dict $c.audit -}}
{{- $drain := ceil (default 0 $c.drain_delay_s) | int -}}
{{- $grace := int (default 10 $c.shutdown_grace_s) -}}
{{- $auditDrain := ceil (default 10 $audit.drain_timeout_s) | int -}}
{{- add $drain $grace $auditDrain 5 -}}
{{- end -}}

{{/*
The settings file: .Values.config, with the names agents reach /mcp by added to mcp.allowed_hosts (the
Service's DNS names in the cluster, the ingress hosts): DNS-rebinding protection refuses other Host headers.
*/}}
{{- define "arbiter.configFile" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $mcp := default dict (get $cfg "mcp") -}}
{{- $hosts := default list (get $mcp "allowed_hosts") -}}
{{- $svc := include "arbiter.fullname" . -}}
{{- range list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) -}}
{{- $hosts = concat $hosts (list . (printf "%s:*" .)) -}}
{{- end -}}
{{- if .Values.ingress.enabled -}}
{{- range .Values.ingress.hosts -}}
{{- $hosts = concat $hosts (list .host (printf "%s:*" .host)) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $mcp "allowed_hosts" ($hosts | uniq) -}}
{{- $_ := set $cfg "mcp" $mcp -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Environment from the Secret: each key optional except the database URL when external. */}}
{{- define "arbiter.secretEnv" -}}
{{- $secret := include "arbiter.secretName" . -}}
{{- $keys := .Values.secrets.secretKeys -}}
{{- $refs := list
  (list "ARBITER_DATABASE_URL" "databaseUrl")
  (list "ARBITER_REDIS_URL" "redisUrl")
  (list "ARBITER_AUDIT__SIGNING_KEY" "auditSigningKey")
  (list "ARBITER_AUDIT__HMAC_KEY" "auditHmacKey")
  (list "ARBITER_SECRET_KEY" "secretKey")
  (list "ARBITER_ADMIN_TOKEN" "adminToken")
  (list "ARBITER_TELEMETRY__METRICS_TOKEN" "metricsToken") -}}
{{- range $refs }}
{{- $env := index . 0 }}{{- $field := index . 1 }}
{{- if include "arbiter.hasSecret" (list $ $field) }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ index $keys $field }}
      {{- /* An existing Secret need not hold the optional keys; the database URL it must. */}}
      optional: {{ if and $.Values.secrets.existingSecret (ne $field "databaseUrl") }}true{{ else }}false{{ end }}
{{- end }}
{{- end }}
{{- end -}}
