#!/usr/bin/env bash
# Container entrypoint: run any moespec command, the deepspeed launcher, or any shell command.
#   docker run moespec:latest moespec-train experiment=demo_gpu
#   docker run moespec:latest train experiment=demo_gpu     # short for moespec-train
#   docker run moespec:latest deepspeed --num_gpus 8 --no_local_rank --module moespec.train experiment=demo_gpu
#   docker run -it moespec:latest bash
set -euo pipefail

if (($# == 0)); then
    set -- bash
fi

case "$1" in
    train)
        shift
        set -- moespec-train "$@"
        ;;
    heads)
        shift
        set -- moespec-heads "$@"
        ;;
    launch-cluster)
        shift
        set -- /opt/moespec/scripts/launch_cluster.sh "$@"
        ;;
    *) ;;
esac

if ! command -v "$1" >/dev/null 2>&1; then
    echo "moespec-entrypoint: '$1' is not a command in this image; try moespec-train, moespec-heads, deepspeed, launch-cluster, python or bash" >&2
    exit 127
fi
exec "$@"
