{{/*
Chart name, truncated for use in labels.
*/}}
{{- define "matrix-provider.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: also the RayCluster's name. Capped at 40 characters so that the names KubeRay derives from it
(e.g. "<name>-head-svc", worker pod names) stay within Kubernetes' limits.
*/}}
{{- define "matrix-provider.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "matrix-provider.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "matrix-provider.selectorLabels" -}}
app.kubernetes.io/name: {{ include "matrix-provider.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "matrix-provider.labels" -}}
helm.sh/chart: {{ include "matrix-provider.chart" . }}
{{ include "matrix-provider.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: matrix-provider
{{- end }}

{{/*
Name of the Ray head Service KubeRay creates for the RayCluster: "<cluster name>-head-svc".
*/}}
{{- define "matrix-provider.headService" -}}
{{- printf "%s-head-svc" (include "matrix-provider.fullname" .) }}
{{- end }}

{{/*
DNS name of the head Service, as seen from other namespaces.
*/}}
{{- define "matrix-provider.headHost" -}}
{{- printf "%s.%s.svc.%s" (include "matrix-provider.headService" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
Secret holding the Ray auth token (key "auth_token").
*/}}
{{- define "matrix-provider.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-ray-auth" (include "matrix-provider.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Image of a node group. Call with (dict "root" $ "group" <group values or empty dict>).
*/}}
{{- define "matrix-provider.image" -}}
{{- $root := .root }}
{{- $own := default (dict) .group.image }}
{{- $repository := default $root.Values.image.repository $own.repository }}
{{- $tag := default $root.Chart.AppVersion $root.Values.image.tag }}
{{- $tag = default $tag $own.tag }}
{{- printf "%s:%s%s" $repository $tag (default "" $own.tagSuffix) }}
{{- end }}

{{/*
Quote one shell word (single quotes; an embedded single quote becomes '\'').
*/}}
{{- define "matrix-provider.shellWord" -}}
{{- printf "'%s'" (replace "'" "'\\''" (toString .)) }}
{{- end }}

{{/*
Environment every Ray container gets: token auth from the auth Secret.
*/}}
{{- define "matrix-provider.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "matrix-provider.authSecretName" . }}
      key: auth_token
{{- end }}

{{/*
Pod template of a Ray node group.
Call with (dict "root" $ "group" <group values> "kind" "head"|"worker" "name" <group name>).
*/}}
{{- define "matrix-provider.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $ports := $root.Values.ports -}}
metadata:
  labels:
    {{- include "matrix-provider.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .kind }}
    {{- with $g.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $g.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .kind }}
      image: {{ include "matrix-provider.image" (dict "root" $root "group" $g) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      ports:
        {{- if eq .kind "head" }}
        - name: gcs-server
          containerPort: {{ $ports.gcs }}
          protocol: TCP
        - name: dashboard
          containerPort: {{ $ports.dashboard }}
          protocol: TCP
        - name: client
          containerPort: {{ $ports.client }}
          protocol: TCP
        - name: serve
          containerPort: {{ $ports.serve }}
          protocol: TCP
        {{- end }}
        - name: metrics
          containerPort: {{ $root.Values.metrics.port }}
          protocol: TCP
      env:
        {{- include "matrix-provider.rayAuthEnv" $root | nindent 8 }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- with $g.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $g.shmSize }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- with $g.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Ray start parameters of a group: the user's, plus the metrics port (and the dashboard host on the head).
*/}}
{{- define "matrix-provider.rayStartParams" -}}
{{- $params := dict "metrics-export-port" (toString .root.Values.metrics.port) }}
{{- if eq .kind "head" }}
{{- $_ := set $params "dashboard-host" "0.0.0.0" }}
{{- $_ := set $params "dashboard-port" (toString .root.Values.ports.dashboard) }}
{{- end }}
{{- range $k, $v := .group.rayStartParams }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/*
A worker group. Call with (dict "root" $ "group" <group values>).
*/}}
{{- define "matrix-provider.workerGroup" -}}
{{- $g := .group -}}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    {{- include "matrix-provider.rayStartParams" (dict "root" .root "group" $g "kind" "worker") | nindent 4 }}
  template:
    {{- include "matrix-provider.podTemplate" (dict "root" .root "group" $g "kind" "worker") | nindent 4 }}
{{- end }}

{{/*
spec of the RayCluster (also spec.rayClusterSpec of a RayJob that brings its own cluster).
*/}}
{{- define "matrix-provider.rayClusterSpec" -}}
{{- $v := .Values -}}
rayVersion: {{ $v.rayVersion | quote }}
authOptions:
  mode: token
  secretName: {{ include "matrix-provider.authSecretName" . }}
enableInTreeAutoscaling: {{ $v.autoscaler.enabled }}
{{- if and $v.autoscaler.enabled $v.autoscaler.options }}
autoscalerOptions:
  {{- toYaml $v.autoscaler.options | nindent 2 }}
{{- end }}
headGroupSpec:
  serviceType: {{ $v.head.serviceType }}
  rayStartParams:
    {{- include "matrix-provider.rayStartParams" (dict "root" . "group" $v.head "kind" "head") | nindent 4 }}
  template:
    {{- include "matrix-provider.podTemplate" (dict "root" . "group" $v.head "kind" "head") | nindent 4 }}
{{- $groups := list }}
{{- if $v.workers.cpu.enabled }}{{ $groups = append $groups $v.workers.cpu }}{{ end }}
{{- if $v.workers.gpu.enabled }}{{ $groups = append $groups $v.workers.gpu }}{{ end }}
{{- if $groups }}
workerGroupSpecs:
  {{- range $groups }}
  {{- include "matrix-provider.workerGroup" (dict "root" $ "group" .) | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}
