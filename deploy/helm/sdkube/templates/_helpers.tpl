{{/*
Names. The full name is cut to 63 characters (the DNS label limit of Kubernetes names).
*/}}
{{- define "sdkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sdkube.fullname" -}}
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

{{- define "sdkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector of the GPU workload's pods: the single server (`queue.backend: memory`) or the
workers (`redis`). The component label keeps other pods of the release (the `helm test` pod,
the api, Redis) out of the workload's selector, which would otherwise adopt them.
*/}}
{{- define "sdkube.serverSelectorLabels" -}}
{{ include "sdkube.selectorLabels" . }}
app.kubernetes.io/component: {{ include "sdkube.workloadComponent" . }}
{{- end }}

{{/* Selector of one component's pods: (dict "root" $ "component" "api"). */}}
{{- define "sdkube.componentSelectorLabels" -}}
{{ include "sdkube.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Scale-out: with `queue.backend: redis` an `api` Deployment serves the UI and APIs, the GPU
workload becomes the `worker`s, and they share the job queue in Redis (bundled or external).
*/}}
{{- define "sdkube.sharedQueue" -}}
{{- if eq .Values.queue.backend "redis" }}true{{ end }}
{{- end }}

{{- define "sdkube.workloadComponent" -}}
{{- if include "sdkube.sharedQueue" . }}worker{{ else }}server{{ end }}
{{- end }}

{{/* The component the Service, Ingress and `helm test` reach: the server, or the api. */}}
{{- define "sdkube.frontComponent" -}}
{{- if include "sdkube.sharedQueue" . }}api{{ else }}server{{ end }}
{{- end }}

{{/*
Name of one component's objects, `<fullname>-<suffix>`, cut so that a StatefulSet's name stays
within 52 characters (its pods' controller-revision-hash label must fit 63): (list $ "redis").
*/}}
{{- define "sdkube.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "sdkube.fullname" $root | trunc (int (sub 51 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{/* The GPU workload: `<fullname>` alone, or `<fullname>-worker` beside the api. */}}
{{- define "sdkube.workloadName" -}}
{{- if include "sdkube.sharedQueue" . }}
{{- include "sdkube.componentName" (list . "worker") }}
{{- else }}
{{- include "sdkube.fullname" . }}
{{- end }}
{{- end }}

{{- define "sdkube.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sdkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sdkube.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{- define "sdkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sdkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding hf-token, api-key and basic-auth: the user's or the chart's. */}}
{{- define "sdkube.secretName" -}}
{{- default (include "sdkube.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* Whether the chart creates its own Secret (only when there is something to keep in it). */}}
{{- define "sdkube.createSecret" -}}
{{- if and (not .Values.existingSecret) (or .Values.hfToken .Values.server.apiKey .Values.server.basicAuth) }}true{{ end }}
{{- end }}

{{/* Whether any Secret is referenced by the pods. */}}
{{- define "sdkube.useSecret" -}}
{{- if or .Values.existingSecret (include "sdkube.createSecret" .) }}true{{ end }}
{{- end }}

{{/* The volume name the pods mount at /data, also the StatefulSet's claim template name. */}}
{{- define "sdkube.dataVolume" -}}data{{- end }}

{{/* Name of the claim the chart creates (Deployment) or of the first StatefulSet replica's claim. */}}
{{- define "sdkube.claimName" -}}
{{- if .Values.persistence.existingClaim }}
{{- .Values.persistence.existingClaim }}
{{- else if eq .Values.workload.kind "StatefulSet" }}
{{- printf "%s-%s-0" (include "sdkube.dataVolume" .) (include "sdkube.workloadName" .) }}
{{- else }}
{{- printf "%s-data" (include "sdkube.fullname" .) }}
{{- end }}
{{- end }}

{{/* Cluster-scoped, so the namespace is part of the PersistentVolume's name. */}}
{{- define "sdkube.localVolumeName" -}}
{{- printf "%s-%s-data" .Release.Namespace (include "sdkube.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
storageClassName of the claim, following the Helm convention (bitnami common.storage.class):
the local volume's class when the chart creates the PV; unset -> field omitted (the default
class); "-" -> "" (no class, static binding only); otherwise the name.
*/}}
{{- define "sdkube.storageClassField" -}}
{{- $p := .Values.persistence }}
{{- if $p.localVolume.enabled }}
storageClassName: {{ $p.localVolume.storageClass | quote }}
{{- else if eq (toString $p.storageClass) "-" }}
storageClassName: ""
{{- else if $p.storageClass }}
storageClassName: {{ $p.storageClass | quote }}
{{- end }}
{{- end }}

{{/* The claim spec shared by the PVC and the StatefulSet's volumeClaimTemplate. */}}
{{- define "sdkube.claimSpec" -}}
accessModes:
  {{- toYaml .Values.persistence.accessModes | nindent 2 }}
{{- include "sdkube.storageClassField" . }}
{{- if .Values.persistence.localVolume.enabled }}
volumeName: {{ include "sdkube.localVolumeName" . }}
{{- end }}
resources:
  requests:
    storage: {{ .Values.persistence.size | quote }}
{{- end }}

{{/* The CA bundle's mount, shared by the init and the main container. */}}
{{- define "sdkube.caBundleMount" -}}
{{- if or .Values.caBundle.configMap .Values.caBundle.secret }}
- name: ca-bundle
  mountPath: /etc/sdkube/ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "sdkube.storePath" -}}/data/{{ .Values.persistence.subPaths.models }}{{- end }}

{{/* Proxy, mirror and token variables shared by the init and the main container. */}}
{{- define "sdkube.networkEnv" -}}
{{- $p := .Values.proxy }}
{{- if $p.http }}
- name: HTTP_PROXY
  value: {{ $p.http | quote }}
- name: http_proxy
  value: {{ $p.http | quote }}
{{- end }}
{{- if $p.https }}
- name: HTTPS_PROXY
  value: {{ $p.https | quote }}
- name: https_proxy
  value: {{ $p.https | quote }}
{{- end }}
{{- if and (or $p.http $p.https) $p.noProxy }}
- name: NO_PROXY
  value: {{ $p.noProxy | quote }}
- name: no_proxy
  value: {{ $p.noProxy | quote }}
{{- end }}
{{- if or .Values.caBundle.configMap .Values.caBundle.secret }}
- name: SDKUBE_CA_BUNDLE
  value: {{ printf "/etc/sdkube/ca/%s" .Values.caBundle.key | quote }}
{{- end }}
{{- if .Values.hfEndpoint }}
- name: HF_ENDPOINT
  value: {{ .Values.hfEndpoint | quote }}
{{- end }}
{{- if include "sdkube.useSecret" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "sdkube.secretName" . }}
      key: hf-token
      optional: true
{{- end }}
{{- end }}

{{/* Key prefix in Redis (SDKUBE_QUEUE_PREFIX): the release's full name unless set. */}}
{{- define "sdkube.queuePrefix" -}}
{{- .Values.queue.prefix | default (include "sdkube.fullname" .) }}
{{- end }}

{{/* Whether the chart runs its own Redis (shared queue, no external URL). */}}
{{- define "sdkube.redisBundled" -}}
{{- if and (include "sdkube.sharedQueue" .) (not .Values.queue.redis.url) }}true{{ end }}
{{- end }}

{{- define "sdkube.redisName" -}}
{{- include "sdkube.componentName" (list . "redis") }}
{{- end }}

{{/*
Where Redis is, as JSON (fromJson): scheme, address (host:port, as KEDA wants it), db and user
name, from queue.redis.url or the bundled Redis's Service. KEDA's operator runs in its own
namespace, so the bundled address carries the namespace.
*/}}
{{- define "sdkube.redisEndpoint" -}}
{{- if .Values.queue.redis.url }}
{{- $u := urlParse .Values.queue.redis.url }}
{{- $address := $u.host }}
{{- if not (regexMatch ":[0-9]+$" $address) }}{{ $address = printf "%s:6379" $address }}{{ end }}
{{- $db := trimPrefix "/" $u.path | default "0" }}
{{- toJson (dict "scheme" $u.scheme "address" $address "db" $db "username" (splitList ":" $u.userinfo | first)) }}
{{- else }}
{{- toJson (dict "scheme" "redis" "address" (printf "%s.%s.svc:6379" (include "sdkube.redisName" .) .Release.Namespace) "db" "0" "username" "") }}
{{- end }}
{{- end }}

{{/* Whether Redis is reached with a password: always the bundled one's; an external one's when given. */}}
{{- define "sdkube.redisAuth" -}}
{{- if and (include "sdkube.sharedQueue" .) (or .Values.queue.redis.existingSecret .Values.queue.redis.password (include "sdkube.redisBundled" .)) }}true{{ end }}
{{- end }}

{{/* Whether the chart keeps the password in its own Secret (given, or generated for the bundled Redis). */}}
{{- define "sdkube.redisCreateSecret" -}}
{{- if and (include "sdkube.redisAuth" .) (not .Values.queue.redis.existingSecret) }}true{{ end }}
{{- end }}

{{- define "sdkube.redisSecretName" -}}
{{- .Values.queue.redis.existingSecret | default (include "sdkube.redisName" .) }}
{{- end }}

{{- define "sdkube.redisSecretKey" -}}
{{- if .Values.queue.redis.existingSecret }}{{ .Values.queue.redis.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/*
SDKUBE_QUEUE for the api and the workers, and SDKUBE_QUEUE_PASSWORD from the Secret: the
password never appears in the pod spec, nor in the URL (so it need not be URL-safe).
*/}}
{{- define "sdkube.queueEnv" -}}
{{- $e := fromJson (include "sdkube.redisEndpoint" .) }}
{{- $user := "" }}
{{- if $e.username }}
{{- /* also what KEDA's TriggerAuthentication reads from this container */}}
- name: REDIS_USERNAME
  value: {{ $e.username | quote }}
{{- $user = printf "%s@" $e.username }}
{{- end }}
{{- if include "sdkube.redisAuth" . }}
- name: SDKUBE_QUEUE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "sdkube.redisSecretName" . }}
      key: {{ include "sdkube.redisSecretKey" . }}
{{- end }}
- name: SDKUBE_QUEUE
  value: {{ printf "%s://%s%s/%s" $e.scheme $user $e.address $e.db | quote }}
{{- end }}

{{/* storageClassName of a claim from a persistence map with the Helm convention (unset: omitted; "-": ""; else the name). */}}
{{- define "sdkube.storageClassOf" -}}
{{- if eq (toString .storageClass) "-" }}
storageClassName: ""
{{- else if .storageClass }}
storageClassName: {{ .storageClass | quote }}
{{- end }}
{{- end }}

{{- define "sdkube.device" -}}
{{- if .Values.server.device }}{{ .Values.server.device }}{{ else if gt (int .Values.gpu.count) 0 }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{/*
Every problem with the values, collected and reported at once (bitnami validateValues).
The schema checks types and names; this checks combinations.
*/}}
{{- define "sdkube.validateValues" -}}
{{- $errors := list }}
{{- $p := .Values.persistence }}
{{- $lv := $p.localVolume }}
{{- $replicas := int .Values.workload.replicas }}
{{- if .Values.autoscaling.enabled }}{{ $replicas = int .Values.autoscaling.maxReplicas }}{{ end }}
{{- $keda := .Values.autoscaling.keda }}
{{- if $keda.enabled }}{{ $replicas = int $keda.maxReplicaCount }}{{ end }}
{{- $shared := include "sdkube.sharedQueue" . }}
{{- $redis := .Values.queue.redis }}
{{- if and .Values.caBundle.configMap .Values.caBundle.secret }}
{{- $errors = append $errors "caBundle: set either configMap or secret, not both" }}
{{- end }}
{{- if and $lv.enabled (not $p.enabled) }}
{{- $errors = append $errors "persistence.localVolume.enabled needs persistence.enabled=true" }}
{{- end }}
{{- if and $lv.enabled $p.existingClaim }}
{{- $errors = append $errors "persistence.localVolume.enabled creates its own claim: unset persistence.existingClaim or disable localVolume" }}
{{- end }}
{{- if and $lv.enabled (not $lv.path) }}
{{- $errors = append $errors "persistence.localVolume.path is required: the directory on the node, e.g. /var/lib/sdkube" }}
{{- end }}
{{- if and $lv.enabled (eq $lv.type "local") (not $lv.nodeName) }}
{{- $errors = append $errors "persistence.localVolume.nodeName is required for type local: the node's kubernetes.io/hostname label (kubectl get nodes -L kubernetes.io/hostname)" }}
{{- end }}
{{- if and $lv.enabled $p.storageClass (ne (toString $p.storageClass) (toString $lv.storageClass)) }}
{{- $errors = append $errors (printf "persistence.storageClass (%v) differs from persistence.localVolume.storageClass (%v): the claim would never bind to the chart's volume; set only localVolume.storageClass" $p.storageClass $lv.storageClass) }}
{{- end }}
{{- if and $lv.enabled (gt $replicas 1) }}
{{- $errors = append $errors "persistence.localVolume is one volume on one node: use one replica (workload.replicas=1, no autoscaling)" }}
{{- end }}
{{- if and $p.enabled (not $p.existingClaim) (eq .Values.workload.kind "Deployment") (gt $replicas 1) (not (has "ReadWriteMany" $p.accessModes)) }}
{{- if $shared }}
{{- $errors = append $errors (printf "up to %d workers would share the model claim, which is ReadWriteOnce (one node): set persistence.accessModes=[ReadWriteMany] with a class that offers it (NFS, CephFS, EFS, Filestore, Azure Files), or workload.kind=StatefulSet (one volume per worker; each downloads the models)" $replicas) }}
{{- else }}
{{- $errors = append $errors "several Deployment replicas cannot share a ReadWriteOnce claim across nodes: set workload.kind=StatefulSet (one volume per replica) or persistence.accessModes=[ReadWriteMany]" }}
{{- end }}
{{- end }}
{{- if and $keda.enabled (not $shared) }}
{{- $errors = append $errors "autoscaling.keda scales the GPU workers of a shared queue: set queue.backend=redis (scaling the single server to zero would take the UI down with it)" }}
{{- end }}
{{- if and $keda.enabled .Values.autoscaling.enabled }}
{{- $errors = append $errors "autoscaling.enabled (an HPA) and autoscaling.keda.enabled both scale the workers: enable one (KEDA can scale to zero)" }}
{{- end }}
{{- if and $keda.enabled (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- $errors = append $errors "autoscaling.keda.minReplicaCount is larger than autoscaling.keda.maxReplicaCount" }}
{{- end }}
{{- if and $shared $redis.url }}
{{- /* Messages never repeat the URL: it may carry a password. */}}
{{- $u := urlParse $redis.url }}
{{- if not (has $u.scheme (list "redis" "rediss")) }}
{{- $errors = append $errors "queue.redis.url must start with redis:// (or rediss:// for TLS)" }}
{{- end }}
{{- if contains ":" $u.userinfo }}
{{- $errors = append $errors "queue.redis.url must not carry a password (the pod spec would show it): put the password in a Secret and name it in queue.redis.existingSecret (key queue.redis.existingSecretKey)" }}
{{- end }}
{{- if not $u.hostname }}
{{- $errors = append $errors "queue.redis.url names no host: redis://HOST:PORT/DB" }}
{{- end }}
{{- if or $u.query $u.fragment (not (regexMatch "^(/[0-9]+)?/?$" $u.path)) }}
{{- $errors = append $errors "queue.redis.url: after HOST:PORT only the database number may follow (redis://HOST:PORT/DB), no other path or query" }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9._~-]*$" $redis.password) }}
{{- $errors = append $errors "queue.redis.password may hold only letters, digits and -._~ (it goes into the queue URL)" }}
{{- end }}
{{- if and $shared $redis.existingSecret $redis.password }}
{{- $errors = append $errors (printf "queue.redis.password is ignored when queue.redis.existingSecret is set: put the password in Secret %s (key %s) and unset queue.redis.password" $redis.existingSecret $redis.existingSecretKey) }}
{{- end }}
{{- if and (eq (int .Values.gpu.count) 0) (hasPrefix "cuda" .Values.server.device) }}
{{- $errors = append $errors (printf "server.device=%s needs a GPU but gpu.count is 0" .Values.server.device) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.queueDepth.enabled) }}
{{- $errors = append $errors "autoscaling.enabled needs a metric: autoscaling.targetCPUUtilizationPercentage or autoscaling.queueDepth.enabled" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- $errors = append $errors "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- $errors = append $errors "ingress.enabled needs at least one entry in ingress.hosts" }}
{{- end }}
{{- if and .Values.server.model (not (has .Values.server.model .Values.models)) (not (hasPrefix "/" .Values.server.model)) .Values.models }}
{{- $errors = append $errors (printf "server.model %q is not in models %v, so nothing fetches it before the server starts: add it to models" .Values.server.model .Values.models) }}
{{- end }}
{{- if .Values.existingSecret }}
{{- range $key, $value := dict "hfToken" .Values.hfToken "server.apiKey" .Values.server.apiKey "server.basicAuth" .Values.server.basicAuth }}
{{- if $value }}
{{- $errors = append $errors (printf "%s is ignored when existingSecret is set: put it in Secret %s (keys hf-token, api-key, basic-auth) and unset %s" $key $.Values.existingSecret $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nsdkube: invalid values:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
