{{/*
Names. Every name the chart makes is a DNS-1035 label (a Service name must start with a letter,
a pod's host name may not hold a dot), whatever the release is called.
*/}}
{{- define "ckptd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ckptd.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $name = .Values.fullnameOverride -}}
{{- else -}}
{{- $base := default .Chart.Name .Values.nameOverride -}}
{{- if contains $base .Release.Name -}}
{{- $name = .Release.Name -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name $base -}}
{{- end -}}
{{- end -}}
{{- $name = $name | lower | replace "." "-" | replace "_" "-" -}}
{{- if not (regexMatch "^[a-z]" $name) -}}
{{- $name = printf "ckptd-%s" $name -}}
{{- end -}}
{{- $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The workload's name, short enough that the longest host name its pods get is a DNS label (63):
Job "<name>-<index>", PyTorchJob "<name>-worker-<index>", JobSet "<name>-<rjob>-0-<index>".
*/}}
{{- define "ckptd.workloadName" -}}
{{- $last := sub (int .Values.workload.nodes) 1 -}}
{{- $suffix := printf "-%d" $last -}}
{{- if eq .Values.workload.kind "PyTorchJob" -}}
{{- $suffix = printf "-worker-%d" $last -}}
{{- else if eq .Values.workload.kind "JobSet" -}}
{{- $suffix = printf "-%s-0-%d" .Values.workload.replicatedJobName $last -}}
{{- end -}}
{{- include "ckptd.fullname" . | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" -}}
{{- end -}}

{{- define "ckptd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ckptd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ckptd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: training
{{- end -}}

{{- define "ckptd.labels" -}}
helm.sh/chart: {{ include "ckptd.chart" . }}
{{ include "ckptd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ckptd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ckptd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ckptd.configMapName" -}}
{{- include "ckptd.fullname" . | trunc 56 | trimSuffix "-" -}}-config
{{- end -}}

{{- define "ckptd.ckptdImage" -}}
{{- printf "%s:%s" .Values.ckptd.image.repository (default .Chart.AppVersion .Values.ckptd.image.tag) -}}
{{- end -}}

{{- define "ckptd.trainerImage" -}}
{{- $img := .Values.trainer.image -}}
{{- if $img.tag -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- else -}}
{{- $img.repository -}}
{{- end -}}
{{- end -}}

{{- define "ckptd.trainerName" -}}
{{- if .Values.trainer.name -}}
{{- .Values.trainer.name -}}
{{- else if eq .Values.workload.kind "PyTorchJob" -}}
pytorch
{{- else -}}
trainer
{{- end -}}
{{- end -}}

{{/* The leader (node 0) as every pod reaches it: its host name under the workload's DNS. */}}
{{- define "ckptd.leaderHost" -}}
{{- $wl := include "ckptd.workloadName" . -}}
{{- if eq .Values.workload.kind "PyTorchJob" -}}
{{- printf "%s-worker-0" $wl -}}
{{- else if eq .Values.workload.kind "JobSet" -}}
{{- printf "%s-%s-0-0.%s" $wl .Values.workload.replicatedJobName $wl -}}
{{- else -}}
{{- printf "%s-0.%s" $wl $wl -}}
{{- end -}}
{{- end -}}

{{/*
Grace period: the trainer's last save after SIGTERM, then ckptd's drain, then a margin for
ckptd's own exit. Kubernetes gives the whole pod one grace period, shared by both in that order.
*/}}
{{- define "ckptd.gracePeriod" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (int .Values.trainer.stopTimeoutSeconds) (int .Values.ckptd.drainTimeoutSeconds) (int .Values.gracePeriodMarginSeconds) -}}
{{- else -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{- define "ckptd.shareProcessNamespace" -}}
{{- if kindIs "invalid" .Values.shareProcessNamespace -}}
{{- eq .Values.mode "sidecar" -}}
{{- else -}}
{{- .Values.shareProcessNamespace -}}
{{- end -}}
{{- end -}}

{{/* Mount points of what the chart mounts into ckptd's containers. */}}
{{- define "ckptd.configDir" -}}/etc/ckptd{{- end -}}
{{- define "ckptd.credentialsDir" -}}/var/run/secrets/ckptd/storage{{- end -}}
