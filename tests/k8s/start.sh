#!/usr/bin/env bash
# Starts etcd and kube-apiserver on 127.0.0.1 only, with a fresh PKI and data directory, waits
# until the API server is ready, and prints the path of an admin kubeconfig as its last line.
#
#   BIN=<dir from build.sh> STATE=<dir, wiped> API_PORT=.. ETCD_PORT=.. ETCD_PEER_PORT=.. \
#     [OWNER_PID=<pid>] [READY_TIMEOUT=<seconds, default 90>] tests/k8s/start.sh
#
# Everything lives in STATE: pki/, etcd/, the logs etcd.log and apiserver.log, a pid file per
# process, kubeconfig. Stop it with stop.sh (same STATE), which kills only the processes recorded
# there. With OWNER_PID, a watchdog stops them too when that process exits (a test binary killed
# before it could clean up). On failure it stops what it started, prints the end of the
# relevant log to stderr and exits non-zero; the caller may retry with other ports.
set -euo pipefail
: "${BIN:?set BIN to the directory build.sh printed}" "${STATE:?set STATE to a scratch directory}"
: "${API_PORT:?}" "${ETCD_PORT:?}" "${ETCD_PEER_PORT:?}"
READY_TIMEOUT=${READY_TIMEOUT:-90}
here=$(cd "$(dirname "$0")" && pwd)
for b in kube-apiserver etcd; do [ -x "$BIN/$b" ] || { echo "start.sh: no $BIN/$b (run build.sh)" >&2; exit 1; }; done
command -v openssl >/dev/null || { echo "start.sh: openssl is not installed" >&2; exit 1; }
command -v curl >/dev/null || { echo "start.sh: curl is not installed" >&2; exit 1; }

if [ -d "$STATE" ]; then STATE=$STATE "$here/stop.sh" || true; rm -rf "$STATE"; fi
mkdir -p "$STATE/pki" "$STATE/etcd"
STATE=$(cd "$STATE" && pwd)

fail() {
  echo "start.sh: $1" >&2
  [ -f "$2" ] && tail -20 "$2" >&2
  STATE=$STATE "$here/stop.sh" || true
  exit 1
}

# PKI: a CA, the API server's serving certificate for 127.0.0.1, an admin client certificate
# (group system:masters) and the service-account signing key pair.
(
  cd "$STATE/pki"
  ossl() { openssl "$@" 2>/dev/null || { echo "openssl $1 failed" >&2; exit 1; }; }
  ossl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=peersan-test-ca"
  ossl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > apiserver.ext
  ossl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650 -extfile apiserver.ext
  ossl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin"
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  ossl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext
  ossl genrsa -out sa.key 2048
  ossl rsa -in sa.key -pubout -out sa.pub
) || fail "creating the PKI with openssl failed" /dev/null

# Whether a recorded process still runs (a zombie does not: it exited, unreaped).
alive() {
  local stat
  stat=$(cat "/proc/$(cat "$STATE/$1.pid")/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
# Polls `cmd` every 0.1 s until it succeeds, the process `proc` dies, or the deadline passes
# (each probe has its own 2 s limit: a port someone else holds may accept and never answer).
wait_for() {
  local what=$1 proc=$2 log=$3; shift 3
  local deadline=$((SECONDS + READY_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    alive "$proc" || fail "$what exited (log: $log)" "$log"
    [ "$SECONDS" -lt "$deadline" ] || fail "$what not ready within ${READY_TIMEOUT}s (log: $log)" "$log"
    sleep 0.1
  done
}

if [ -n "${OWNER_PID:-}" ]; then
  # Own session and process group, detached from our stdout so that the caller reading our
  # output is not kept waiting; stop.sh kills the group.
  # Its command line names STATE, which is how stop.sh recognises it.
  setsid bash -c 'tail --pid="$2" -f /dev/null; STATE=$1 PEERSAN_K8S_FROM_WATCHDOG=1 "$0"' \
    "$here/stop.sh" "$STATE" "$OWNER_PID" </dev/null >/dev/null 2>&1 &
  echo $! > "$STATE/watchdog.pid"
fi

# etcd reads ETCD_* variables as flags: ours are not meant for it.
env -u ETCD_PORT -u ETCD_PEER_PORT "$BIN/etcd" --name default --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" \
  </dev/null > "$STATE/etcd.log" 2>&1 &
echo $! > "$STATE/etcd.pid"
wait_for etcd etcd "$STATE/etcd.log" curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --tls-cert-file="$STATE/pki/apiserver.crt" --tls-private-key-file="$STATE/pki/apiserver.key" \
  --client-ca-file="$STATE/pki/ca.crt" \
  --service-account-key-file="$STATE/pki/sa.pub" --service-account-signing-key-file="$STATE/pki/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.0.0.0/24 \
  --authorization-mode=Node,RBAC --endpoint-reconciler-type=none --allow-privileged=true \
  --profiling=false --cert-dir="$STATE/pki/generated" \
  </dev/null > "$STATE/apiserver.log" 2>&1 &
echo $! > "$STATE/apiserver.pid"

cat > "$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: peersan-test
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$STATE/pki/admin.crt", client-key: "$STATE/pki/admin.key"}
contexts:
- name: peersan-test
  context: {cluster: peersan-test, user: admin}
current-context: peersan-test
KC
wait_for kube-apiserver apiserver "$STATE/apiserver.log" \
  curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" --cert "$STATE/pki/admin.crt" --key "$STATE/pki/admin.key" \
  "https://127.0.0.1:$API_PORT/readyz"
echo "$STATE/kubeconfig"
