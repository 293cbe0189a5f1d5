#!/usr/bin/env bash
# Stops what start.sh started in STATE: only the processes whose pid files are there, and only
# while they still are those processes (their command line names STATE), so a recycled pid is
# never hit. SIGTERM, then SIGKILL after 5 s. Leaves STATE itself (logs) in place.
#
#   STATE=<dir> tests/k8s/stop.sh
STATE=${STATE:?set STATE to the directory given to start.sh}
[ -d "$STATE" ] || exit 0
# The same absolute spelling start.sh used on the command lines.
STATE=$(cd "$STATE" && pwd)

# Whether pid $1 names STATE on its command line (as a path prefix or a whole argument).
ours() { { tr '\0' ' ' < "/proc/$1/cmdline"; } 2>/dev/null | grep -qF -e "$STATE/" -e "$STATE "; }
# Running: exists and is not a zombie (an exited child its new parent has not reaped yet).
running() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

stop_pid() {
  local pid=$1 target=$1
  [ "$2" = group ] && target=-$1
  kill -TERM -- "$target" 2>/dev/null || return 0
  local deadline=$((SECONDS + 5))
  while running "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
  if running "$pid"; then kill -KILL -- "$target" 2>/dev/null || true; fi
}

for p in apiserver etcd watchdog; do
  f=$STATE/$p.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  rm -f "$f"
  case $p in
    # The watchdog leads its own process group (bash and its tail); when it called us, it ends
    # by itself.
    watchdog) [ -n "${PEERSAN_K8S_FROM_WATCHDOG:-}" ] || { ours "$pid" && stop_pid "$pid" group; } ;;
    *) ours "$pid" && stop_pid "$pid" single ;;
  esac
done
exit 0
