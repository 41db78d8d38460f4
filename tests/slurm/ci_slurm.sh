#!/usr/bin/env bash
# CI hook, run by .ci/run after the unit tests: the Slurm end-to-end test where it can run
# (root, apt-get: it installs Debian's slurm + munge packages and starts the daemons), otherwise
# a clear SKIPPED line and exit 0. The test itself: tests/slurm/run_slurm_e2e.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
skip() { echo "Slurm end-to-end test SKIPPED: $*"; exit 0; }

[ "$(id -u)" = 0 ] || skip "not root (needs apt-get and to start slurmctld/slurmd/munged)"
command -v apt-get >/dev/null 2>&1 || skip "apt-get not available (Debian/Ubuntu only)"
[ -n "${CTRACE_SKIP_SLURM:-}" ] && skip "CTRACE_SKIP_SLURM is set"
# the snakemake of the project's venv (make test creates .venv), else the one on PATH
[ -x .venv/bin/snakemake ] && export PATH="$PWD/.venv/bin:$PATH"
command -v snakemake >/dev/null 2>&1 || skip "snakemake not installed"
python -c "import snakemake_executor_plugin_slurm" >/dev/null 2>&1 \
  || skip "snakemake-executor-plugin-slurm not installed"

exec bash tests/slurm/run_slurm_e2e.sh
