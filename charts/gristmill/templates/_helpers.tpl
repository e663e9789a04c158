{{/* The image every Gristmill container runs. */}}
{{- define "gristmill.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Labels of every object; pod templates get podLabels, without the chart's version, so
     that a chart upgrade that changes nothing else restarts no pod. */}}
{{- define "gristmill.labels" -}}
{{ include "gristmill.podLabels" . }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "gristmill.podLabels" -}}
app.kubernetes.io/part-of: gristmill
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret (key `url`) holding the database URL: the operator hands its name to
     every worker Deployment. */}}
{{- define "gristmill.databaseSecret" -}}
{{ .Values.database.existingSecret | default "gristmill-database" }}
{{- end }}

{{- define "gristmill.postgresName" -}}
{{ .Release.Name }}-postgres
{{- end }}

{{/* PSS restricted, for every container of the release. */}}
{{- define "gristmill.podSecurity" -}}
runAsNonRoot: true
seccompProfile: {type: RuntimeDefault}
{{- end }}
{{- define "gristmill.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end }}

{{- define "gristmill.databaseEnv" -}}
- name: GRISTMILL_DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ include "gristmill.databaseSecret" . }}, key: url}
{{- end }}

{{/* The worker-token signing keys (key `keys`), made once by the setup hook: the API
     checks worker tokens with them, the operator signs each WorkerGroup's. */}}
{{- define "gristmill.workerTokenKeySecret" -}}
{{ .Release.Name }}-worker-token-key
{{- end }}

{{- define "gristmill.workerTokenKeysEnv" -}}
- name: GRISTMILL_WORKER_TOKEN_KEYS
  valueFrom:
    secretKeyRef: {name: {{ include "gristmill.workerTokenKeySecret" . }}, key: keys}
{{- end }}

{{/* The dispatcher's in-cluster URL (the API's Service), which workers connect to. */}}
{{- define "gristmill.dispatcherURL" -}}
http://gristmill-api.{{ .Release.Namespace }}.svc:{{ .Values.api.port }}
{{- end }}

{{/* The bundled PostgreSQL runs unless an external database is given. */}}
{{- define "gristmill.bundledPostgres" -}}
{{- $db := .Values.database }}
{{- if and $db.bundled.enabled (not $db.url) (not $db.existingSecret) }}true{{ end }}
{{- end }}

{{/* Annotations of the setup hook's objects (templates/setup.yaml); "weight" orders them. */}}
{{- define "gristmill.setupHook" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
