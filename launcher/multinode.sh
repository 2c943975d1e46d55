#!/usr/bin/env bash
# Multi-node training through the `deepspeed` launcher. See launcher/README.md.
#   HOSTFILE=hostfile launcher/multinode.sh pdsh -- --config RUN.yaml [key.sub=value ...]
#   HOSTFILE=hostfile NODE_RANK=n MASTER_ADDR=host launcher/multinode.sh no_ssh -- --config RUN.yaml ...
# Optional: MASTER_PORT (29500), DEEPSPEED (the launcher command, default `deepspeed`).
set -euo pipefail

mode="${1:?usage: multinode.sh pdsh|no_ssh -- TRAINING ARGS}"
shift
[[ "${1:-}" == "--" ]] && shift
hostfile="${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: 'host slots=N')}"
[[ -f "$hostfile" ]] || { echo "multinode.sh: hostfile $hostfile does not exist" >&2; exit 2; }
script="$(cd "$(dirname "$0")/.." && pwd)/training/pretrain.py"
port="${MASTER_PORT:-29500}"
launcher=(${DEEPSPEED:-deepspeed})

case "$mode" in
  pdsh)
    # The first host of the hostfile is the master; pdsh starts the ranks on every host over ssh.
    master="${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$hostfile")}"
    exec "${launcher[@]}" --hostfile "$hostfile" --launcher pdsh \
      --master_addr "$master" --master_port "$port" "$script" "$@"
    ;;
  no_ssh)
    # Run on every node; each starts its own local ranks.
    exec "${launcher[@]}" --hostfile "$hostfile" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
      --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "$port" "$script" "$@"
    ;;
  *)
    echo "multinode.sh: unknown mode '$mode' (pdsh or no_ssh)" >&2
    exit 2
    ;;
esac
