{{/*
Rules that span several values, which values.schema.json cannot state. Each message names the
values and what to do.
*/}}
{{- define "ckptd.validate" -}}
{{- $v := .Values -}}
{{- $ckpt := trimSuffix "/" $v.checkpoints.path -}}
{{- $restore := trimSuffix "/" $v.restore.path -}}
{{- if and $v.restore.enabled (or (eq $ckpt $restore) (hasPrefix (printf "%s/" $ckpt) $restore) (hasPrefix (printf "%s/" $restore) $ckpt)) -}}
{{- fail (printf "restore.path (%s) and checkpoints.path (%s) must be separate folders, neither inside the other: ckptd would upload what it restored" $v.restore.path $v.checkpoints.path) -}}
{{- end -}}
{{- range $key := list "storage" "project" "job_id" "node_rank" "group_size" "drain_timeout" "metrics_addr" "checkpointing_config" "load_checkpoint_config" -}}
{{- if hasKey $v.ckptd.config $key -}}
{{- fail (printf "ckptd.config.%s: the chart sets this one; use the chart's values (storage.*, project, jobId, workload.nodes, ckptd.drainTimeoutSeconds, ckptd.metricsPort, checkpoints.*, restore.*)" $key) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.workload.kind "PyTorchJob") (ne (include "ckptd.trainerName" .) "pytorch") -}}
{{- fail (printf "trainer.name is %q: a PyTorchJob's training container must be named \"pytorch\" (leave trainer.name empty)" $v.trainer.name) -}}
{{- end -}}
{{- if and (eq $v.mode "entrypoint") (not $v.trainer.command) (not $v.trainer.args) (not (hasKey $v.ckptd.config "start_commands")) -}}
{{- fail "mode entrypoint: set trainer.command (the training command ckptd run starts) or ckptd.config.start_commands" -}}
{{- end -}}
{{- $first := first (concat $v.trainer.command $v.trainer.args | default (list "")) -}}
{{- if and (eq $v.mode "entrypoint") (not $v.ckptd.extraArgs) (has $first (list "run" "watch" "restore" "ls" "inspect" "urls" "download" "prune" "version")) -}}
{{- fail (printf "mode entrypoint: the command starts with %q, which ckptd's entrypoint takes for its own command; give its path (e.g. /usr/bin/%s) or run it through a shell" $first $first) -}}
{{- end -}}
{{- if eq (int $v.ckptd.metricsPort) (int $v.workload.leaderPort) -}}
{{- fail (printf "ckptd.metricsPort and workload.leaderPort are both %d: the pod's containers share one network namespace" (int $v.ckptd.metricsPort)) -}}
{{- end -}}
{{- if and (not (kindIs "invalid" $v.terminationGracePeriodSeconds)) (lt (int $v.terminationGracePeriodSeconds) (int $v.ckptd.drainTimeoutSeconds)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) is shorter than ckptd.drainTimeoutSeconds (%d): Kubernetes would kill ckptd in the middle of its final drain; leave it null to have it computed" (int $v.terminationGracePeriodSeconds) (int $v.ckptd.drainTimeoutSeconds)) -}}
{{- end -}}
{{- end -}}
