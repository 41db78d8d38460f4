#!/usr/bin/env bash
# End-to-end test of the workflow on a REAL single-node Slurm cluster (Debian's slurmctld/slurmd,
# munge, one node with fake GRES GPUs), through `snakemake --profile profiles/slurm`.
#
#   1. full run      : the reduced config tests/slurm/config.yaml, from scratch, in a tmp workdir.
#                      Checks: sbatch lines, --gpus=1 on exactly the GPU rules, Slurm's view of a
#                      GPU job (scontrol/jobcomp), CUDA_VISIBLE_DEVICES inside it, GPU jobs submitted
#                      in parallel (not throttled by the gpu pool of profiles/default).
#   2. resume        : again from scratch in a 2nd workdir; SIGKILL the controller once
#                      $E2E_RESUME_RULE has E2E_KILL_AFTER finished jobs; scancel; --unlock; re-run.
#                      Asserts (a) no job that had finished runs again, and every job ran exactly
#                      once over the two halves; (b) every output (results/ minus logs/benchmarks)
#                      is sha256-identical to the full run's. Two known exceptions are reported as
#                      NOTE lines, not failures (E2E_STRICT_BYTES=1 fails them): JSON/TSV/NPZ/parquet
#                      outputs that embed wall-clock timings (wall_time_s, *_seconds, ...) must be
#                      equal without those fields; scGPT's best_model.pt must be tensor-identical.
#   3. local run     : the same config without Slurm (`snakemake --cores 1`, started in the background
#                      during step 1); (c) the resumed run's outputs equal its outputs, as in (b).
#
# Needs root (apt, daemons) and snakemake + snakemake-executor-plugin-slurm on PATH (or $SNAKEMAKE).
# Prints "SLURM E2E: PASS" or "SLURM E2E: FAIL (...)" last; exit status 0 only on PASS.
#
# Knobs (environment):
#   E2E_CONFIG       workflow config to run                       (default tests/slurm/config.yaml)
#   E2E_RESUME_RULE  rule whose finished jobs trigger the kill   (default ablation_sweep;
#                    dump_activations also works, and is what to use if the sweep rule is renamed)
#   E2E_KILL_AFTER   kill once this many of its jobs finished     (default 1)
#   E2E_BUDGET_S     hard bound for the whole script, seconds     (default 900)
#   E2E_WORKDIR      where the two workdirs + logs go             (default: mktemp -d)
#   E2E_STRICT_BYTES 1 = the two known exceptions fail too        (default 0)
#   E2E_KEEP_SLURM   1 = leave the cluster running at the end     (default 0)
#   SLURM_CI_GPUS    fake GPUs on the node                        (default 2 here)
#   SLURM_CI_*       see slurm_up.sh
set -euo pipefail
export LC_ALL=C   # sort/comm agree on the order

T_START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/tests/slurm"
RESUME_RULE=${E2E_RESUME_RULE:-ablation_sweep}
KILL_AFTER=${E2E_KILL_AFTER:-1}
BUDGET=${E2E_BUDGET_S:-900}
STRICT=${E2E_STRICT_BYTES:-0}
SNAKEMAKE=${SNAKEMAKE:-snakemake}
export SLURM_CI_ROOT=${SLURM_CI_ROOT:-/tmp/slurm-ci}
export SLURM_CI_GPUS=${SLURM_CI_GPUS:-2}
DEADLINE=$((T_START + BUDGET))

log() { echo "[e2e $(date +%T)] $*"; }
el() { echo $(($(date +%s) - $1)); }
remaining() { local r=$((DEADLINE - $(date +%s))); [ "$r" -gt 30 ] && echo "$r" || echo 30; }
FAILURES=()
fail() { FAILURES+=("$*"); echo "CHECK FAILED: $*"; }
finish() {
  echo "TIMING total: $(el "$T_START")s"
  if [ ${#FAILURES[@]} -eq 0 ]; then
    echo "SLURM E2E: PASS"
    exit 0
  fi
  echo "SLURM E2E: FAIL (${#FAILURES[@]} check(s)):"
  printf '  - %s\n' "${FAILURES[@]}"
  exit 1
}

[ "$(id -u)" = 0 ] || { echo "run_slurm_e2e.sh: must run as root" >&2; exit 2; }
command -v "$SNAKEMAKE" >/dev/null || { echo "run_slurm_e2e.sh: $SNAKEMAKE not found on PATH" >&2; exit 2; }
PY=$(dirname "$(command -v "$SNAKEMAKE")")/python
[ -x "$PY" ] || PY=python3
"$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null || {
  echo "run_slurm_e2e.sh: snakemake-executor-plugin-slurm is not installed next to $SNAKEMAKE" >&2; exit 2; }

WORK=${E2E_WORKDIR:-$(mktemp -d /tmp/ctrace-slurm-e2e.XXXXXX)}
mkdir -p "$WORK"
log "workdir $WORK; resume rule $RESUME_RULE (kill after $KILL_AFTER finished); budget ${BUDGET}s"

# A snapshot of the workflow (Snakefile, rules, schema, profiles, test config), so that edits made
# in the checkout while the test runs cannot trigger code-change re-runs between the two runs.
SRC="$WORK/src"
rm -rf "$SRC"; mkdir -p "$SRC/tests"
cp -r "$REPO/Snakefile" "$REPO/workflow" "$REPO/profiles" "$SRC/"
cp -r "$HERE" "$SRC/tests/slurm"
CONFIG="$SRC/tests/slurm/config.yaml"
if [ -n "${E2E_CONFIG:-}" ]; then cp "$E2E_CONFIG" "$SRC/tests/slurm/e2e_config.yaml"; CONFIG="$SRC/tests/slurm/e2e_config.yaml"; fi

# One Python helper for log parsing and output comparison (kept inline: one file to maintain).
TOOLS="$WORK/e2e_tools.py"
cat > "$TOOLS" <<'PYEOF'
import fnmatch, hashlib, json, os, re, sys

BLOCK = re.compile(r"^(?:local)?rule (\S+):$")


def jobs(log):
    """{jobid: (rule, wildcards, resources)} from the job blocks a Snakemake log prints."""
    out, cur = {}, None
    for line in open(log, errors="replace"):
        line = line.rstrip("\n")
        m = BLOCK.match(line)
        if m:
            cur = {"rule": m.group(1), "wildcards": "", "resources": ""}
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("jobid: "):
            cur["jobid"] = s.split(": ", 1)[1]
        elif s.startswith("wildcards: "):
            cur["wildcards"] = s.split(": ", 1)[1]
        elif s.startswith("resources: "):
            cur["resources"] = s.split(": ", 1)[1]
        elif not line.startswith("    "):
            if "jobid" in cur:
                out[cur["jobid"]] = (cur["rule"], cur["wildcards"], cur["resources"])
            cur = None
    if cur and "jobid" in cur:
        out[cur["jobid"]] = (cur["rule"], cur["wildcards"], cur["resources"])
    return out


def finished(log):
    return re.findall(r"^Finished jobid: (\d+) \(Rule: (\S+)\)", open(log, errors="replace").read(), re.M)


def key(rule, wildcards):
    return f"{rule}[{wildcards}]" if wildcards else rule


def cmd_finished_keys(log):
    js = jobs(log)
    for jobid, rule in finished(log):
        print(key(rule, js.get(jobid, (rule, "?"))[1]))


def cmd_executed_keys(log):
    for rule, wildcards, _ in jobs(log).values():
        print(key(rule, wildcards))


def cmd_submitted_keys(log):
    js = jobs(log)
    for jobid in re.findall(r"^Job (\d+) has been submitted", open(log, errors="replace").read(), re.M):
        rule, wildcards, _ = js.get(jobid, ("?", "?", ""))
        print(key(rule, wildcards))


def cmd_count_finished(log, rule):
    print(sum(1 for _, r in finished(log) if r == rule))


def cmd_gpu_check(log):
    """Every sbatch call has --gpus=1 iff its job declares gpu=1; GPU jobs were submitted in parallel."""
    text = open(log, errors="replace").read()
    js = jobs(log)
    problems, n_gpu, n_cpu = [], 0, 0
    submitted = dict(re.findall(r"^Job (\d+) has been submitted with SLURM jobid (\d+)", text, re.M))
    calls = re.findall(r"^sbatch call: (.*?) --wrap=", text, re.M)
    for call in calls:
        m = re.search(r"--comment rule_(\S+)", call)
        comment = m.group(1) if m else "?"
        rule = next((r for r, _, _ in js.values() if comment == r or comment.startswith(r + "_wildcards_")), "?")
        wants_gpu = any(r == rule and re.search(r"\bgpu=1\b", res) for r, _, res in js.values())
        has_gpu = "--gpus=1" in call
        if wants_gpu:
            n_gpu += 1
        else:
            n_cpu += 1
        if wants_gpu != has_gpu or ("--gpus" in call and not has_gpu):
            problems.append(f"{comment}: gpu rule={wants_gpu} but sbatch has {'--gpus=1' if has_gpu else 'no --gpus'}")
    # outstanding GPU jobs over time, from the controller's own submit/finish lines
    gpu_jobs = {j for j, (r, _, res) in js.items() if re.search(r"\bgpu=1\b", res)}
    live, peak = set(), 0
    for m in re.finditer(r"^(?:Job (\d+) has been submitted|Finished jobid: (\d+))", text, re.M):
        if m.group(1) and m.group(1) in gpu_jobs:
            live.add(m.group(1)); peak = max(peak, len(live))
        elif m.group(2):
            live.discard(m.group(2))
    print(f"sbatch calls: {len(calls)} ({n_gpu} for GPU rules, all with --gpus=1: {not problems}; {n_cpu} CPU-rule calls without --gpus)")
    print(f"peak GPU jobs submitted at once by the controller: {peak}")
    for p in problems:
        print("PROBLEM", p)
    gpu_slurm_ids = [submitted[j] for j in sorted(gpu_jobs, key=int) if j in submitted]
    print("GPU_SLURM_IDS", " ".join(gpu_slurm_ids))
    ok = not problems and n_gpu > 0 and n_cpu > 0 and (peak >= 2 or len(gpu_jobs) < 2)
    sys.exit(0 if ok else 1)


# Fields that hold wall-clock timings (wall_time_s, train_seconds, rows_per_second, ...): they
# differ between any two runs, so outputs that embed them can only be equal modulo these fields.
TIMING_KEY = re.compile(r"(seconds|per_second|wall_time|elapsed|timestamp|(^|_)time(_s)?$)")


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if not TIMING_KEY.search(str(k))}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _equal_modulo_timing(pa, pb):
    """None if the format is not understood, else (equal?, names of the timing fields dropped)."""
    if pa.endswith(".json"):
        ja, jb = json.load(open(pa)), json.load(open(pb))
        return _strip_timing(ja) == _strip_timing(jb), "json"
    if pa.endswith(".npz"):
        import numpy as np
        with np.load(pa, allow_pickle=False) as a, np.load(pb, allow_pickle=False) as b:
            keys = [k for k in a.files if not TIMING_KEY.search(k)]
            if sorted(a.files) != sorted(b.files):
                return False, "npz"
            return all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind in "fc") for k in keys), \
                "npz:" + ",".join(k for k in a.files if TIMING_KEY.search(k))
    if pa.endswith((".tsv", ".parquet")):
        import pandas as pd
        read = (lambda p: pd.read_csv(p, sep="\t")) if pa.endswith(".tsv") else pd.read_parquet
        fa, fb = read(pa), read(pb)
        drop = [c for c in fa.columns if TIMING_KEY.search(str(c))]
        return fa.drop(columns=drop).equals(fb.drop(columns=drop)) and list(fa.columns) == list(fb.columns), \
            "columns:" + ",".join(drop)
    return None


def _tensors_equal(a, b):
    import torch
    sa, sb = torch.load(a, map_location="cpu"), torch.load(b, map_location="cpu")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def cmd_compare(a_dir, b_dir, strict):
    """sha256 of every workflow output (results/, without logs/ and benchmarks/)."""
    def listing(d):
        out = {}
        for root, dirs, files in os.walk(os.path.join(d, "results")):
            rel_root = os.path.relpath(root, d)
            if rel_root.startswith(("results/logs", "results/benchmarks")):
                continue
            for f in files:
                rel = os.path.join(rel_root, f)
                out[rel] = hashlib.sha256(open(os.path.join(d, rel), "rb").read()).hexdigest()
        return out
    a, b = listing(a_dir), listing(b_dir)
    bad = []
    for rel in sorted(set(a) ^ set(b)):
        bad.append(f"only in {'full' if rel in a else 'resumed'} run: {rel}")
    same = [r for r in a if r in b and a[r] == b[r]]
    notes = []
    for rel in sorted(r for r in a if r in b and a[r] != b[r]):
        pa, pb = os.path.join(a_dir, rel), os.path.join(b_dir, rel)
        modulo = _equal_modulo_timing(pa, pb)
        if modulo and modulo[0]:
            notes.append(f"{rel}: bytes differ only in wall-clock timing fields ({modulo[1]})")
            continue
        if fnmatch.fnmatch(rel, "results/demo/*/checkpoint/best_model.pt") and _tensors_equal(pa, pb):
            notes.append(f"{rel}: bytes differ (torch zip records named after the random tmp file), tensors identical")
            continue
        bad.append(f"content differs: {rel}")
    print(f"outputs compared: {len(a)}; byte-identical (sha256): {len(same)}")
    for n in notes:
        print(("STRICT-FAIL " if strict else "NOTE ") + n)
    for x in bad:
        print("DIFF", x)
    sys.exit(1 if bad or (strict and notes) else 0)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "compare":
        cmd_compare(args[0], args[1], args[2] == "1")
    else:
        {"finished-keys": cmd_finished_keys, "executed-keys": cmd_executed_keys,
         "count-finished": cmd_count_finished, "gpu-check": cmd_gpu_check,
         "submitted-keys": cmd_submitted_keys}[cmd](*args)
PYEOF

# ---- Slurm up (and always down) ------------------------------------------------------------
cleanup() {
  local rc=$?
  [ -n "${SPID:-}" ] && kill -KILL "$SPID" 2>/dev/null || true
  [ -n "${LPID:-}" ] && kill -TERM "$LPID" 2>/dev/null || true
  if [ "${E2E_KEEP_SLURM:-0}" != 1 ]; then bash "$HERE/slurm_down.sh" || true; fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "[e2e] interrupted"; exit 130' INT TERM

T=$(date +%s)
timeout "$(remaining)" bash "$HERE/slurm_up.sh"
echo "TIMING slurm_up: $(el "$T")s"

# The command under test, plus --verbose (prints each "sbatch call: ...") and kept Slurm job logs.
# --configfile with a workdir that has no config/config.yaml: the Snakefile's `configfile:` finds
# nothing there, so the reduced config is used alone, by the controller and by every Slurm job.
SMK=("$SNAKEMAKE" --profile "$SRC/profiles/slurm" --snakefile "$SRC/Snakefile"
     --configfile "$CONFIG" --verbose --slurm-keep-successful-logs)

# ---- 3. (started now, checked last) the uninterrupted local run, without Slurm --------------------
LOCAL="$WORK/local"; rm -rf "$LOCAL"; mkdir -p "$LOCAL"
log "uninterrupted local run (no Slurm, --cores 1) in the background -> $LOCAL/run.log"
( timeout -k 30 "$(remaining)" "$SNAKEMAKE" --snakefile "$SRC/Snakefile" --configfile "$CONFIG" \
    --directory "$LOCAL" --cores 1 > "$LOCAL/run.log" 2>&1; echo $? > "$LOCAL/exit_status" ) &
LPID=$!

# ---- 1. full run ------------------------------------------------------------------------------
FULL="$WORK/full"; rm -rf "$FULL"; mkdir -p "$FULL"
log "full run -> $FULL/run.log"
T=$(date +%s); set +e
timeout -k 30 "$(remaining)" "${SMK[@]}" --directory "$FULL" > "$FULL/run.log" 2>&1
RC=$?; set -e
echo "TIMING full run: $(el "$T")s (exit $RC)"
if [ $RC -ne 0 ]; then
  tail -n 40 "$FULL/run.log"; fail "full run exited $RC"; finish
fi
sed -n '/^Job stats:/,/^total/{p;/^total/q}' "$FULL/run.log"

# the reduced config alone was used (no merge with config/config.yaml)
grep -m1 "Config file(s):" "$FULL/run.log" || true
if grep -m1 "Config file(s):" "$FULL/run.log" | grep -q "config/config.yaml"; then
  fail "config/config.yaml was merged into the reduced config"
fi
N_SEL=$(sed -n '/^Job stats:/,/^total/p' "$FULL/run.log" | awk '$1=="select_cells"{print $2; exit}')
[ "${N_SEL:-0}" = 2 ] || fail "expected 2 conditions (select_cells jobs), got ${N_SEL:-0}"

echo "---- sbatch submissions (first 3, up to --wrap) ----"
grep "^sbatch call:" "$FULL/run.log" | sed 's/ --wrap=.*//' | head -3 || true
echo "---- GPU-rule submissions reaching Slurm ----"
grep "^sbatch call:" "$FULL/run.log" | grep -- "--gpus=" \
  | sed 's/.*--comment \(\S*\) .*\(--gpus=[^ ]*\).*/  \1  \2/' | head -20 || true
echo "---- the in-job srun of a GPU job ----"
grep -h "^The call for this job is: srun" "$FULL"/.snakemake/slurm_logs/rule_"$RESUME_RULE"/*/*.log 2>/dev/null \
  | sed 's/ --target-jobs.*//' | head -1 || true
GPU_OUT=$("$PY" "$TOOLS" gpu-check "$FULL/run.log") || fail "GPU submission check: $(echo "$GPU_OUT" | grep -v GPU_SLURM_IDS | tr '\n' ' ')"
echo "$GPU_OUT" | grep -v "^GPU_SLURM_IDS"
GPU_ID=$(echo "$GPU_OUT" | sed -n 's/^GPU_SLURM_IDS //p' | awk '{print $1}')
if [ -n "$GPU_ID" ]; then
  echo "---- scontrol show job -d $GPU_ID (GPU job, kept by MinJobAge) ----"
  scontrol show job -d "$GPU_ID" | grep -E "JobId=|JobState=|TRES=|TresPerJob|JOB_GRES|GRES=|Comment=" | sed 's/^ */  /' || true
  scontrol show job -d "$GPU_ID" | grep -q "TresPerJob=gres:gpu:1" || fail "Slurm job $GPU_ID has no gres:gpu:1"
  echo "---- jobcomp.txt ----"
  grep "^JobId=$GPU_ID " "$SLURM_CI_ROOT/log/jobcomp.txt" | tr ' ' '\n' | grep -E "^(JobId|JobState|Partition|StartTime|EndTime|Tres|ExitCode)=" | paste -sd' ' || true
  echo "---- inside the GPU job (TaskProlog line from its Slurm log) ----"
  GPU_LOG=$(grep -rl "job=$GPU_ID " "$FULL/.snakemake/slurm_logs" | head -1 || true)
  echo "  $GPU_LOG"; grep -h "slurm-ci task_prolog" "$GPU_LOG" | sort -u || true
  grep -q "CUDA_VISIBLE_DEVICES=[0-9]" "$GPU_LOG" || fail "no CUDA_VISIBLE_DEVICES inside GPU job $GPU_ID"
else
  fail "no GPU job found in the full run"
fi

# ---- 2. resume after SIGKILL ---------------------------------------------------------------------
RES="$WORK/resume"; rm -rf "$RES"; mkdir -p "$RES"
log "resume scenario: run from scratch -> $RES/killed.log"
T=$(date +%s)
"${SMK[@]}" --directory "$RES" > "$RES/killed.log" 2>&1 &
SPID=$!
KILLED=0
while kill -0 "$SPID" 2>/dev/null; do
  if [ "$("$PY" "$TOOLS" count-finished "$RES/killed.log" "$RESUME_RULE")" -ge "$KILL_AFTER" ]; then
    kill -KILL "$SPID"; KILLED=1; break
  fi
  [ "$(date +%s)" -lt "$DEADLINE" ] || { kill -KILL "$SPID"; break; }
  sleep 0.5
done
wait "$SPID" 2>/dev/null || true
SPID=""
echo "TIMING run until SIGKILL: $(el "$T")s"
if [ $KILLED != 1 ]; then
  tail -n 30 "$RES/killed.log"
  fail "controller ended before $KILL_AFTER $RESUME_RULE job(s) finished (rule missing from the workflow, or a failure)"
  finish
fi
"$PY" "$TOOLS" finished-keys "$RES/killed.log" | sort > "$RES/finished_before_kill.txt"
echo "finished before the kill: $(wc -l < "$RES/finished_before_kill.txt") jobs ($(grep -c "^$RESUME_RULE\[" "$RES/finished_before_kill.txt" || true) of $RESUME_RULE)"

# orphaned Slurm jobs keep running after a SIGKILLed controller: cancel them (by the run's job name)
RUN_ID=$(sed -n 's/^SLURM run ID: //p' "$RES/killed.log" | head -1 || true)
echo "still in Slurm after the kill: $(squeue -h --name "$RUN_ID" -t PD,R,CG -o '%i' | wc -l) job(s) of run $RUN_ID"
timeout 10 scancel --name "$RUN_ID" || timeout 10 scancel --user="$(id -un)" || true
for _ in $(seq 100); do [ -z "$(squeue -h --name "$RUN_ID" -t PD,R,CG)" ] && break; sleep 0.2; done
# the killed controller left its lock behind
echo "stale lock files: $(find "$RES/.snakemake/locks" -type f 2>/dev/null | wc -l)"
timeout -k 10 120 "${SMK[@]}" --directory "$RES" --unlock > "$RES/unlock.log" 2>&1 \
  || { cat "$RES/unlock.log"; fail "--unlock failed"; finish; }
log "resumed run -> $RES/resumed.log"
T=$(date +%s); set +e
timeout -k 30 "$(remaining)" "${SMK[@]}" --directory "$RES" > "$RES/resumed.log" 2>&1
RC=$?; set -e
echo "TIMING resumed run: $(el "$T")s (exit $RC)"
[ $RC -eq 0 ] || { tail -n 40 "$RES/resumed.log"; fail "resumed run exited $RC"; }
sed -n '/^Job stats:/,/^total/{p;/^total/q}' "$RES/resumed.log"
"$PY" "$TOOLS" executed-keys "$RES/resumed.log" | sort > "$RES/executed_after_resume.txt"

# (a) nothing that had finished runs again
RERUN=$(comm -12 "$RES/finished_before_kill.txt" "$RES/executed_after_resume.txt")
if [ -n "$RERUN" ]; then
  fail "(a) finished jobs ran again after resume: $(echo "$RERUN" | paste -sd' ')"
else
  echo "(a) finished before kill and executed after resume are disjoint: OK"
fi
grep -q "^$RESUME_RULE\[" "$RES/executed_after_resume.txt" \
  && echo "    ($RESUME_RULE jobs re-run after resume: $(grep -c "^$RESUME_RULE\[" "$RES/executed_after_resume.txt"))" \
  || echo "    note: all $RESUME_RULE jobs had finished before the kill (weaker test)"
# Every job of the full run either finished before the kill, ran after the resume, or was in
# Slurm at the kill and completed there before scancel (its in-job Snakemake finished the outputs'
# metadata, so the resumed controller rightly keeps them).
"$PY" "$TOOLS" executed-keys "$FULL/run.log" | sort > "$RES/all_jobs.txt"
"$PY" "$TOOLS" submitted-keys "$RES/killed.log" | sort > "$RES/submitted_before_kill.txt"
sort -u "$RES/finished_before_kill.txt" "$RES/executed_after_resume.txt" > "$RES/seen.txt"
LATE=$(comm -23 "$RES/all_jobs.txt" "$RES/seen.txt")
if [ -n "$LATE" ]; then
  NOT_SUBMITTED=$(comm -23 <(echo "$LATE") "$RES/submitted_before_kill.txt")
  if [ -n "$NOT_SUBMITTED" ]; then
    fail "jobs that neither finished nor ran after resume: $(echo "$NOT_SUBMITTED" | paste -sd' ')"
  fi
  echo "    completed in Slurm after the controller was killed (kept, not re-run): $(echo "$LATE" | paste -sd' ')"
fi
EXTRA=$(comm -13 "$RES/all_jobs.txt" "$RES/seen.txt")
[ -z "$EXTRA" ] || fail "jobs not in the full run: $(echo "$EXTRA" | paste -sd' ')"

# (b) outputs equal to the uninterrupted run's
if [ $RC -eq 0 ]; then
  "$PY" "$TOOLS" compare "$FULL" "$RES" "$STRICT" || fail "(b) outputs differ from the uninterrupted run"
fi

# (c) outputs equal to an uninterrupted local run's (no Slurm)
wait "$LPID" 2>/dev/null || true
LPID=""
LRC=$(cat "$LOCAL/exit_status" 2>/dev/null || echo "?")
if [ "$LRC" != 0 ]; then
  tail -n 30 "$LOCAL/run.log"; fail "local run exited $LRC"
elif [ $RC -eq 0 ]; then
  echo "(c) resumed Slurm run vs uninterrupted local run:"
  "$PY" "$TOOLS" compare "$LOCAL" "$RES" "$STRICT" || fail "(c) outputs differ from the uninterrupted local run"
fi

echo "logs: $FULL/run.log $RES/killed.log $RES/resumed.log $LOCAL/run.log"
finish
