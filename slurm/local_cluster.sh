#!/usr/bin/env bash
# A real single-node Slurm cluster (Debian's slurmctld, slurmd, munge 22.05) for tests and laptops.
#
#   slurm/local_cluster.sh install        apt-get the packages (root; ~5 s)
#   slurm/local_cluster.sh start DIR      write DIR/slurm.conf, start munged, slurmctld, slurmd; wait idle
#   slurm/local_cluster.sh stop DIR       stop exactly the daemons started for DIR (their PIDs)
#   slurm/local_cluster.sh env DIR        print the exports that point srun/sbatch at DIR's cluster
#
# No systemd: the daemons are started directly and only their recorded PIDs are stopped. The
# settings are the ones docs/field-notes found to work on one machine (see the comments inline).
set -euo pipefail

cmd=${1:?usage: local_cluster.sh install|start DIR|stop DIR|env DIR}

install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    fi
}

conf_env() { echo "export SLURM_CONF=$1/slurm.conf"; }

start() {
    local dir; dir=$(mkdir -p "$1" && cd "$1" && pwd)
    local host; host=$(hostname -s)
    mkdir -p "$dir"/{state,spool,log,munge}
    chown munge:munge "$dir/munge" 2>/dev/null || true
    chmod 700 "$dir/munge"
    # munge: a key of our own and a socket in DIR, so nothing system-wide is touched
    [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile "$dir/munge/munge.key" >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$dir/munge/munge.key" 2>/dev/null || true
    chmod 400 "$dir/munge/munge.key"
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    local node; node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
    cat > "$dir/slurm.conf" <<CONF
ClusterName=modsquad
SlurmctldHost=$host(127.0.0.1)
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
# refuse impossible requests instead of letting them pend forever
EnforcePartLimits=ALL
# a requeued job restarts ~12 s later instead of ~137 s
AuthInfo=cred_expire=10,socket=$dir/munge/munge.socket
AuthType=auth/munge
CredType=cred/munge
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$((6817 + $$ % 500 * 2))
SlurmdPort=$((6818 + $$ % 500 * 2))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
CONF
    export SLURM_CONF="$dir/slurm.conf"
    # the daemons find the config through the environment (recorded in /proc/PID/environ: see stop)
    munged --key-file "$dir/munge/munge.key" --socket "$dir/munge/munge.socket" \
        --pid-file "$dir/munge/munged.pid" --log-file "$dir/log/munged.log" --seed-file "$dir/munge/seed" --force
    slurmctld -i
    slurmd
    for _ in $(seq 1 100); do
        if scontrol ping 2>/dev/null | grep -q UP && [ "$(sinfo -h -o %T 2>/dev/null | head -1)" = "idle" ]; then
            conf_env "$dir"
            return 0
        fi
        sleep 0.2
    done
    echo "local_cluster.sh: the cluster in $dir did not come up; see $dir/log/" >&2
    return 1
}

# PIDs of every process of the cluster in DIR: the daemons and the slurmstepd of its jobs all carry
# its SLURM_CONF in their environment (slurmstepd is reparented to init, so no process tree helps).
cluster_pids() {
    local conf="SLURM_CONF=$1/slurm.conf" pid
    for pid in $(pgrep -x 'slurmd|slurmctld|slurmstepd' 2>/dev/null; pgrep -f '^slurmstepd' 2>/dev/null); do
        if tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -qx "$conf"; then
            echo "$pid"
        fi
    done | sort -u
}

stop() {
    local dir; dir=$(cd "$1" && pwd)
    export SLURM_CONF="$dir/slurm.conf"
    # Jobs first, while munge is still up: a job step reports its end through munge, and a step that
    # cannot keeps its slurmd from exiting.
    scancel --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [ -z "$(squeue -h 2>/dev/null)" ] && break
        sleep 0.2
    done
    local pids; pids=$(cluster_pids "$dir")
    [ -n "$pids" ] && kill $pids 2>/dev/null
    for _ in $(seq 1 50); do
        pids=$(cluster_pids "$dir")
        [ -z "$pids" ] && break
        sleep 0.2
    done
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    [ -f "$dir/munge/munged.pid" ] && kill "$(cat "$dir/munge/munged.pid")" 2>/dev/null
    return 0
}

case "$cmd" in
    install) install ;;
    start) start "${2:?DIR}" ;;
    stop) stop "${2:?DIR}" ;;
    env) conf_env "$(cd "${2:?DIR}" && pwd)" ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
