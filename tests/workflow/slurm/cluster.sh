#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the integration test (needs root):
#   tests/workflow/slurm/cluster.sh start   install slurm-wlm + munge if missing, write the config
#                                  under $SLURM_TEST_DIR, start munged, slurmctld, slurmd
#   tests/workflow/slurm/cluster.sh stop    stop the three daemons (by their pid files)
#   tests/workflow/slurm/cluster.sh env     print the `export SLURM_CONF=...` clients need
# The node has four fake GPUs: GresTypes=gpu, Gres=gpu:4, gres.conf with AutoDetect=off and
# File= on character devices made with mknod (major 195, NVIDIA's). Accounting is off, so
# Snakemake's SLURM plugin needs --slurm-status-command squeue --slurm-no-account, and
# MinJobAge keeps finished jobs visible to squeue/scontrol for the test's assertions.
# Everything (config, sockets, state, logs, devices) lives in $SLURM_TEST_DIR, on ports
# other than SLURM's defaults. One link goes outside: /etc/slurm/slurm.conf -> the test's
# slurm.conf, because the SLURM plugin's job step drops every SLURM_* variable (SLURM_CONF
# included) before its nested `srun`, which then finds no configuration. It is made only
# where no slurm.conf exists, and `stop` removes it; a real installation is left alone.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/finegrained-slurm}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-16818}
NODE=$(hostname -s)
CONF=$DIR/slurm.conf

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurm-wlm munge
}

write_config() {
    mkdir -p "$DIR"/{ctld,slurmd,munge,dev,log}
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    for i in 0 1 2 3; do
        [ -e "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 195 "$i"
    done
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    cat > "$CONF" <<CONF
ClusterName=finegrained-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmdTimeout=300
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
    cat > "$DIR/gres.conf" <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-3]
CONF
}

ETC_CONF=/etc/slurm/slurm.conf

link_config() {
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
        return
    fi
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        echo "$ETC_CONF exists and is not the test cluster's: not starting over a real SLURM" >&2
        exit 1
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
}

start() {
    install
    write_config
    link_config
    export SLURM_CONF=$CONF
    if ! [ -S "$DIR/munge/munge.socket" ] || ! kill -0 "$(cat "$DIR/munged.pid" 2>/dev/null)" 2>/dev/null; then
        munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
            --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munge.seed"
    fi
    if ! kill -0 "$(cat "$DIR/slurmctld.pid" 2>/dev/null)" 2>/dev/null; then
        slurmctld -f "$CONF" -c      # -c: cold start, no jobs from an earlier test
    fi
    if ! kill -0 "$(cat "$DIR/slurmd.pid" 2>/dev/null)" 2>/dev/null; then
        slurmd -f "$CONF"
    fi
    for _ in $(seq 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            sinfo -N -o '%N %T %c %m %G'
            return
        fi
        sleep 1
    done
    echo "the node did not come up; logs in $DIR/log:" >&2
    tail -n 20 "$DIR"/log/*.log >&2
    exit 1
}

stop() {
    for daemon in slurmd slurmctld munged; do
        local pidfile=$DIR/$daemon.pid
        if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")"
        fi
    done
    if [ -L "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" = "$CONF" ]; then
        rm "$ETC_CONF"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
