{{/* Chart name, overridable with nameOverride. */}}
{{- define "dolly-train.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix, truncated to 63 characters because some Kubernetes name fields are limited to that. */}}
{{- define "dolly-train.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "dolly-train.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object and pod carries. */}}
{{- define "dolly-train.labels" -}}
helm.sh/chart: {{ include "dolly-train.chart" . }}
{{ include "dolly-train.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dolly-train
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Whether the staging Job downloads anything from the Hugging Face Hub (then it reads the token). */}}
{{- define "dolly-train.stagingUsesHub" -}}
{{- if or (eq .Values.staging.model.source "hub") (eq .Values.staging.data.source "hub") }}true{{ end }}
{{- end }}

{{/* "true" when the staging Job mounts the Hugging Face token Secret (it downloads from the Hub and a Secret is named). */}}
{{- define "dolly-train.hfTokenMounted" -}}
{{- if and (include "dolly-train.stagingUsesHub" .) .Values.staging.hfTokenSecret.name }}true{{ end }}
{{- end }}

{{/* Labels that identify this release's objects (stable across upgrades). */}}
{{- define "dolly-train.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dolly-train.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount of the Ray pods. */}}
{{- define "dolly-train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dolly-train.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image of a role: dict "root" $ "override" .Values.<role>.image; a role's repository/tag win over image.*. */}}
{{- define "dolly-train.image" -}}
{{- $img := .root.Values.image }}
{{- $o := .override | default dict }}
{{- $repo := $o.repository | default $img.repository }}
{{- $tag := $o.tag | default $img.tag | default .root.Chart.AppVersion }}
{{- /* A digest pins the image: the tag stays for readers, the kubelet pulls by the digest. */}}
{{- $digest := $o.digest | default $img.digest }}
{{- printf "%s:%s" $repo (toString $tag) }}{{ with $digest }}@{{ . }}{{ end }}
{{- end }}

{{/* The mount path without a trailing slash. */}}
{{- define "dolly-train.mountPath" -}}
{{- .Values.storage.mountPath | trimSuffix "/" }}
{{- end }}

{{/* The claim mounted everywhere: an existing one or the chart's. */}}
{{- define "dolly-train.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-data" (include "dolly-train.fullname" .)) }}
{{- end }}

{{/* The training config with the empty paths derived from the mount path, as YAML (train.yaml). */}}
{{- define "dolly-train.trainConfig" -}}
{{- $mount := include "dolly-train.mountPath" . }}
{{- $t := deepCopy .Values.train }}
{{- if not $t.model.path }}
{{- $_ := set $t.model "path" (printf "%s/models/%s" $mount .Values.staging.model.name) }}
{{- end }}
{{- if not $t.data.path }}
{{- $_ := set $t.data "path" (printf "%s/data/%s" $mount .Values.staging.data.name) }}
{{- end }}
{{- if not $t.checkpoint.storage_path }}
{{- $_ := set $t.checkpoint "storage_path" (printf "%s/runs" $mount) }}
{{- end }}
{{- /* Go writes 1e-05 where PyYAML (YAML 1.1) reads a float only with a dot: 1.0e-05; else lr would load as a string. */}}
{{- regexReplaceAll "(?m)^(\\s*(?:- |[A-Za-z_]+: )-?[0-9]+)([eE][-+]?[0-9]+)$" (toYaml $t) "${1}.0${2}" }}
{{- end }}

{{/* The job's entrypoint: what `ray job submit --` runs on the head. */}}
{{- define "dolly-train.entrypoint" -}}
{{- .Values.rayJob.entrypoint | default (printf "dolly-train train --config %s/train.yaml" (.Values.configMountPath | trimSuffix "/")) }}
{{- end }}

{{/* Container security context (every container). */}}
{{- define "dolly-train.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* Pod-level fields every pod shares: security context, pull secrets, priority class. */}}
{{- define "dolly-train.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* NAME: value map -> env list, sorted by name so renders are stable. */}}
{{- define "dolly-train.envList" -}}
{{- range $k, $v := . }}
- name: {{ $k }}
  value: {{ toString $v | quote }}
{{- end }}
{{- end }}

{{/* Environment of the Ray containers: dict "root" $ "extra" <role env map>. */}}
{{- define "dolly-train.rayEnv" -}}
{{- $root := .root }}
{{- $env := dict "HF_HOME" (printf "%s/hf-cache" (include "dolly-train.mountPath" $root)) "HF_HUB_OFFLINE" "1" "HF_DATASETS_OFFLINE" "1" "RAY_USAGE_STATS_ENABLED" "0" }}
{{- $env = merge (deepCopy (.extra | default dict)) (deepCopy ($root.Values.env | default dict)) $env }}
{{- include "dolly-train.envList" $env }}
{{- end }}

{{/* Volumes of the Ray pods: the shared claim, the config and an in-memory /dev/shm of the given size. */}}
{{- define "dolly-train.rayVolumes" -}}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "dolly-train.claimName" .root }}
- name: train-config
  configMap:
    name: {{ include "dolly-train.fullname" .root }}-config
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}

{{/* Mounts matching dolly-train.rayVolumes; the data volume sits at the same path in every pod. */}}
{{- define "dolly-train.rayVolumeMounts" -}}
- name: data
  mountPath: {{ include "dolly-train.mountPath" . }}
- name: train-config
  mountPath: {{ .Values.configMountPath | trimSuffix "/" }}
  readOnly: true
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/*
Worker groups: `worker` first, then each enabled additionalWorkerGroups entry with unset keys taken from `worker`.
Returns YAML: {groups: [{groupName, replicas, gpusPerPod, ...}, ...]}.
*/}}
{{- define "dolly-train.workerGroups" -}}
{{- $groups := list .Values.worker }}
{{- range $name := keys .Values.additionalWorkerGroups | sortAlpha }}
{{- $g := index $.Values.additionalWorkerGroups $name }}
{{- if not $g.disabled }}
{{- $merged := merge (deepCopy $g) (dict "groupName" $name) (deepCopy $.Values.worker) }}
{{- $_ := set $merged "groupName" $name }}
{{- $groups = append $groups $merged }}
{{- end }}
{{- end }}
{{- toYaml (dict "groups" $groups) }}
{{- end }}

{{/* Fail early (at template time) on values that are valid alone but wrong together. */}}
{{- define "dolly-train.validate" -}}
{{- $groups := (include "dolly-train.workerGroups" . | fromYaml).groups }}
{{- $gpus := 0 }}
{{- range $groups }}
{{- $gpus = add $gpus (mul (int .replicas) (int .gpusPerPod)) }}
{{- end }}
{{- $s := .Values.train.scaling }}
{{- if and $s.use_gpu (gt (int $s.num_workers) (int $gpus)) }}
{{- fail (printf "train.scaling.num_workers: %d GPU workers need %d GPUs, but the worker groups have %d (worker.replicas x worker.gpusPerPod, plus additionalWorkerGroups)" (int $s.num_workers) (int $s.num_workers) (int $gpus)) }}
{{- end }}
{{- if and $s.use_gpu (eq (int $gpus) 0) }}
{{- fail "train.scaling.use_gpu: true, but worker.gpusPerPod is 0 in every worker group" }}
{{- end }}
{{- /* CPU slots: Ray counts a worker pod's num-cpus (rayStartParams) or else its CPU limit; "500m" counts 0. */}}
{{- $cpus := 0 }}
{{- range $groups }}
{{- $c := toString (index (.rayStartParams | default dict) "num-cpus" | default .resources.limits.cpu) }}
{{- $n := hasSuffix "m" $c | ternary (div (int (trimSuffix "m" $c)) 1000) (int (float64 $c)) }}
{{- $cpus = add $cpus (mul (int .replicas) $n) }}
{{- end }}
{{- $need := mul (int $s.num_workers) (int $s.cpus_per_worker) }}
{{- if gt (int $need) (int $cpus) }}
{{- fail (printf "train.scaling: %d workers x cpus_per_worker %d need %d CPUs, but the worker groups offer %d (replicas x the CPU limit or rayStartParams num-cpus); Ray would wait for them forever" (int $s.num_workers) (int $s.cpus_per_worker) (int $need) (int $cpus)) }}
{{- end }}
{{- if and .Values.rayJob.deletionStrategy .Values.rayJob.shutdownAfterJobFinishes }}
{{- fail "rayJob.deletionStrategy: set it or rayJob.shutdownAfterJobFinishes, not both (both decide what happens to the cluster after the job)" }}
{{- end }}
{{- $m := .Values.staging.model }}
{{- if and .Values.staging.enabled (eq $m.source "hub") $m.gated (not .Values.staging.hfTokenSecret.name) }}
{{- fail (printf "staging.hfTokenSecret.name: %s is a gated model (staging.model.gated: true), so the staging Job needs a Hugging Face token. Accept the model's licence on huggingface.co, create the Secret in the release namespace:\n  kubectl create secret generic hf-token --from-literal=token=hf_...\nand set staging.hfTokenSecret.name=hf-token (or staging.model.gated=false for a public model)" $m.repoId) }}
{{- end }}
{{- if .Values.kueue.queueName }}
{{- if ne .Values.mode "rayjob" }}
{{- fail (printf "kueue.queueName: set for mode %s, but the chart queues only a RayJob with Kueue (mode: rayjob); leave kueue.queueName empty" .Values.mode) }}
{{- end }}
{{- if not .Values.rayJob.shutdownAfterJobFinishes }}
{{- fail "kueue.queueName: Kueue's RayJob webhook rejects a RayJob whose cluster outlives the job ('a kueue managed job should delete the cluster after finishing'); set rayJob.shutdownAfterJobFinishes=true and leave rayJob.deletionStrategy empty" }}
{{- end }}
{{- range $groups }}
{{- if eq .groupName "head" }}
{{- fail "kueue.queueName: Kueue reserves the pod set name 'head' for the head group; rename the worker group (worker.groupName or the additionalWorkerGroups key)" }}
{{- end }}
{{- end }}
{{- else if .Values.kueue.priorityClassName }}
{{- fail (printf "kueue.priorityClassName: %q has no effect without kueue.queueName (Kueue manages only RayJobs with a queue); set kueue.queueName or use priorityClassName for the pods" .Values.kueue.priorityClassName) }}
{{- end }}
{{- if .Values.preemption.preStop }}
{{- range $groups }}
{{- if lt (sub (int .terminationGracePeriodSeconds) (int $.Values.preemption.reserveSeconds)) 10 }}
{{- fail (printf "worker group %s: terminationGracePeriodSeconds %d leaves the preStop hook less than 10 s after preemption.reserveSeconds %d for the workers to save; raise the grace period (one step plus one checkpoint save) or set preemption.preStop=false" .groupName (int .terminationGracePeriodSeconds) (int $.Values.preemption.reserveSeconds)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.staging.enabled (not (hasPrefix "/" (.Values.train.model.path | default "/"))) }}
{{- fail (printf "train.model.path: %q is not a path on the volume, but staging.enabled writes the model to a path; leave it empty or give an absolute path" .Values.train.model.path) }}
{{- end }}
{{- end }}

{{/* "true" when rank 0 publishes its progress on the RayJob (progress.enabled, mode rayjob: a RayJob to write to). */}}
{{- define "dolly-train.progressOn" -}}
{{- and .Values.progress.enabled (eq .Values.mode "rayjob") }}
{{- end }}

{{/*
"true" unless progress.admissionPolicyOnly: then the release renders the admission policy (admission-policy.yaml)
and nothing else - a second release of the same chart with the same values, installed by whoever may create
cluster-scoped objects (under Argo CD the platform project's dolly-train-progress-policy Application), while the
workload release sets progress.admissionPolicy: false. Every other template is gated on this.
*/}}
{{- define "dolly-train.workloadOn" -}}
{{- not .Values.progress.admissionPolicyOnly }}
{{- end }}

{{/* Name of the progress ValidatingAdmissionPolicy and its Binding: cluster-scoped, so namespace and release in it. */}}
{{- define "dolly-train.admissionPolicyName" -}}
{{- printf "%s.%s.progress-only.dolly-train.dev" (include "dolly-train.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The workers' preStop hook (preemption.preStop): dict "root" $ "grace" <terminationGracePeriodSeconds>.
The kubelet runs it before it sends SIGTERM to the container's PID 1 (KubeRay's `ray start --block`, whose own
SIGTERM handler drains the node and stops the raylet: the training processes would die without saving). Every
training process registers its pid and start time in DOLLY_SIGTERM_PID_DIR while its SIGTERM handler is installed
(trainer/preemption.py); the hook SIGTERMs each one still running as the same process (a reused pid is skipped),
then waits until they have exited - they finish the step and save together - for at most the grace period less
preemption.reserveSeconds, which stay for `ray start` to drain and stop. Its output goes to PID 1's stdout, i.e.
`kubectl logs`. tests/test_preemption_pod.py runs it against KubeRay's worker command.
*/}}
{{- define "dolly-train.preStopScript" -}}
{{- $wait := sub (int .grace) (int .root.Values.preemption.reserveSeconds) -}}
if [ -w /proc/1/fd/1 ]; then exec >>/proc/1/fd/1 2>&1; fi
dir="${DOLLY_SIGTERM_PID_DIR:?}"; end=$((SECONDS + {{ $wait }})); pids=""
for f in "$dir"/*; do
  p="${f##*/}"; case "$p" in ''|*[!0-9]*) continue ;; esac
  stat="$(cat "/proc/$p/stat" 2>/dev/null)" || continue
  set -- ${stat##*) }
  [ "${20}" = "$(cat "$f" 2>/dev/null)" ] || continue
  kill -TERM "$p" 2>/dev/null && pids="$pids $p"
done
echo "[dolly-train] preStop: SIGTERM sent to training processes:${pids:- none}; waiting up to {{ $wait }} s for them to save and exit"
for p in $pids; do
  while kill -0 "$p" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 1; done
done
left=""; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
echo "[dolly-train] preStop: done after ${SECONDS} s; still running:${left:- none}"
{{- end }}
