{{/*
The RayCluster spec, shared by the RayJob (spec.rayClusterSpec) and the long-lived RayCluster (spec).
Head: CPU only (num-gpus "0"). Workers: one group per entry of dolly-train.workerGroups.
*/}}
{{- define "dolly-train.rayClusterSpec" -}}
rayVersion: {{ .Values.rayVersion | quote }}
{{- if .Values.rayAuth.enabled }}
# Ray token auth: KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret's key auth_token) in the
# head, worker and submitter containers (KubeRay v1.7.0 common/pod.go, SetContainerTokenAuthEnvVars).
authOptions:
  mode: token
  {{- with .Values.rayAuth.secretName }}
  secretName: {{ . }}
  {{- end }}
{{- end }}
headGroupSpec:
  serviceType: {{ .Values.head.serviceType }}
  rayStartParams:
    {{- toYaml (merge (dict "num-gpus" "0") (deepCopy .Values.head.rayStartParams)) | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "dolly-train.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      serviceAccountName: {{ include "dolly-train.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- include "dolly-train.podCommon" . | nindent 6 }}
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "dolly-train.image" (dict "root" . "override" .Values.head.image) }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - {containerPort: 6379, name: gcs}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
          env:
            {{- include "dolly-train.rayEnv" (dict "root" . "extra" .Values.head.env) | trim | nindent 12 }}
          {{- with .Values.storage.objectStore.credentialsSecret }}
          envFrom:
            - secretRef:
                name: {{ . }}
          {{- end }}
          resources:
            {{- toYaml .Values.head.resources | nindent 12 }}
          securityContext:
            {{- include "dolly-train.securityContext" . | nindent 12 }}
          volumeMounts:
            {{- include "dolly-train.rayVolumeMounts" . | nindent 12 }}
      volumes:
        {{- include "dolly-train.rayVolumes" (dict "root" . "shmSize" .Values.head.shmSize) | nindent 8 }}
workerGroupSpecs:
{{- range $g := (include "dolly-train.workerGroups" . | fromYaml).groups }}
  - groupName: {{ $g.groupName }}
    replicas: {{ $g.replicas }}
    # A fixed-size group: the training world size must not change under Ray Train.
    minReplicas: {{ $g.replicas }}
    maxReplicas: {{ $g.replicas }}
    rayStartParams:
      {{- toYaml ($g.rayStartParams | default dict) | nindent 6 }}
    template:
      metadata:
        labels:
          {{- include "dolly-train.labels" $ | nindent 10 }}
          app.kubernetes.io/component: ray-worker
          dolly-train/worker-group: {{ $g.groupName }}
      spec:
        serviceAccountName: {{ include "dolly-train.serviceAccountName" $ }}
        # The token only where rank 0 may run, and only for the progress annotation (rbac.yaml: get/patch on the
        # RayJob itself).
        automountServiceAccountToken: {{ include "dolly-train.progressOn" $ | eq "true" }}
        # SIGTERM -> finish the step, save a checkpoint, exit (docs/operations.md): time for that before SIGKILL.
        terminationGracePeriodSeconds: {{ int $g.terminationGracePeriodSeconds }}
        {{- include "dolly-train.podCommon" $ | nindent 8 }}
        {{- with $g.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "dolly-train.image" (dict "root" $ "override" $g.image) }}
            imagePullPolicy: {{ $.Values.image.pullPolicy }}
            env:
              {{- include "dolly-train.rayEnv" (dict "root" $ "extra" $g.env) | trim | nindent 14 }}
              {{- if eq (include "dolly-train.progressOn" $) "true" }}
              # trainer/progress.py: the RayJob whose dolly-train.dev/progress annotation rank 0 writes.
              - name: DOLLY_RAYJOB_NAME
                value: {{ include "dolly-train.fullname" $ | quote }}
              - name: DOLLY_RAYJOB_NAMESPACE
                valueFrom:
                  fieldRef: {fieldPath: metadata.namespace}
              {{- end }}
              {{- if $.Values.preemption.preStop }}
              # trainer/preemption.py: each training process registers here for the preStop hook below.
              - name: DOLLY_SIGTERM_PID_DIR
                value: /dev/shm/dolly-train-sigterm
              {{- end }}
            {{- with $.Values.storage.objectStore.credentialsSecret }}
            envFrom:
              - secretRef:
                  name: {{ . }}
            {{- end }}
            {{- if $.Values.preemption.preStop }}
            # SIGTERM the training processes and wait for their checkpoint before the kubelet signals PID 1
            # (`ray start --block`, which stops the raylet). docs/operations.md, "Preemption".
            lifecycle:
              preStop:
                exec:
                  command:
                    - /bin/bash
                    - -c
                    - |
                      {{- include "dolly-train.preStopScript" (dict "root" $ "grace" $g.terminationGracePeriodSeconds) | nindent 22 }}
            {{- end }}
            resources:
              {{- $res := deepCopy $g.resources }}
              {{- if gt (int $g.gpusPerPod) 0 }}
              {{- $_ := set $res "requests" (merge (dict $g.gpuResourceName (int $g.gpusPerPod)) ($res.requests | default dict)) }}
              {{- $_ := set $res "limits" (merge (dict $g.gpuResourceName (int $g.gpusPerPod)) ($res.limits | default dict)) }}
              {{- end }}
              {{- toYaml $res | nindent 14 }}
            securityContext:
              {{- include "dolly-train.securityContext" $ | nindent 14 }}
            volumeMounts:
              {{- include "dolly-train.rayVolumeMounts" $ | nindent 14 }}
        volumes:
          {{- include "dolly-train.rayVolumes" (dict "root" $ "shmSize" $g.shmSize) | nindent 10 }}
{{- end }}
{{- end }}
