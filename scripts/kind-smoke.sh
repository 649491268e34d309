#!/usr/bin/env bash
# CPU smoke test of the whole Kubernetes path (`make kind-smoke`, .github/workflows/kind-smoke.yaml):
#   kind cluster -> CPU image -> KubeRay operator (helm) -> dolly-train chart (values-cpu-smoke.yaml)
#   -> RayJob SUCCEEDED (`dolly-train wait`) -> CPU eval Job -> ROUGE table -> cluster deleted.
# On failure it prints the state and pod logs of everything it created before it cleans up.
#
# Needs docker, kind, kubectl, helm and `dolly-train` (the venv, EXTRAS=k8s) on PATH, and the network
# (base images, the KubeRay Helm repository). It cannot run on the build machines (no container engine).
#
#   KEEP_CLUSTER=1        leave the cluster running for a look afterwards (kind delete cluster --name ...)
#   SKIP_BUILD=1          use an image already loaded or tagged locally
#   LOG_DIR=DIR           also write the failure logs and `kind export logs` there (CI uploads it)
#   SMOKE_TIMEOUT=SECONDS wait limit for the RayJob and for the eval Job (default 1800 each)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-dolly-train-smoke}
ns=${NAMESPACE:-dolly-train}
release=${RELEASE:-dolly-train}
timeout=${SMOKE_TIMEOUT:-1800}
kuberay_version=1.7.0
version=$(sed -n 's/^version = "\([^"]*\)"/\1/p' pyproject.toml | head -n1)
image=ghcr.io/dolly-train/cpu:$version
values=charts/dolly-train/values-cpu-smoke.yaml
eval_job=${EVAL_JOB:-manifests/eval-job-cpu.yaml}
log_dir=${LOG_DIR:-}

for tool in docker kind kubectl helm dolly-train; do
  command -v "$tool" >/dev/null || { echo "kind-smoke: '$tool' is not on PATH" >&2; exit 2; }
done
for file in manifests/kind/cluster.yaml "$values" "$eval_job"; do
  [ -f "$file" ] || { echo "kind-smoke: $file is missing" >&2; exit 2; }
done

# A private kubeconfig: the smoke test never touches the user's current context.
kubeconfig=$(mktemp)
export KUBECONFIG=$kubeconfig

log() { printf '\n==> %s\n' "$*"; }

dump_state() {
  echo "---- kind-smoke failed; state of namespace $ns ----"
  kubectl get rayjobs,rayclusters,jobs,pods,pvc -n "$ns" -o wide || true
  kubectl describe rayjobs -n "$ns" || true
  kubectl get events -n "$ns" --sort-by=.lastTimestamp || true
  for pod in $(kubectl get pods -n "$ns" -o name 2>/dev/null); do
    echo "---- logs of $pod ----"
    kubectl logs "$pod" -n "$ns" --all-containers --tail=300 || true
  done
  echo "---- KubeRay operator logs ----"
  kubectl logs deployment/kuberay-operator -n kuberay-system --tail=300 || true
}

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ -n "$log_dir" ]; then
      mkdir -p "$log_dir"
      dump_state 2>&1 | tee "$log_dir/state.txt"
      kind export logs "$log_dir/kind" --name "$cluster" >/dev/null 2>&1 || true
    else
      dump_state
    fi
  fi
  if [ "${KEEP_CLUSTER:-0}" = "1" ]; then
    echo "kind-smoke: keeping cluster $cluster (KUBECONFIG=$kubeconfig)"
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
    rm -f "$kubeconfig"
  fi
  exit "$rc"
}
trap cleanup EXIT

# Wait until a Kubernetes Job is Complete (0), Failed (1) or the deadline passes (124).
wait_job() {
  local job=$1 deadline=$((SECONDS + $2)) state
  while true; do
    state=$(kubectl get "job/$job" -n "$ns" -o jsonpath='{.status.conditions[?(@.status=="True")].type}')
    case " $state " in
      *" Complete "*) return 0 ;;
      *" Failed "*) echo "kind-smoke: job $job failed" >&2; return 1 ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "kind-smoke: job $job not done after $2 s" >&2
      return 124
    fi
    sleep 10
  done
}

log "kind cluster $cluster"
kind create cluster --name "$cluster" --config manifests/kind/cluster.yaml --kubeconfig "$kubeconfig" --wait 180s

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  log "build $image"
  scripts/build-images.sh cpu
fi
log "load $image into kind"
kind load docker-image "$image" --name "$cluster"

log "KubeRay operator $kuberay_version"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update >/dev/null
helm install kuberay-operator kuberay/kuberay-operator --version "$kuberay_version" \
  --namespace kuberay-system --create-namespace --wait --timeout 5m

log "helm install $release (values-cpu-smoke.yaml)"
# The staging Job is a pre-install hook: helm returns once the tiny model and the synthetic data are staged.
helm install "$release" charts/dolly-train --namespace "$ns" --create-namespace -f "$values" --wait --timeout 15m

rayjob=$(kubectl get rayjobs -n "$ns" -l "app.kubernetes.io/instance=$release" -o jsonpath='{.items[0].metadata.name}')
[ -n "$rayjob" ] || { echo "kind-smoke: helm install created no RayJob" >&2; exit 1; }

log "wait for RayJob $rayjob"
dolly-train wait "$rayjob" --namespace "$ns" --timeout "$timeout"

log "eval Job ($eval_job)"
eval_name=$(kubectl apply -n "$ns" -f "$eval_job" -o name | sed -n 's|^job.batch/||p' | head -n1)
[ -n "$eval_name" ] || { echo "kind-smoke: $eval_job holds no Job" >&2; exit 1; }
wait_job "$eval_name" "$timeout"

log "ROUGE (eval Job output)"
kubectl logs "job/$eval_name" -n "$ns"
log "kind smoke test passed"
