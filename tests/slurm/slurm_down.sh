#!/usr/bin/env bash
# Stop the daemons that slurm_up.sh started, by recorded PID (never by name). Bounded.
# Recipe: /work/shared/docs/slurm_local.md §6.2.
set -u
ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
[ -f "$ROOT/run/started" ] || exit 0
# cancel leftover jobs first (their processes belong to slurmd's job steps)
if grep -qx slurmctld "$ROOT/run/started"; then
  timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
  for _ in $(seq 25); do [ -z "$(timeout 5 squeue -h -t PD,R,CG 2>/dev/null)" ] && break; sleep 0.2; done
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  grep -qx "$name" "$ROOT/run/started" || continue
  pf="$ROOT/run/$name.pid"; [ -s "$pf" ] || continue
  pid=$(cat "$pf")
  # only signal the PID if it still is that daemon (guards against PID reuse)
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] || continue
  kill -TERM "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
done
rm -f "$ROOT/run/started"
# A slurm.conf with no slurmctld behind it makes `scontrol show config` stall ~9 s; the
# slurm executor plugin runs that at import, i.e. in EVERY later `snakemake` call. Remove it.
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf
echo "[slurm_down] stopped"
