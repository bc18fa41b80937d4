#!/bin/bash
# One node's share of a (multi-node) run: starts this node's processes with accelerate launch
# (default) or torchrun, joined by c10d rendezvous at MAIN_ADDR:MAIN_PORT, restarting them from
# the latest checkpoint when one dies (MAX_RESTARTS). Arguments are the Python module and its
# arguments, e.g. `-m gendist.train --config configs/dcgan_celeba64.yaml train.steps=1000`.
#
# Under srun (slurm/*.sbatch) everything comes from SLURM. Elsewhere, run it on every node:
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=10.0.0.1 launch/node.sh -m gendist.train --config ...
#
#   NNODES          nodes in the run            (default: $SLURM_NNODES, else 1)
#   NODE_RANK       this node's index           (default: $SLURM_NODEID, else 0)
#   MAIN_ADDR       address of node 0           (default: localhost)
#   MAIN_PORT       rendezvous port on node 0   (default: 29500)
#   RUN_ID          rendezvous id               (default: $SLURM_JOB_ID, else gendist)
#   PROCS_PER_NODE  processes on this node      (default: GPUs of this node; 1 without GPUs)
#   LAUNCHER        accelerate | torchrun       (default: accelerate)
#   MAX_RESTARTS    restarts after a failure    (default: 3)
#   ZERO_STAGE      1 or 2: DeepSpeed ZeRO, one engine per network (accelerate only; default: DDP)
# Without GPUs the processes run on CPU with gloo.
set -euo pipefail

nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
main_addr=${MAIN_ADDR:-localhost}
main_port=${MAIN_PORT:-29500}
run_id=${RUN_ID:-${SLURM_JOB_ID:-gendist}}
launcher=${LAUNCHER:-accelerate}
max_restarts=${MAX_RESTARTS:-3}
gpus=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)}
procs=${PROCS_PER_NODE:-$gpus}
if ((procs == 0)); then
    procs=1
fi
if ((gpus == 0)); then
    export ACCELERATE_USE_CPU=1
fi
# On SIGTERM the launcher passes the signal to its processes, which finish their step and write
# a checkpoint; it waits this long before SIGKILL (torch's default is 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

echo "node $node_rank/$nnodes on $(hostname): $procs processes ($gpus GPUs), rendezvous $main_addr:$main_port"
case "$launcher" in
accelerate)
    backend=(--multi_gpu)
    if [[ -n ${ZERO_STAGE:-} ]]; then
        # torchrun-style start on every node (no pdsh/ssh), as for DDP
        backend=(--use_deepspeed --zero_stage "$ZERO_STAGE" --deepspeed_multinode_launcher standard)
    fi
    exec accelerate launch "${backend[@]}" --num_machines "$nnodes" --machine_rank "$node_rank" \
        --num_processes "$((nnodes * procs))" --main_process_ip "$main_addr" --main_process_port "$main_port" \
        --rdzv_backend c10d --max_restarts "$max_restarts" --mixed_precision no --dynamo_backend no "$@"
    ;;
torchrun)
    if [[ -n ${ZERO_STAGE:-} ]]; then
        echo "ZERO_STAGE needs LAUNCHER=accelerate (the DeepSpeed settings come from accelerate launch)" >&2
        exit 2
    fi
    exec torchrun --nnodes "$nnodes" --nproc_per_node "$procs" --rdzv_backend c10d \
        --rdzv_endpoint "$main_addr:$main_port" --rdzv_id "$run_id" --max_restarts "$max_restarts" "$@"
    ;;
*)
    echo "LAUNCHER must be accelerate or torchrun, not '$launcher'" >&2
    exit 2
    ;;
esac
