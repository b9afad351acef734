{{/*
The pod template shared by the Deployment and the StatefulSet.
The data volume is mounted once at /data and the server is pointed at directories inside it
(persistence.subPaths): the binary creates them as its own user, whereas kubelet-created
subPath directories would belong to root.
*/}}
{{- define "sdkube.podTemplate" -}}
metadata:
  labels:
    {{- include "sdkube.serverSelectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if include "sdkube.createSecret" . }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- if include "sdkube.redisCreateSecret" . }}
    checksum/redis-secret: {{ include (print $.Template.BasePath "/redis-secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "sdkube.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.workload.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- $selector := dict }}
  {{- range $k, $v := .Values.nodeSelector }}
  {{- if and (not (kindIs "invalid" $v)) (or (gt (int $.Values.gpu.count) 0) (ne $k "nvidia.com/gpu.present")) }}
  {{- $_ := set $selector $k $v }}
  {{- end }}
  {{- end }}
  {{- with $selector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.models }}
  initContainers:
    - name: fetch-models
      image: {{ include "sdkube.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["sdkube"]
      args:
        - fetch
        {{- range .Values.models }}
        - {{ . | quote }}
        {{- end }}
        - --store
        - {{ include "sdkube.storePath" . | quote }}
        - --progress
        - json
        {{- range .Values.fetch.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: SDKUBE_STORE
          value: {{ include "sdkube.storePath" . | quote }}
        - name: SDKUBE_LOG_JSON
          value: {{ .Values.server.logJson | quote }}
        {{- with include "sdkube.networkEnv" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.fetch.resources | nindent 8 }}
      volumeMounts:
        - name: {{ include "sdkube.dataVolume" . }}
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        {{- with include "sdkube.caBundleMount" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
  {{- end }}
  containers:
    - name: sdkube
      image: {{ include "sdkube.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["sdkube"]
      args:
        - serve
        {{- range .Values.server.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "sdkube.fullname" . }}
      {{- $env := include "sdkube.mainEnv" . | trim }}
      {{- with $env }}
      env:
        {{- . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: 7860
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- $res := deepCopy (default dict .Values.resources) }}
        {{- if gt (int .Values.gpu.count) 0 }}
        {{- $limits := default dict $res.limits }}
        {{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        - name: {{ include "sdkube.dataVolume" . }}
          mountPath: /data
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- with include "sdkube.caBundleMount" . | trim }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    {{- if not (and .Values.persistence.enabled (eq .Values.workload.kind "StatefulSet") (not .Values.persistence.existingClaim)) }}
    - name: {{ include "sdkube.dataVolume" . }}
      {{- if .Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "sdkube.claimName" . }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shmSize | quote }}
    {{- with include "sdkube.caBundleVolume" . | trim }}
    {{- . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The CA bundle's volume (caBundle.configMap or .secret), for the pods that mount it. */}}
{{- define "sdkube.caBundleVolume" -}}
{{- with .Values.caBundle }}
{{- if .configMap }}
- name: ca-bundle
  configMap:
    name: {{ .configMap | quote }}
    items:
      - key: {{ .key | quote }}
        path: {{ .key | quote }}
{{- else if .secret }}
- name: ca-bundle
  secret:
    secretName: {{ .secret | quote }}
    items:
      - key: {{ .key | quote }}
        path: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Main container variables beyond the ConfigMap: a worker's role and queue, secrets, network
settings, the user's extras.
*/}}
{{- define "sdkube.mainEnv" -}}
{{- if include "sdkube.sharedQueue" . }}
- name: SDKUBE_ROLE
  value: worker
{{- include "sdkube.queueEnv" . }}
{{- end }}
{{- include "sdkube.secretEnv" . }}
{{- include "sdkube.networkEnv" . }}
{{- with .Values.server.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The API key and basic auth, from the chart's Secret or the existing one. */}}
{{- define "sdkube.secretEnv" -}}
{{- if include "sdkube.useSecret" . }}
- name: SDKUBE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "sdkube.secretName" . }}
      key: api-key
      optional: true
- name: SDKUBE_BASIC_AUTH
  valueFrom:
    secretKeyRef:
      name: {{ include "sdkube.secretName" . }}
      key: basic-auth
      optional: true
{{- end }}
{{- end }}
