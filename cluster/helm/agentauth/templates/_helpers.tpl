{{/* Names: KubeRay caps a RayService name at 47 characters (its Serve Service adds -serve-svc). */}}
{{- define "agentauth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentauth.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "agentauth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "agentauth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "agentauth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentauth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentauth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "agentauth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agentauth.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* KubeRay names the Serve Service <rayservice>-serve-svc. */}}
{{- define "agentauth.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "agentauth.fullname" .) -}}
{{- end -}}

{{- define "agentauth.registryUrl" -}}
{{- if .Values.ui.registryUrl -}}
{{- .Values.ui.registryUrl -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d/registry" (include "agentauth.serveServiceName" .) .Release.Namespace (int .Values.serve.port) -}}
{{- end -}}
{{- end -}}

{{/* Refuse values that cannot work, before anything is rendered. */}}
{{- define "agentauth.validate" -}}
{{- $backend := .Values.signer.backend -}}
{{- if not (has $backend (list "local" "aws" "gcp" "vault" "pkcs11")) -}}
{{- fail (printf "signer.backend must be one of local, aws, gcp, vault, pkcs11 (got %q)" $backend) -}}
{{- end -}}
{{- if and (eq $backend "vault") (not .Values.signer.vault.tokenSecret.name) (not .Values.signer.vault.tokenFile) -}}
{{- fail "signer.backend=vault needs signer.vault.tokenSecret.name (a Secret holding the Vault token: it goes to the Ray pods' environment, never into the RayService) or signer.vault.tokenFile (a file Vault Agent keeps a fresh token in)" -}}
{{- end -}}
{{- if and (eq $backend "vault") .Values.signer.vault.tokenSecret.name .Values.signer.vault.tokenFile -}}
{{- fail "signer.vault.tokenSecret.name and signer.vault.tokenFile are alternatives: set one of them" -}}
{{- end -}}
{{- if and (eq $backend "vault") (not .Values.signer.vault.endpoint) -}}
{{- fail "signer.vault.endpoint is required for signer.backend=vault (https://, unless a loopback address)" -}}
{{- end -}}
{{- if and (eq $backend "pkcs11") (not .Values.signer.pkcs11.pinSecret.name) -}}
{{- fail "signer.backend=pkcs11 needs signer.pkcs11.pinSecret.name: a Secret holding the token's user PIN (it goes to the Ray pods' environment, never into the RayService)" -}}
{{- end -}}
{{- if and (eq $backend "pkcs11") (not .Values.signer.pkcs11.token) -}}
{{- fail "signer.pkcs11.token (the token's label) is required for signer.backend=pkcs11" -}}
{{- end -}}
{{- if and (eq $backend "local") (not .Values.signer.local.existingClaim) -}}
{{- fail "signer.backend=local keeps the private key in files under the data directory: set signer.local.existingClaim to a ReadWriteMany PersistentVolumeClaim that every Ray pod mounts, or use a KMS backend" -}}
{{- end -}}
{{- if and (has $backend (list "aws" "gcp" "vault" "pkcs11")) (not (index .Values.signer $backend).keyId) -}}
{{- fail (printf "signer.%s.keyId is required for signer.backend=%s" $backend $backend) -}}
{{- end -}}
{{- if and .Values.verifier.dpopNonces (not .Values.verifier.nonceSecret.name) -}}
{{- fail "verifier.dpopNonces needs verifier.nonceSecret.name: a Secret holding at least 32 random bytes (it goes to the Ray pods' environment, never into the RayService)" -}}
{{- end -}}
{{- if not (hasSuffix "/registry" (trimSuffix "/" .Values.issuer)) -}}
{{- fail "issuer must be the registry's public URL, ending in /registry (Serve's route prefix)" -}}
{{- end -}}
{{- $uiHost := (urlParse .Values.ui.origin).hostname -}}
{{- if not (or (eq $uiHost .Values.rpId) (hasSuffix (printf ".%s" .Values.rpId) $uiHost)) -}}
{{- fail (printf "rpId %q must be the approval page's host %q or a parent domain of it (WebAuthn)" .Values.rpId $uiHost) -}}
{{- end -}}
{{- if gt (int .Values.verifier.autoscaling.minReplicas) (int .Values.verifier.autoscaling.maxReplicas) -}}
{{- fail "verifier.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if gt (int .Values.ray.worker.minReplicas) (int .Values.ray.worker.maxReplicas) -}}
{{- fail "ray.worker.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* The registry's signer settings (SignerSettings field names), non-secret only. */}}
{{- define "agentauth.signerArgs" -}}
{{- $s := .Values.signer -}}
{{- $args := dict "backend" $s.backend "alg" $s.alg -}}
{{- if eq $s.backend "aws" -}}
{{- $_ := set $args "key_id" $s.aws.keyId -}}
{{- $_ := set $args "region" $s.aws.region -}}
{{- $_ := set $args "aws_message_type" $s.aws.messageType -}}
{{- if $s.aws.endpoint }}{{ $_ := set $args "endpoint" $s.aws.endpoint }}{{ end -}}
{{- else if eq $s.backend "gcp" -}}
{{- $_ := set $args "key_id" $s.gcp.keyId -}}
{{- if $s.gcp.endpoint }}{{ $_ := set $args "endpoint" $s.gcp.endpoint }}{{ end -}}
{{- else if eq $s.backend "vault" -}}
{{- $_ := set $args "key_id" $s.vault.keyId -}}
{{- $_ := set $args "endpoint" $s.vault.endpoint -}}
{{- if $s.vault.tokenFile }}{{ $_ := set $args "vault_token_file" $s.vault.tokenFile }}{{ end -}}
{{- else if eq $s.backend "pkcs11" -}}
{{- $_ := set $args "key_id" $s.pkcs11.keyId -}}
{{- $_ := set $args "pkcs11_lib" $s.pkcs11.lib -}}
{{- $_ := set $args "pkcs11_token" $s.pkcs11.token -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The Serve config (ServeDeploySchema), the same applications as cluster/serve.yaml. */}}
{{- define "agentauth.serveConfig" -}}
{{- $registryDeployment := dict "name" "registry" "num_replicas" (int .Values.registry.replicas) -}}
{{- with .Values.registry.rayActorOptions }}{{ $_ := set $registryDeployment "ray_actor_options" . }}{{ end -}}
{{- $registry := dict "name" "registry" "route_prefix" "/registry" "import_path" "agentauth.cluster_apps:registry_app" "args" (dict "signer" (include "agentauth.signerArgs" . | fromYaml)) "deployments" (list $registryDeployment) -}}
{{- $verifierDeployment := dict "name" "verifier" -}}
{{- if .Values.verifier.autoscaling.enabled -}}
{{- $_ := set $verifierDeployment "autoscaling_config" (dict "min_replicas" (int .Values.verifier.autoscaling.minReplicas) "max_replicas" (int .Values.verifier.autoscaling.maxReplicas) "target_ongoing_requests" .Values.verifier.autoscaling.targetOngoingRequests) -}}
{{- else -}}
{{- $_ := set $verifierDeployment "num_replicas" (int .Values.verifier.replicas) -}}
{{- end -}}
{{- with .Values.verifier.rayActorOptions }}{{ $_ := set $verifierDeployment "ray_actor_options" . }}{{ end -}}
{{- $verifierArgs := dict "shards" (int .Values.verifier.shards) -}}
{{- if .Values.verifier.dpopNonces }}{{ $_ := set $verifierArgs "dpop_nonces" true }}{{ end -}}
{{- $verifier := dict "name" "verifier" "route_prefix" "/verifier" "import_path" "agentauth.cluster_apps:verifier_app" "args" $verifierArgs "deployments" (list $verifierDeployment) -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port)) "applications" (list $registry $verifier) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every Ray container: the Serve processes read it. */}}
{{- define "agentauth.rayEnv" -}}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: {{ ternary "1" "0" .Values.serve.throughputOptimized | quote }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: {{ ternary "1" "0" .Values.serve.haProxy | quote }}
{{- /* No per-request metrics line from HAProxy to a Python actor (half the p99 measured). */}}
- name: RAY_SERVE_HAPROXY_METRICS_ENABLED
  value: "0"
{{- /* Ray's workers (replicas, shards, HAProxy) at normal priority, not Ray's nice 15. */}}
- name: RAY_worker_niceness
  value: "0"
- name: DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.database.existingSecret | quote }}, key: {{ .Values.database.key | quote }}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .Values.redis.existingSecret | quote }}, key: {{ .Values.redis.key | quote }}}
- name: AGENTAUTH_ADMIN_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.admin.existingSecret | quote }}, key: {{ .Values.admin.key | quote }}}
{{- if and (eq .Values.signer.backend "aws") .Values.signer.aws.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.signer.aws.credentialsSecret | quote }}, key: {{ .Values.signer.aws.accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.signer.aws.credentialsSecret | quote }}, key: {{ .Values.signer.aws.secretAccessKeyKey | quote }}}
{{- end }}
{{- if and (eq .Values.signer.backend "gcp") .Values.signer.gcp.credentialsSecret }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: {{ printf "/var/run/secrets/agentauth/gcp/%s" .Values.signer.gcp.credentialsKey | quote }}
{{- end }}
{{- /* The signer's secret, merged by the registry into the signer its Serve args name. */}}
{{- if and (eq .Values.signer.backend "vault") .Values.signer.vault.tokenSecret.name }}
- name: AGENTAUTH_SIGNER_VAULT_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ .Values.signer.vault.tokenSecret.name | quote }}, key: {{ .Values.signer.vault.tokenSecret.key | quote }}}
{{- end }}
{{- if eq .Values.signer.backend "pkcs11" }}
- name: AGENTAUTH_SIGNER_PKCS11_PIN
  valueFrom:
    secretKeyRef: {name: {{ .Values.signer.pkcs11.pinSecret.name | quote }}, key: {{ .Values.signer.pkcs11.pinSecret.key | quote }}}
{{- end }}
{{- if .Values.verifier.dpopNonces }}
- name: AGENTAUTH_VERIFIER_NONCE_SECRET
  valueFrom:
    secretKeyRef: {name: {{ .Values.verifier.nonceSecret.name | quote }}, key: {{ .Values.verifier.nonceSecret.key | quote }}}
{{- end }}
{{- with .Values.ray.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "agentauth.rayVolumeMounts" -}}
- name: data
  mountPath: {{ .Values.ray.dataDir }}
- name: dshm
  mountPath: /dev/shm
{{- if and (eq .Values.signer.backend "gcp") .Values.signer.gcp.credentialsSecret }}
- name: gcp-credentials
  mountPath: /var/run/secrets/agentauth/gcp
  readOnly: true
{{- end }}
{{- end -}}

{{- define "agentauth.rayVolumes" -}}
- name: data
{{- if eq .Values.signer.backend "local" }}
  persistentVolumeClaim:
    claimName: {{ .Values.signer.local.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.ray.shmSizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if and (eq .Values.signer.backend "gcp") .Values.signer.gcp.credentialsSecret }}
- name: gcp-credentials
  secret:
    secretName: {{ .Values.signer.gcp.credentialsSecret }}
    items:
      - key: {{ .Values.signer.gcp.credentialsKey }}
        path: {{ .Values.signer.gcp.credentialsKey }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every pod of the chart. */}}
{{- define "agentauth.podSettings" -}}
serviceAccountName: {{ include "agentauth.serviceAccountName" . }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
