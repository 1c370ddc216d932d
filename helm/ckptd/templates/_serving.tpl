{{/* Names, labels and config of the serving example (serving*.yaml). */}}
{{- define "ckptd.serving.name" -}}
{{- include "ckptd.fullname" . | trunc 55 | trimSuffix "-" -}}-serving
{{- end -}}

{{- define "ckptd.serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ckptd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: serving
{{- end -}}

{{- define "ckptd.serving.labels" -}}
helm.sh/chart: {{ include "ckptd.chart" . }}
{{ include "ckptd.serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ckptd.serving.image" -}}
{{- $img := .Values.serving.server.image -}}
{{- if $img.tag -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- else -}}
{{- $img.repository -}}
{{- end -}}
{{- end -}}

{{- define "ckptd.serving.jobId" -}}
{{- .Values.serving.jobId | default .Values.jobId -}}
{{- end -}}

{{/* The reference's serving config, verbatim: nothing but training_checkpoints. */}}
{{- define "ckptd.serving.config" -}}
{{- $ref := dict "training_job_id" (include "ckptd.serving.jobId" .) "paths" .Values.serving.paths -}}
{{- $tc := dict "download_folder" .Values.serving.path "artifact_references" (list $ref) -}}
{{- toYaml (dict "training_checkpoints" $tc) -}}
{{- end -}}

{{- define "ckptd.serving.validate" -}}
{{- $s := .Values.serving -}}
{{- if not (include "ckptd.serving.jobId" .) -}}
{{- fail "serving.jobId: name the training job whose checkpoint to serve (or set jobId); a Job's uid is not known before it runs" -}}
{{- end -}}
{{- if not $s.server.image.repository -}}
{{- fail "serving.server.image.repository: the model server's image is required when serving.enabled is true" -}}
{{- end -}}
{{- end -}}
