#!/usr/bin/env bash
# Builds the real Kubernetes API server that the project's Kubernetes tests run against, from
# Debian 12's packages only, once, into a cache that later runs (and concurrent ones) reuse.
#
#   tests/k8s/build.sh          -> last line of stdout: a directory with kube-apiserver, etcd, kubectl
#
# Cache: ${PEERSAN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peersan-k8s}/$BUILD_ID. Progress goes to
# stderr. Nothing is installed system-wide: the toolchain and runtime packages are fetched with
# `apt-get download` and unpacked with `dpkg -x` into a private prefix, with private apt lists.
# Host tools it needs: apt-get, dpkg-source (dpkg-dev), make, tar and xz (xz-utils), flock
# (util-linux); and root: apt runs its downloads as root here (APT::Sandbox::User=root), since
# its sandbox user _apt cannot write to the cache. About 7 CPU-minutes, most of them compiling
# Go: at most about 5 minutes on 2 idle cores, 11 measured on 2 cores shared with other
# builds. Afterwards about 160 MB stay in the cache.
#
# What it rests on (checked on Debian 12):
# - Debian 12's `kubernetes` source package is upstream v1.20.2 with its full vendor/ tree. It is
#   built as debian/rules builds it: `make WHAT=cmd/kube-apiserver` in GOPATH mode (GO111MODULE
#   unset; plain `go build -mod=vendor` fails with "updates to go.mod needed"), GOPROXY=off,
#   CGO_ENABLED=0, with Debian's Go 1.19; the Makefile needs rsync.
# - The vendored reflect2 v1.0.1 / json-iterator 1.1.10 crash under Go >= 1.18 ("fatal error:
#   fault" on the first custom object created). Debian's source packages of reflect2 1.0.2 and
#   json-iterator 1.1.12 replace them.
# - etcd comes from Debian's etcd-server (3.4), kubectl from kubernetes-client.
# - v1.20 serves CRD v1 (structural schemas, defaulting, no CEL rules), coordination.k8s.io/v1
#   Leases, server-side apply (beta, on by default), storage.k8s.io/v1 CSIDriver/CSINode.
set -euo pipefail

# Bump when the recipe below changes what ends up in bin/: caches built before are then ignored.
BUILD_ID=k8s-v1.20.2-deb12-1
CACHE=${PEERSAN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peersan-k8s}
DEST=$CACHE/$BUILD_ID
BINARIES=(kube-apiserver etcd kubectl)

complete() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
}
# The finished directory appears in one rename, so a complete one is safe to use without the lock.
if complete; then echo "$DEST/bin"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
ts() { echo "[peersan-k8s $(date +%T)] $*" >&2; }
if ! flock -n 9; then
  ts "waiting for another build in $CACHE (lock $CACHE/.lock)"
  flock 9
fi
# Another process may have finished the build while this one waited for the lock.
if complete; then echo "$DEST/bin"; exit 0; fi

for tool in apt-get dpkg-source dpkg make tar xz; do
  command -v "$tool" >/dev/null || { echo "build.sh: '$tool' is not installed (Debian packages: apt, dpkg-dev, make, tar, xz-utils)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build.sh: needs root (apt-get source/download with private lists)" >&2; exit 1; }

start=$SECONDS
WORK=$CACHE/work
rm -rf "$WORK" "$DEST.tmp"
trap 'rm -rf "$WORK" "$DEST.tmp"' EXIT
mkdir -p "$WORK"/apt/lists/partial "$WORK"/debs "$WORK"/root "$DEST.tmp/bin"
cd "$WORK"

cat > apt/sources.list <<SRC
deb http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian-security bookworm-security main
deb-src http://deb.debian.org/debian-security bookworm-security main
SRC
APT=(apt-get -o Dir::Etc::sourcelist="$WORK/apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
     -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache" -o APT::Sandbox::User=root)

ts "apt-get update (private lists)"
"${APT[@]}" update -qq >&2
ts "apt-get source kubernetes"
"${APT[@]}" source --download-only -qq kubernetes >&2
dpkg-source -x kubernetes_*.dsc k8s >/dev/null
# The fixes below are for this upstream version; a different one needs them re-checked.
case "$(head -1 k8s/debian/changelog)" in
  *1.20.2*) ;;
  *) echo "build.sh: expected Kubernetes 1.20.2 in Debian's source package, got: $(head -1 k8s/debian/changelog)" >&2; exit 1 ;;
esac

ts "Go 1.19, rsync, etcd, kubectl and the fixed reflect2/json-iterator into a private prefix"
(cd debs && "${APT[@]}" download -qq golang-1.19-go golang-1.19-src rsync libpopt0 etcd-server \
   kubernetes-client golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >&2)
for d in debs/*.deb; do dpkg -x "$d" root; done
mkdir -p wrap
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$WORK/root/usr/lib/x86_64-linux-gnu" "$WORK/root/usr/bin/rsync" > wrap/rsync
chmod +x wrap/rsync

rm -rf k8s/vendor/github.com/modern-go/reflect2 k8s/vendor/github.com/json-iterator/go
cp -r root/usr/share/gocode/src/github.com/modern-go/reflect2 k8s/vendor/github.com/modern-go/
cp -r root/usr/share/gocode/src/github.com/json-iterator/go k8s/vendor/github.com/json-iterator/

ts "make WHAT=cmd/kube-apiserver (the longest step: code generators, then the API server)"
(
  export PATH=$WORK/root/usr/lib/go-1.19/bin:$WORK/wrap:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  unset GOFLAGS GOPATH GOCACHE GO111MODULE GOROOT
  export GOPROXY=off CGO_ENABLED=0 HOME=$WORK/home
  mkdir -p "$HOME"
  cd k8s && make WHAT=cmd/kube-apiserver >"$WORK/make.log" 2>&1
) || { tail -40 "$WORK/make.log" >&2; echo "build.sh: make failed; the last lines of its log are above" >&2; exit 1; }

cp k8s/_output/bin/kube-apiserver root/usr/bin/etcd root/usr/bin/kubectl "$DEST.tmp/bin/"
{
  "$DEST.tmp/bin/kube-apiserver" --version
  "$DEST.tmp/bin/etcd" --version | head -1
  "$DEST.tmp/bin/kubectl" version --client --short 2>/dev/null || true
} > "$DEST.tmp/VERSIONS"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
ts "done in $((SECONDS - start)) s: $(tr '\n' ';' < "$DEST/VERSIONS")"
echo "$DEST/bin"
