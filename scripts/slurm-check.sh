#!/usr/bin/env bash
# Runs deploy/slurm/conala-mined.sbatch on a real Slurm: a one-node cluster on localhost (slurmctld and
# slurmd, no systemd, no cgroups, no munge), as an array of 4 CPU tasks on a tiny model over the
# shipped test rows. Mid-run it requeues one task (Slurm sends it SIGTERM, then runs it again), waits
# for the array, and checks with `conala status` that the output is complete and committed, and with
# `conala sql` that every row is there exactly once.
#
#   scripts/slurm-check.sh            # CONALA=path/to/conala (default: the release build)
#
# Installs Slurm from the distribution's packages when it is missing (needs root, as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
CONALA="${CONALA:-${CARGO_TARGET_DIR:-$HOME/.cache/conala-target}/release/conala}"
[ -x "$CONALA" ] || { echo "slurm-check: no conala binary at $CONALA (cargo build --release)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    echo "slurm-check: installing Slurm from the distribution's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >&2
fi

WORK="$(mktemp -d /tmp/conala-slurm.XXXXXX)"
HOST="$(hostname -s)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CTLD_PORT="$(free_port)"
SLURMD_PORT="$(free_port)"
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/logs"
export SLURM_CONF="$WORK/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=conala-check
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
KillWait=60
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=32 RealMemory=262144 Gres=gpu:8 State=UNKNOWN
PartitionName=check Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# The sbatch asks for a GPU per task: this node declares 8, stand-in device files (the tasks run on
# the CPU).
mkdir -p "$WORK/dev"
touch "$WORK"/dev/gpu{0..7}
echo "AutoDetect=off" >"$WORK/gres.conf"
echo "NodeName=$HOST Name=gpu File=$WORK/dev/gpu[0-7]" >>"$WORK/gres.conf"

cleanup() {
    local status=$?
    scancel --quiet "${JOB:-0}" 2>/dev/null || true
    [ -f "$WORK/slurmd.pid" ] && kill "$(cat "$WORK/slurmd.pid")" 2>/dev/null || true
    [ -f "$WORK/slurmctld.pid" ] && kill "$(cat "$WORK/slurmctld.pid")" 2>/dev/null || true
    sleep 1
    # Kept for a look when the check failed.
    [ "$status" -eq 0 ] && rm -rf "$WORK"
    return "$status"
}
trap cleanup EXIT
fail() {
    echo "slurm-check: FAILED: $*" >&2
    for f in "$WORK"/slurmctld.log "$WORK"/slurmd.log "$WORK"/logs/*; do
        [ -f "$f" ] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }
    done
    exit 1
}

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
    sleep 1
done
sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' || fail "the node did not come up: $(sinfo 2>&1)"

# A tiny model, and a generate plan over 20 copies of the 500 shipped test rows.
"$CONALA" model init --family flan-t5 --size tiny --vocab data/tokenizer/conala-unigram-8k.json \
    --out "$WORK/model" >/dev/null
cat >"$WORK/plan.yaml" <<EOF
name: slurm-check
model: { path: "set by the sbatch" }
steps:
  - source: { uri: "$ROOT/data/conala", config: curated, split: test, repeat: 20 }
  - format: { input: "{intent}\n{snippet}" }
  - tokenize: { input: input, max_input_tokens: 48 }
  - generate: { output: prediction, max_new_tokens: 24, min_new_tokens: 24, window_rows: 256, max_batch_rows: 32 }
  - write: { path: "set by the sbatch", rows_per_file: 256 }
EOF
OUT="$WORK/out"
export CONALA PLAN="$WORK/plan.yaml" MODEL="$WORK/model" DEVICE=cpu OUT

started=$SECONDS
JOB="$(sbatch --parsable --array=0-3 --open-mode=append --cpus-per-task=1 --mem=1G \
    --chdir="$ROOT" --output="$WORK/logs/task-%a.log" deploy/slurm/conala-mined.sbatch)"
echo "slurm-check: submitted array job $JOB (4 tasks)"

# Requeue task 1 once it has committed rows: Slurm sends it SIGTERM and runs it again.
for _ in $(seq 600); do
    rows="$("$CONALA" status "$OUT" 2>/dev/null | awk '$1 == "shard" && $2 == "1/4" {print $4}')" || true
    [ -n "${rows:-}" ] && [ "$rows" != "no" ] && [ "$rows" -gt 0 ] 2>/dev/null && break
    sleep 0.5
done
[ "${rows:-0}" -gt 0 ] 2>/dev/null || fail "task 1 never committed rows"
scontrol requeue "${JOB}_1" || fail "requeue"
echo "slurm-check: requeued task 1 after it committed $rows rows"

for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
    sleep 1
done
[ -z "$(squeue -h -j "$JOB")" ] || fail "the array did not finish: $(squeue -j "$JOB")"

grep -q "SIGTERM received" "$WORK/logs/task-1.log" || fail "task 1 was not stopped by SIGTERM"
grep -q "rows kept from earlier runs" "$WORK/logs/task-1.log" || fail "task 1's rerun did not resume"
"$CONALA" status "$OUT" || fail "the output is not complete"
"$CONALA" status "$OUT" | grep -q "4 of 4 shards complete, 10000 rows, committed (_SUCCESS)" \
    || fail "status: $("$CONALA" status "$OUT" 2>&1)"
counts="$("$CONALA" sql --table "o=$OUT" --format csv \
    "select count(*), count(distinct row_id) from o" | tail -n 1)"
[ "$counts" = "10000,10000" ] || fail "rows: $counts (want 10000,10000)"
echo "slurm-check: OK in $((SECONDS - started)) s: 4 tasks, one requeued mid-run, 10000 rows exactly once, committed"
