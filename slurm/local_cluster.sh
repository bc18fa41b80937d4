#!/bin/bash
# A throwaway single-node SLURM cluster on this machine, to try the batch scripts (and for the
# tests): slurmctld + slurmd + munge on localhost, proctrack/linuxproc, no cgroups.
#
#   slurm/local_cluster.sh install          # Debian/Ubuntu, as root: slurm-wlm, munge
#   slurm/local_cluster.sh start STATE_DIR  # writes STATE_DIR/slurm.conf, starts the daemons
#   export SLURM_CONF=STATE_DIR/slurm.conf  # then sbatch, squeue, scontrol talk to it
#   slurm/local_cluster.sh stop STATE_DIR
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live there

command=${1:?usage: local_cluster.sh install|start STATE_DIR|stop STATE_DIR}

case "$command" in
install)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    ;;
start)
    state=$(realpath -m "${2:?state folder}")
    mkdir -p "$state/spool" "$state/ctld" "$state/log" /run/munge
    node=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
    memory_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$state/slurm.conf" <<CONF
ClusterName=gendist-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=$(id -un)
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=${CRED_EXPIRE:-10}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
MinJobAge=600
KillWait=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    pgrep -x munged >/dev/null || munged --force
    export SLURM_CONF=$state/slurm.conf
    slurmctld -i
    slurmd
    for _ in $(seq 60); do  # until the node takes jobs
        if sinfo -h -N -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM is up: export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 0.5
    done
    echo "the node did not become idle; see $state/log/" >&2
    exit 1
    ;;
stop)
    state=$(realpath -m "${2:?state folder}")
    for daemon in slurmd slurmctld; do
        if [[ -f $state/$daemon.pid ]]; then
            kill "$(cat "$state/$daemon.pid")" 2>/dev/null || true
        fi
    done
    ;;
*)
    echo "unknown command $command; use install, start or stop" >&2
    exit 2
    ;;
esac
