#!/bin/bash
# Shared by the batch scripts, which source it after `cd "$SLURM_SUBMIT_DIR"`.

# The environment of `bash launch/setup.sh` (or VENV=...), when there is one.
activate_venv() {
    local venv=${VENV:-.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck source=/dev/null
        source "$venv/bin/activate"
    fi
}

# A port for this job's rendezvous or Ray head: per job, so jobs sharing a node differ.
job_port() {
    echo $((20000 + SLURM_JOB_ID % 20000))
}

# run_until_time_limit STOP COMMAND...: run COMMAND in the background until it ends. On SIGUSR1
# (--signal=B:USR1@...), call the function STOP with COMMAND's pid so that it stops at a
# checkpoint; once COMMAND has ended, requeue the job (the next attempt resumes) and exit 0.
# Otherwise return COMMAND's status.
run_until_time_limit() {
    local stop=$1 pid status=0
    shift
    requeue=0
    trap 'echo "time limit near (SIGUSR1): stopping at a checkpoint, then requeueing"; requeue=1; "$stop" "$pid"' USR1
    "$@" &
    pid=$!
    while true; do  # a trapped signal interrupts `wait`; wait again until COMMAND has ended
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1
    if ((requeue)); then
        scontrol requeue "$SLURM_JOB_ID"
        echo "requeued; the next attempt resumes"
        exit 0
    fi
    return "$status"
}
