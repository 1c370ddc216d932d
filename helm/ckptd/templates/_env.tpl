{{/*
Environment. The trainer and ckptd's containers see the same BT_* identity (SPEC §3), so the
trainer's rank-N and ckptd's rank-N/ prefix always agree.
*/}}

{{/* This node's rank: where the workload's controller writes it on the pod. */}}
{{- define "ckptd.env.rank" -}}
- name: BT_NODE_RANK
  valueFrom:
    fieldRef:
{{- if eq .Values.workload.kind "PyTorchJob" }}
      fieldPath: metadata.labels['training.kubeflow.org/replica-index']
{{- else }}
      fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
{{- end }}
{{- end -}}

{{/* One id for every node of one run: the workload's uid where its pods carry it. */}}
{{- define "ckptd.env.jobId" -}}
- name: BT_TRAINING_JOB_ID
{{- if .Values.jobId }}
  value: {{ .Values.jobId | quote }}
{{- else if eq .Values.workload.kind "Job" }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['batch.kubernetes.io/controller-uid']
{{- else if eq .Values.workload.kind "JobSet" }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['jobset.sigs.k8s.io/jobset-uid']
{{- else }}
  value: {{ printf "%s-%d" .Release.Name (int .Release.Revision) | quote }}
{{- end }}
{{- end -}}

{{- define "ckptd.env.identity" -}}
- name: BT_TRAINING_PROJECT_NAME
  value: {{ .Values.project | quote }}
{{ include "ckptd.env.jobId" . }}
{{ include "ckptd.env.rank" . }}
- name: BT_GROUP_SIZE
  value: {{ .Values.workload.nodes | int | quote }}
- name: BT_CHECKPOINT_DIR
  value: {{ .Values.checkpoints.path | quote }}
{{- end -}}

{{/* Only when loading is enabled: training code tells "no loading configured" by its absence. */}}
{{- define "ckptd.env.restoreDir" -}}
{{- if .Values.restore.enabled -}}
- name: BT_LOAD_CHECKPOINT_DIR
  value: {{ .Values.restore.path | quote }}
{{- end -}}
{{- end -}}

{{- define "ckptd.env.leader" -}}
- name: BT_LEADER_ADDR
  value: {{ include "ckptd.leaderHost" . | quote }}
- name: MASTER_ADDR
  value: {{ include "ckptd.leaderHost" . | quote }}
- name: MASTER_PORT
  value: {{ .Values.workload.leaderPort | int | quote }}
{{- end -}}

{{/* ckptd's own settings: storage, config file, drain, metrics, credentials as files. */}}
{{- define "ckptd.env.ckptd" -}}
- name: CKPTD_CONFIG
  value: {{ printf "%s/config.yaml" (include "ckptd.configDir" .) | quote }}
- name: CKPTD_STORAGE
  value: {{ .Values.storage.url | quote }}
{{- with .Values.storage.endpointUrl }}
- name: CKPTD_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.region }}
- name: CKPTD_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.addressingStyle }}
- name: CKPTD_S3_ADDRESSING_STYLE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.checksum }}
- name: CKPTD_S3_CHECKSUM
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.sse }}
- name: CKPTD_S3_SSE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.sseKmsKeyId }}
- name: CKPTD_S3_SSE_KMS_KEY_ID
  value: {{ . | quote }}
{{- end }}
- name: CKPTD_DRAIN_TIMEOUT
  value: {{ .Values.ckptd.drainTimeoutSeconds | int | quote }}
- name: CKPTD_METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.ckptd.metricsPort) | quote }}
- name: CKPTD_LOG_LEVEL
  value: {{ .Values.ckptd.logLevel | quote }}
- name: CKPTD_LOG_FORMAT
  value: json
{{- if .Values.storage.existingSecret }}
- name: AWS_ACCESS_KEY_ID_FILE
  value: {{ printf "%s/%s" (include "ckptd.credentialsDir" .) "AWS_ACCESS_KEY_ID" | quote }}
- name: AWS_SECRET_ACCESS_KEY_FILE
  value: {{ printf "%s/%s" (include "ckptd.credentialsDir" .) "AWS_SECRET_ACCESS_KEY" | quote }}
{{- if .Values.storage.sessionTokenKey }}
- name: AWS_SESSION_TOKEN_FILE
  value: {{ printf "%s/%s" (include "ckptd.credentialsDir" .) "AWS_SESSION_TOKEN" | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ckptd's sidecar and restore containers: a read-only root, so HOME is the writable /tmp. */}}
{{- define "ckptd.env.home" -}}
- name: HOME
  value: /tmp
{{- end -}}
