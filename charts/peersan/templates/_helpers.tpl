{{/*
Names, labels, image references and the small decisions the manifests share. Conditionals
live here, so that the manifests read as plain objects.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "peersan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: fullnameOverride, or "<release>-<name>", or the release name
when it already contains the chart name. Kept to 36 characters so that the longest name,
"<prefix>-csi-controller-provisioner", stays within 63 (a DNS label).
*/}}
{{- define "peersan.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- $name := include "peersan.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 36 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 36 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "peersan.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "peersan.labels" -}}
helm.sh/chart: {{ include "peersan.chart" . }}
{{ include "peersan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: peersan
{{- end }}

{{/* Labels that select the release's pods (never change them: selectors are immutable). */}}
{{- define "peersan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peersan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "peersan.componentLabels" -}}
{{ include "peersan.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "peersan.componentSelectorLabels" -}}
{{ include "peersan.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Object names of the components. */}}
{{- define "peersan.operator.name" -}}
{{- printf "%s-operator" (include "peersan.fullname" .) }}
{{- end }}

{{- define "peersan.nodeAgent.name" -}}
{{- printf "%s-node-agent" (include "peersan.fullname" .) }}
{{- end }}

{{- define "peersan.csiController.name" -}}
{{- printf "%s-csi-controller" (include "peersan.fullname" .) }}
{{- end }}

{{/* The CSI driver name; also the name of the kubelet plugin directory. */}}
{{- define "peersan.csiDriverName" -}}
csi.peersan.io
{{- end }}

{{/* The peersan image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "peersan.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/* A sidecar image from its values block ({repository, tag}). */}}
{{- define "peersan.sidecarImage" -}}
{{- printf "%s:%s" .repository (.tag | toString) }}
{{- end }}

{{- define "peersan.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The kubelet directory without a trailing slash. */}}
{{- define "peersan.kubeletDir" -}}
{{- .Values.kubeletDir | trimSuffix "/" }}
{{- end }}

{{/* Host directory of the node plugin's socket (mounted at /csi in the node agent). */}}
{{- define "peersan.pluginDir" -}}
{{- printf "%s/plugins/%s" (include "peersan.kubeletDir" .) (include "peersan.csiDriverName" .) }}
{{- end }}

{{/* Host path of the socket, as kubelet must be told it (--kubelet-registration-path). */}}
{{- define "peersan.registrationPath" -}}
{{- printf "%s/csi.sock" (include "peersan.pluginDir" .) }}
{{- end }}

{{- define "peersan.registrationDir" -}}
{{- printf "%s/plugins_registry" (include "peersan.kubeletDir" .) }}
{{- end }}

{{/* The Secret holding the peer secret: the user's, or the one the chart creates. */}}
{{- define "peersan.peerSecret.name" -}}
{{- if .Values.peerSecret.existingSecret }}
{{- .Values.peerSecret.existingSecret }}
{{- else }}
{{- printf "%s-peer-secret" (include "peersan.fullname" .) }}
{{- end }}
{{- end }}

{{- define "peersan.peerSecret.create" -}}
{{- if not .Values.peerSecret.existingSecret }}true{{ end }}
{{- end }}

{{/*
The generated peer secret's value, base64: the one already in the cluster when there is
one (so that an upgrade never changes the secret under running agents), otherwise 48 new
random characters. `helm template` has no cluster and always makes a new one.
*/}}
{{- define "peersan.peerSecret.value" -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "peersan.peerSecret.name" .) }}
{{- $data := dig "data" dict ($existing | default dict) }}
{{- if hasKey $data .Values.peerSecret.key }}
{{- index $data .Values.peerSecret.key }}
{{- else }}
{{- randAlphaNum 48 | b64enc }}
{{- end }}
{{- end }}

{{/* Environment shared by the peersan containers: namespace, log filter. */}}
{{- define "peersan.commonEnv" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- end }}

{{/* Security context of containers that need no privilege at all. */}}
{{- define "peersan.restrictedSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Pod security context of the operator and the CSI controller: any non-root user. */}}
{{- define "peersan.nonRootPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The livenessprobe sidecar and the probe it serves, for a CSI socket at /csi/csi.sock.
Call with (dict "ctx" $ "probe" .Values.<component>.livenessProbe).
*/}}
{{- define "peersan.livenessProbeContainer" -}}
{{- if .probe.enabled }}
- name: liveness-probe
  image: {{ include "peersan.sidecarImage" .ctx.Values.sidecars.livenessProbe }}
  imagePullPolicy: {{ .ctx.Values.sidecars.livenessProbe.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint=:{{ .probe.port }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  securityContext:
    {{- include "peersan.restrictedSecurityContext" .ctx | nindent 4 }}
  {{- with .probe.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The liveness probe of a CSI container, when the livenessprobe sidecar runs. */}}
{{- define "peersan.csiLivenessProbe" -}}
{{- if .enabled }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 5
{{- end }}
{{- end }}

{{/*
A CSI sidecar of the controller pod. Call with
(dict "ctx" $ "name" "csi-provisioner" "image" .Values.sidecars.provisioner "args" (list ...)).
Every one talks to the driver on /csi/csi.sock, elects a leader on a Lease in the release
namespace, and gives each call the controller's timeout.
*/}}
{{- define "peersan.controllerSidecar" -}}
- name: {{ .name }}
  image: {{ include "peersan.sidecarImage" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --leader-election
    - --leader-election-namespace=$(POD_NAMESPACE)
    - --timeout={{ .ctx.Values.csiController.timeout }}
    {{- range .args }}
    - {{ . }}
    {{- end }}
  env:
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  securityContext:
    {{- include "peersan.restrictedSecurityContext" .ctx | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
  {{- with .ctx.Values.csiController.sidecarResources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
