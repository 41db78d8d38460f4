#!/usr/bin/env bash
# Start a real single-node Slurm cluster (Debian 12 "bookworm" packages, Slurm 22.05.8) as plain
# background daemons (no systemd), for the Slurm end-to-end test. Must run as root. Unattended, bounded.
# Recipe and rationale: /work/shared/docs/slurm_local.md (§3 slurm.conf, §4 gotchas, §6.1 this script).
#
# Env knobs:
#   SLURM_CI_ROOT  state/log/pid dir                                   (default /tmp/slurm-ci)
#   SLURM_CI_DBD   1 = also run slurmdbd + MariaDB so `sacct` works    (default 0)
#   SLURM_CI_GPUS  number of fake GPUs (GRES gpu:fake:N; 0 = none)      (default 1)
#   SLURM_CI_CPUS  CPUs to advertise (default: real count; more = oversubscribe)
#   SLURM_CI_MEM   RealMemory (MB) to advertise (default: 90% of real; more = oversubscribe,
#                  harmless here: without cgroups Slurm does not enforce --mem)
#
# Beyond the recipe: a TaskProlog prints one line per job step into the job's own output
# ("[slurm-ci task_prolog] ... CUDA_VISIBLE_DEVICES=..."), so a test can show which GPU a job got.
set -euo pipefail
ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
DBD=${SLURM_CI_DBD:-0}
NGPU=${SLURM_CI_GPUS:-1}
HOST=$(hostname -s)
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive

log() { echo "[slurm_up $(date +%T)] $*"; }
waitfor() { # waitfor <tries> <sleep> <cmd...>: poll until cmd succeeds
  local n=$1 s=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep "$s"; done
  return 1
}

[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: must run as root" >&2; exit 1; }

# leftovers of an earlier run (same ROOT) are stopped first, by recorded PID
if [ -f "$ROOT/run/started" ]; then bash "$HERE/slurm_down.sh" || true; fi

# ---- 1. packages ---------------------------------------------------------
pkgs="slurmctld slurmd slurm-client munge"
[ "$DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  log "apt-get install$missing"
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

rm -rf "$ROOT/state" "$ROOT/log"          # fresh cluster state every time
mkdir -p "$ROOT"/{state/ctld,state/d,log,run,dev}
: > "$ROOT/run/started"                    # names of daemons we start, for slurm_down.sh
mkdir -p /etc/slurm

# ---- 2. config -----------------------------------------------------------
# hardware exactly as slurmd sees it (avoids "Low socket*core*thread count" drain)
eval "$(slurmd -C | head -1 | tr ' ' '\n' \
  | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' \
  | sed 's/^/HW_/')"
MEM=$(( HW_RealMemory * 9 / 10 ))
if [ -n "${SLURM_CI_CPUS:-}${SLURM_CI_MEM:-}" ]; then
  # config_overrides: slurmd trusts these numbers instead of draining the node for "low" hardware
  NODE_HW="CPUs=${SLURM_CI_CPUS:-$HW_CPUs} RealMemory=${SLURM_CI_MEM:-$MEM}"; OVERRIDE="SlurmdParameters=config_overrides"
else
  NODE_HW="CPUs=$HW_CPUs Boards=$HW_Boards SocketsPerBoard=$HW_SocketsPerBoard CoresPerSocket=$HW_CoresPerSocket ThreadsPerCore=$HW_ThreadsPerCore RealMemory=$MEM"
  OVERRIDE=""
fi
GRES_NODE=""; GRES_TYPES=""
if [ "$NGPU" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:fake:$NGPU"
  # fake GPU "device files": char devices identical to /dev/null
  for i in $(seq 0 $((NGPU-1))); do
    [ -e "$ROOT/dev/fakegpu$i" ] || mknod "$ROOT/dev/fakegpu$i" c 1 3
  done
  cat > /etc/slurm/gres.conf <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu Type=fake File=$ROOT/dev/fakegpu[0-$((NGPU-1))]
EOF
else
  rm -f /etc/slurm/gres.conf
fi
if [ "$DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

# TaskProlog: "print ..." lines on its stdout are written to the task's stdout (= the job log)
cat > "$ROOT/run/task_prolog.sh" <<'EOF'
#!/bin/sh
echo "print [slurm-ci task_prolog] job=${SLURM_JOB_ID:-?} step=${SLURM_STEP_ID:-?} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}"
EOF
chmod 755 "$ROOT/run/task_prolog.sh"

# NB: must be /etc/slurm/slurm.conf, not $SLURM_CONF: the slurm-jobstep plugin strips
# all SLURM_* variables before its nested `srun`, so a custom SLURM_CONF is lost.
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=localci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$ROOT/state/ctld
SlurmdSpoolDir=$ROOT/state/d
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$ROOT/run/task_prolog.sh
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
$ACCT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
# squeue must still list finished jobs when snakemake polls (plugin needs >= 3*init-seconds)
MinJobAge=3600
$OVERRIDE
$GRES_TYPES
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 3. munge ------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! (munge -n </dev/null | unmunge) >/dev/null 2>&1; then
  # no systemd: create /run/munge and start munged as the munge user, like Debian's unit does
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"; echo munged >> "$ROOT/run/started"
  waitfor 50 0.1 sh -c 'munge -n </dev/null | unmunge' || { echo "munged failed" >&2; exit 1; }
fi

# ---- 4. optional slurmdbd + MariaDB (private datadir under $ROOT) ---------
if [ "$DBD" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if [ ! -d "$ROOT/mysql/mysql" ]; then
    timeout 120 mariadb-install-db --user=mysql --datadir="$ROOT/mysql" --skip-test-db \
      --auth-root-authentication-method=socket > "$ROOT/log/mariadb-install.log" 2>&1
  fi
  # pid/log files must be writable by the mysql user (else it dies: "can't create PID file")
  /usr/sbin/mariadbd --user=mysql --datadir="$ROOT/mysql" --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mariadbd.pid --skip-networking --innodb-buffer-pool-size=64M \
    --log-error="$ROOT/mysql/mariadb.err" </dev/null >/dev/null 2>&1 &
  echo $! > "$ROOT/run/mariadbd.pid"; echo mariadbd >> "$ROOT/run/started"
  waitfor 150 0.2 mariadb -uroot -e 'select 1' || { echo "mariadbd failed" >&2; exit 1; }
  mariadb -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmci
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
  /usr/sbin/slurmdbd </dev/null >/dev/null 2>&1; echo slurmdbd >> "$ROOT/run/started"
  waitfor 100 0.2 timeout 5 sacctmgr -n list cluster || { echo "slurmdbd failed" >&2; exit 1; }
fi

# ---- 5. slurmctld + slurmd -----------------------------------------------
/usr/sbin/slurmctld -i </dev/null >/dev/null 2>&1; echo slurmctld >> "$ROOT/run/started"
/usr/sbin/slurmd       </dev/null >/dev/null 2>&1; echo slurmd    >> "$ROOT/run/started"
waitfor 150 0.2 sh -c "sinfo -h -n $HOST -o %t | grep -qx idle" || {
  echo "node did not become idle" >&2; sinfo -R >&2 || true
  tail -n 20 "$ROOT/log/slurmctld.log" "$ROOT/log/slurmd.log" >&2; exit 1; }
timeout 60 srun -t 1 -n1 true      # smoke test: one real job step
log "Slurm up: $(sinfo -h -o '%P %a %D %t %G' | tr '\n' ' ')"
