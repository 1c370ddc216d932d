{{/*
The pod template, one for every workload kind: a Job's, a JobSet's replicated Job's, and a
PyTorchJob's Worker replicas all run exactly this.
*/}}

{{/* A shared folder: emptyDir (node-local, bounded) or a generic ephemeral volume (a PVC per pod). */}}
{{- define "ckptd.volumeSource" -}}
{{- if eq .type "ephemeral" -}}
ephemeral:
  volumeClaimTemplate:
    spec:
      accessModes: {{- toYaml .accessModes | nindent 8 }}
      {{- with .storageClassName }}
      storageClassName: {{ . | quote }}
      {{- end }}
      resources:
        requests:
          storage: {{ .size | quote }}
{{- else -}}
emptyDir:
  {{- with .medium }}
  medium: {{ . | quote }}
  {{- end }}
  {{- with .sizeLimit }}
  sizeLimit: {{ . | quote }}
  {{- end }}
{{- end -}}
{{- end -}}

{{- define "ckptd.mounts.ckptd" -}}
- name: ckptd-config
  mountPath: {{ include "ckptd.configDir" . }}
  readOnly: true
{{- if .Values.storage.existingSecret }}
- name: storage-credentials
  mountPath: {{ include "ckptd.credentialsDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.ckptd.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ckptd.probe" -}}
httpGet:
  path: {{ .path }}
  port: metrics
{{- with .probe }}
periodSeconds: {{ .periodSeconds | default 10 }}
timeoutSeconds: {{ .timeoutSeconds | default 5 }}
failureThreshold: {{ .failureThreshold | default 3 }}
{{- end }}
{{- end -}}

{{- define "ckptd.container.restore" -}}
- name: ckptd-restore
  image: {{ include "ckptd.ckptdImage" . | quote }}
  imagePullPolicy: {{ .Values.ckptd.image.pullPolicy }}
  command: ["/opt/ckptd/entrypoint.sh"]
  args: ["restore"]
  env:
    {{- include "ckptd.env.identity" . | nindent 4 }}
    {{- with include "ckptd.env.restoreDir" . }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- include "ckptd.env.ckptd" . | nindent 4 }}
    {{- include "ckptd.env.home" . | nindent 4 }}
    {{- with .Values.ckptd.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumeMounts:
    - name: loaded-checkpoints
      mountPath: {{ .Values.restore.path }}
    - name: ckptd-tmp
      mountPath: /tmp
    {{- include "ckptd.mounts.ckptd" . | nindent 4 }}
  resources: {{- toYaml (.Values.ckptd.restoreResources | default .Values.ckptd.resources) | nindent 4 }}
  securityContext: {{- toYaml .Values.ckptd.securityContext | nindent 4 }}
{{- end -}}

{{- define "ckptd.container.sidecar" -}}
- name: ckptd
  image: {{ include "ckptd.ckptdImage" . | quote }}
  imagePullPolicy: {{ .Values.ckptd.image.pullPolicy }}
  # A native sidecar: started before the trainer, stopped after it, restarted if it dies.
  restartPolicy: Always
  command: ["/opt/ckptd/entrypoint.sh"]
  args: {{ concat (list "watch") .Values.ckptd.extraArgs | toJson }}
  ports:
    - name: metrics
      containerPort: {{ .Values.ckptd.metricsPort }}
      protocol: TCP
  env:
    {{- include "ckptd.env.identity" . | nindent 4 }}
    {{- include "ckptd.env.ckptd" . | nindent 4 }}
    {{- include "ckptd.env.home" . | nindent 4 }}
    {{- with .Values.ckptd.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  # The trainer starts only once this passes (Kubernetes waits for a sidecar's startup probe).
  startupProbe: {{- include "ckptd.probe" (dict "path" .Values.ckptd.startupProbe.path "probe" .Values.ckptd.startupProbe) | nindent 4 }}
  livenessProbe: {{- include "ckptd.probe" (dict "path" "/healthz" "probe" .Values.ckptd.livenessProbe) | nindent 4 }}
  readinessProbe: {{- include "ckptd.probe" (dict "path" "/readyz" "probe" .Values.ckptd.readinessProbe) | nindent 4 }}
  volumeMounts:
    - name: checkpoints
      mountPath: {{ .Values.checkpoints.path }}
    - name: ckptd-tmp
      mountPath: /tmp
    {{- include "ckptd.mounts.ckptd" . | nindent 4 }}
  resources: {{- toYaml .Values.ckptd.resources | nindent 4 }}
  securityContext: {{- toYaml .Values.ckptd.securityContext | nindent 4 }}
{{- end -}}

{{/* The user's command: as is in sidecar mode, as the arguments of ckptd's entrypoint otherwise. */}}
{{- define "ckptd.container.trainer" -}}
{{- $entrypoint := eq .Values.mode "entrypoint" -}}
{{- $user := concat .Values.trainer.command .Values.trainer.args -}}
- name: {{ include "ckptd.trainerName" . }}
  image: {{ include "ckptd.trainerImage" . | quote }}
  imagePullPolicy: {{ .Values.trainer.image.pullPolicy }}
  {{- if $entrypoint }}
  command: ["/opt/ckptd/bin/dumb-init", "--", "/opt/ckptd/entrypoint.sh"]
  {{- $args := $user }}
  {{- if .Values.ckptd.extraArgs }}
  {{- $args = concat .Values.ckptd.extraArgs (ternary (prepend $user "--") (list) (gt (len $user) 0)) }}
  {{- end }}
  {{- with $args }}
  args: {{ toJson . }}
  {{- end }}
  {{- else }}
  {{- with .Values.trainer.command }}
  command: {{ toJson . }}
  {{- end }}
  {{- with .Values.trainer.args }}
  args: {{ toJson . }}
  {{- end }}
  {{- end }}
  {{- with .Values.trainer.workingDir }}
  workingDir: {{ . | quote }}
  {{- end }}
  env:
    {{- include "ckptd.env.identity" . | nindent 4 }}
    {{- with include "ckptd.env.restoreDir" . }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- include "ckptd.env.leader" . | nindent 4 }}
    {{- if $entrypoint }}
    {{- include "ckptd.env.ckptd" . | nindent 4 }}
    - name: CKPTD_STOP_TIMEOUT
      value: {{ .Values.trainer.stopTimeoutSeconds | int | quote }}
    {{- with .Values.ckptd.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- end }}
    {{- with .Values.trainer.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.trainer.envFrom }}
  envFrom: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $ports := .Values.trainer.ports }}
  {{- if eq .Values.workload.kind "PyTorchJob" }}
  {{- /* The operator's per-pod Services take their port from this name. */}}
  {{- $ports = prepend $ports (dict "name" "pytorchjob-port" "containerPort" (int .Values.workload.leaderPort) "protocol" "TCP") }}
  {{- end }}
  {{- if $entrypoint }}
  {{- $ports = prepend $ports (dict "name" "metrics" "containerPort" (int .Values.ckptd.metricsPort) "protocol" "TCP") }}
  {{- end }}
  {{- with $ports }}
  ports: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $entrypoint }}
  readinessProbe: {{- include "ckptd.probe" (dict "path" "/readyz" "probe" .Values.ckptd.readinessProbe) | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: checkpoints
      mountPath: {{ .Values.checkpoints.path }}
    {{- if .Values.restore.enabled }}
    - name: loaded-checkpoints
      mountPath: {{ .Values.restore.path }}
    {{- end }}
    {{- if $entrypoint }}
    {{- include "ckptd.mounts.ckptd" . | nindent 4 }}
    {{- end }}
    {{- with .Values.trainer.volumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.trainer.resources }}
  resources: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.trainer.securityContext }}
  securityContext: {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- define "ckptd.podTemplate" -}}
{{- $sidecar := eq .Values.mode "sidecar" -}}
metadata:
  labels:
    {{- include "ckptd.selectorLabels" . | nindent 4 }}
    {{- with .Values.workload.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    kubectl.kubernetes.io/default-container: {{ include "ckptd.trainerName" . }}
    {{- with .Values.workload.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  {{- if eq .Values.workload.kind "Job" }}
  # Host names <job>-<index>.<service>: the headless Service of the same name.
  subdomain: {{ include "ckptd.workloadName" . }}
  {{- end }}
  serviceAccountName: {{ include "ckptd.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  shareProcessNamespace: {{ include "ckptd.shareProcessNamespace" . }}
  terminationGracePeriodSeconds: {{ include "ckptd.gracePeriod" . }}
  {{- with .Values.podSecurityContext }}
  securityContext: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with .Values.schedulerName }}
  schedulerName: {{ . | quote }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
  {{- if $sidecar }}
  # In order: Kubernetes runs the restore to completion, then starts the sidecar.
  initContainers:
    {{- if .Values.restore.enabled }}
    {{- include "ckptd.container.restore" . | nindent 4 }}
    {{- end }}
    {{- include "ckptd.container.sidecar" . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "ckptd.container.trainer" . | nindent 4 }}
  volumes:
    - name: checkpoints
      {{- include "ckptd.volumeSource" .Values.checkpoints.volume | nindent 6 }}
    {{- if .Values.restore.enabled }}
    - name: loaded-checkpoints
      {{- include "ckptd.volumeSource" .Values.restore.volume | nindent 6 }}
    {{- end }}
    - name: ckptd-config
      configMap:
        name: {{ include "ckptd.configMapName" . }}
    {{- if $sidecar }}
    - name: ckptd-tmp
      emptyDir:
        sizeLimit: {{ .Values.ckptd.tmpSizeLimit | quote }}
    {{- end }}
    {{- if .Values.storage.existingSecret }}
    - name: storage-credentials
      secret:
        secretName: {{ .Values.storage.existingSecret }}
        # Group-readable through fsGroup; without an fsGroup ckptd's uid must read them as "other".
        defaultMode: {{ if (.Values.podSecurityContext | default dict).fsGroup }}0440{{ else }}0444{{ end }}
        items:
          - key: {{ .Values.storage.accessKeyIdKey }}
            path: AWS_ACCESS_KEY_ID
          - key: {{ .Values.storage.secretAccessKeyKey }}
            path: AWS_SECRET_ACCESS_KEY
          {{- with .Values.storage.sessionTokenKey }}
          - key: {{ . }}
            path: AWS_SESSION_TOKEN
          {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
