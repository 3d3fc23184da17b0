{{/*
The objects' name: the release's (`helm install classroom-relay …` makes the StatefulSet
classroom-relay and its pod classroom-relay-0), at most 63 characters (a DNS label).
*/}}
{{- define "caliper-sidecar.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "caliper-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- end -}}

{{- define "caliper-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "caliper-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Where the secrets' files are mounted, the configuration file, the relay's outbox. */}}
{{- define "caliper-sidecar.secretsDir" -}}/run/secrets/caliper-sidecar{{- end -}}
{{- define "caliper-sidecar.configDir" -}}/etc/caliper-sidecar{{- end -}}
{{- define "caliper-sidecar.outboxDir" -}}/var/lib/caliper-sidecar{{- end -}}

{{/*
The sidecar's configuration as JSON: .Values.config, and what the chart decides itself (the
listeners' hosts, the relay's outbox path, the secrets' files). Ports default as the sidecar's
image has them (8787, 9090).
*/}}
{{- define "caliper-sidecar.config" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- range $section := list "receiver" "ops" "outbox" "upstream" "oauth" "admin" -}}
{{- if not (hasKey $c $section) -}}{{- $_ := set $c $section dict -}}{{- end -}}
{{- end -}}
{{- $_ := set $c.receiver "host" "0.0.0.0" -}}
{{- $_ := set $c.ops "host" "0.0.0.0" -}}
{{- if not (hasKey $c.receiver "port") -}}{{- $_ := set $c.receiver "port" 8787 -}}{{- end -}}
{{- if not (hasKey $c.ops "port") -}}{{- $_ := set $c.ops "port" 9090 -}}{{- end -}}
{{- $dir := include "caliper-sidecar.secretsDir" . -}}
{{- with .Values.secrets -}}
{{- if .senderTokens.name -}}{{- $_ := set $c.receiver "tokens_file" (printf "%s/tokens" $dir) -}}{{- end -}}
{{- if .oauthClientSecret.name -}}{{- $_ := set $c.oauth "client_secret_file" (printf "%s/client-secret" $dir) -}}{{- end -}}
{{- if .outboxUrl.name -}}{{- $_ := set $c.outbox "url_file" (printf "%s/outbox-url" $dir) -}}{{- end -}}
{{- if .adminToken.name -}}{{- $_ := set $c.admin "token_file" (printf "%s/admin-token" $dir) -}}{{- end -}}
{{- if .upstreamBearerToken.name -}}{{- $_ := set $c.upstream "bearer_token_file" (printf "%s/bearer-token" $dir) -}}{{- end -}}
{{- if .tls.name -}}
{{- $_ := set $c.receiver "tls_cert" (printf "%s/tls.crt" $dir) -}}
{{- $_ := set $c.receiver "tls_key" (printf "%s/tls.key" $dir) -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.mode "relay" -}}
{{- $_ := set $c.outbox "path" (printf "%s/outbox.db" (include "caliper-sidecar.outboxDir" .)) -}}
{{- end -}}
{{- toJson $c -}}
{{- end -}}

{{/*
That configuration as TOML: a table per section, `[[destinations]]` last. Values are written
as JSON, whose strings, numbers and arrays of them are TOML too (a whole number as an integer).
*/}}
{{- define "caliper-sidecar.toml" -}}
{{- $c := include "caliper-sidecar.config" . | fromJson -}}
# caliper-sidecar configuration, rendered by the chart {{ .Chart.Name }}-{{ .Chart.Version }} from its values.
# Secrets are not here: the *_file keys name the files of the Secrets mounted in the pod.
{{- range $section := keys $c | sortAlpha }}
{{- $table := get $c $section }}
{{- if and (ne $section "destinations") $table }}

[{{ $section }}]
{{- range $key := keys $table | sortAlpha }}
{{ $key }} = {{ get $table $key | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- range $destination := $c.destinations | default list }}

[[destinations]]
{{- range $key := keys $destination | sortAlpha }}
{{- if ne $key "oauth" }}
{{ $key }} = {{ get $destination $key | toJson }}
{{- end }}
{{- end }}
{{- with $destination.oauth }}

[destinations.oauth]
{{- range $key := keys . | sortAlpha }}
{{ $key }} = {{ get $destination.oauth $key | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{ end -}}

{{/* The longest timeout_s of [upstream] and the destinations (the sidecar's default: 30). */}}
{{- define "caliper-sidecar.longestTimeout" -}}
{{- $c := include "caliper-sidecar.config" . | fromJson -}}
{{- $longest := 30.0 -}}
{{- if hasKey $c.upstream "timeout_s" -}}{{- $longest = $c.upstream.timeout_s | float64 -}}{{- end -}}
{{- range $destination := $c.destinations | default list -}}
{{- $timeout := 30.0 -}}
{{- if hasKey $destination "timeout_s" -}}{{- $timeout = $destination.timeout_s | float64 -}}{{- end -}}
{{- if gt $timeout $longest -}}{{- $longest = $timeout -}}{{- end -}}
{{- end -}}
{{- $longest | ceil | int -}}
{{- end -}}
