{{/*
The pod both workloads run: one container, `caliper-sidecar run`, configured by the ConfigMap's
sidecar.toml (SIDECAR_CONFIG, so `kubectl exec … caliper-sidecar outbox stats` finds it too)
and the Secrets' files.
*/}}
{{- define "caliper-sidecar.pod" -}}
{{- $config := include "caliper-sidecar.config" . | fromJson -}}
{{- $longest := include "caliper-sidecar.longestTimeout" . | int -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add $longest 15) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least the longest timeout_s (%d) plus 15 s: the sidecar's shutdown lets the requests under way finish" .Values.terminationGracePeriodSeconds $longest) -}}
{{- end -}}
{{- if or (eq (int $config.ops.port) 0) (eq (int $config.ops.port) (int $config.receiver.port)) -}}
{{- fail "config.ops.port must be a port of its own (not 0, not receiver.port): the probes and Prometheus use it" -}}
{{- end -}}
{{- $relay := eq .Values.mode "relay" -}}
{{- $secrets := list -}}
{{- with .Values.secrets -}}
{{- range $ref := list (list .senderTokens "tokens") (list .oauthClientSecret "client-secret") (list .outboxUrl "outbox-url") (list .adminToken "admin-token") (list .upstreamBearerToken "bearer-token") -}}
{{- $secret := index $ref 0 -}}
{{- if $secret.name -}}
{{- $secrets = append $secrets (dict "name" $secret.name "items" (list (dict "key" $secret.key "path" (index $ref 1)))) -}}
{{- end -}}
{{- end -}}
{{- if .tls.name -}}
{{- $secrets = append $secrets (dict "name" .tls.name "items" (list (dict "key" "tls.crt" "path" "tls.crt") (dict "key" "tls.key" "path" "tls.key"))) -}}
{{- end -}}
{{- end -}}
metadata:
  labels:
    {{- include "caliper-sidecar.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A changed configuration rolls the pods (most keys need a restart; docs/operators.md).
    checksum/config: {{ include "caliper-sidecar.toml" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  # Service-link variables (SIDECAR_PORT=tcp://… for a Service named "sidecar") are noise; the
  # sidecar ignores them anyway.
  enableServiceLinks: false
  # SIGTERM: 503 to new events, the commits under way finished, the requests to each
  # destination given their timeout_s, then exit 0; the chart checked this is long enough.
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    # The image's user; fsGroup makes the outbox volume and the Secrets' files its group's.
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: caliper-sidecar
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["run"]
      env:
        - name: SIDECAR_CONFIG
          value: {{ include "caliper-sidecar.configDir" . }}/sidecar.toml
        # The image sets these in its environment, which wins over the file: the same values.
        - name: SIDECAR_OPS_PORT
          value: {{ $config.ops.port | toString | quote }}
        {{- if $relay }}
        - name: SIDECAR_OUTBOX_PATH
          value: {{ $config.outbox.path | quote }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: ingest
          containerPort: {{ $config.receiver.port }}
        - name: ops
          containerPort: {{ $config.ops.port }}
      # The ops listener answers these without a token. A startup probe first: a gateway's
      # first start creates or migrates the PostgreSQL schema, and waits for other replicas'
      # migration.
      startupProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 2
        failureThreshold: 150
      livenessProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 10
      readinessProbe:
        {{- if $relay }}
        # Not /readyz: the relay is alone behind its Service, and a full outbox should answer
        # devices 503 with Retry-After rather than drop out of the Service.
        httpGet: {path: /healthz, port: ops}
        {{- else }}
        # A replica that cannot store (storage_busy, disk_full) or is stopping leaves the
        # Service; the others take its apps' events.
        httpGet: {path: /readyz, port: ops}
        {{- end }}
        periodSeconds: 5
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        allowPrivilegeEscalation: false
        # Writable: the relay's outbox volume, and /tmp (an emptyDir).
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: config
          mountPath: {{ include "caliper-sidecar.configDir" . }}
          readOnly: true
        {{- if $secrets }}
        - name: secrets
          mountPath: {{ include "caliper-sidecar.secretsDir" . }}
          readOnly: true
        {{- end }}
        {{- if $relay }}
        - name: outbox
          mountPath: {{ include "caliper-sidecar.outboxDir" . }}
        {{- end }}
        # SQLite's temporary files (a sort or an index build larger than its cache, as a
        # migration of a large outbox makes) and any other program's.
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "caliper-sidecar.fullname" . }}
    {{- if $secrets }}
    # Not subPath mounts: the kubelet updates these files when a Secret changes (then SIGHUP).
    - name: secrets
      projected:
        defaultMode: 288  # 0440: the owner and the pod's fsGroup
        sources:
          {{- range $secrets }}
          - secret:
              {{- toYaml . | nindent 14 }}
          {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- if and $relay .Values.persistence.existingClaim }}
    - name: outbox
      persistentVolumeClaim:
        claimName: {{ .Values.persistence.existingClaim }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
