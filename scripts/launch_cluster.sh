#!/usr/bin/env bash
# Launch moespec training on several nodes with the DeepSpeed launcher.
#
#   scripts/launch_cluster.sh --hostfile HOSTFILE [--num-gpus N] [--master-addr ADDR]
#       [--master-port PORT] [--dry-run] -- <hydra overrides>
#
# HOSTFILE holds one `host slots=N` line per node (comments and blank lines allowed).
# The master address defaults to the first host. --dry-run prints the command instead
# of running it. The overrides are checked against the recipes first (with $PYTHON, default
# python3, when it can import moespec).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/launch_cluster.sh --hostfile HOSTFILE [--num-gpus N] [--master-addr ADDR]
                                 [--master-port PORT] [--dry-run] -- <hydra overrides>

  --hostfile HOSTFILE  DeepSpeed hostfile: one "host slots=N" line per node
  --num-gpus N         GPUs to use on each node (default: the slots of each host)
  --master-addr ADDR   rendezvous address (default: the first host of HOSTFILE)
  --master-port PORT   rendezvous port (default: 29500)
  --dry-run            print the deepspeed command and exit
  -h, --help           show this help

example:
  scripts/launch_cluster.sh --hostfile hostfile -- experiment=demo_gpu loss.orthogonality.weight=1e-4
EOF
}

die() {
    echo "launch_cluster.sh: error: $*" >&2
    exit 2
}

is_uint() {
    [[ "$1" =~ ^[0-9]+$ ]]
}

hostfile=""
num_gpus=""
master_addr=""
master_port="29500"
dry_run=0
overrides=()

while (($# > 0)); do
    case "$1" in
        --hostfile)
            (($# >= 2)) || die "--hostfile needs a path"
            hostfile="$2"
            shift 2
            ;;
        --hostfile=*)
            hostfile="${1#*=}"
            shift
            ;;
        --num-gpus)
            (($# >= 2)) || die "--num-gpus needs a number"
            num_gpus="$2"
            shift 2
            ;;
        --num-gpus=*)
            num_gpus="${1#*=}"
            shift
            ;;
        --master-addr)
            (($# >= 2)) || die "--master-addr needs an address"
            master_addr="$2"
            shift 2
            ;;
        --master-addr=*)
            master_addr="${1#*=}"
            shift
            ;;
        --master-port)
            (($# >= 2)) || die "--master-port needs a port"
            master_port="$2"
            shift 2
            ;;
        --master-port=*)
            master_port="${1#*=}"
            shift
            ;;
        --dry-run)
            dry_run=1
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            overrides=("$@")
            break
            ;;
        *)
            usage >&2
            die "unknown option '$1' (hydra overrides go after '--'); valid: --hostfile, --num-gpus, --master-addr, --master-port, --dry-run"
            ;;
    esac
done

[[ -n "$hostfile" ]] || {
    usage >&2
    die "--hostfile is required"
}
[[ -f "$hostfile" ]] || die "hostfile '$hostfile' does not exist or is not a file"
[[ -r "$hostfile" ]] || die "hostfile '$hostfile' is not readable"
if [[ -n "$num_gpus" ]]; then
    { is_uint "$num_gpus" && ((num_gpus >= 1)); } || die "--num-gpus must be a positive integer, got '$num_gpus'"
fi
{ is_uint "$master_port" && ((master_port >= 1 && master_port <= 65535)); } ||
    die "--master-port must be an integer in 1..65535, got '$master_port'"

# Parse the hostfile: "host slots=N", '#' comments and blank lines allowed.
hosts=()
total_slots=0
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [[ -z "$line" ]] && continue
    if [[ ! "$line" =~ ^([A-Za-z0-9._:-]+)[[:space:]]+slots=([0-9]+)$ ]]; then
        die "$hostfile:$lineno: expected 'host slots=N', got '$line'"
    fi
    host="${BASH_REMATCH[1]}"
    slots="${BASH_REMATCH[2]}"
    ((slots >= 1)) || die "$hostfile:$lineno: slots must be >= 1, got $slots"
    for seen in "${hosts[@]+"${hosts[@]}"}"; do
        [[ "$seen" != "$host" ]] || die "$hostfile:$lineno: host '$host' is listed twice"
    done
    hosts+=("$host")
    total_slots=$((total_slots + slots))
done <"$hostfile"

((${#hosts[@]} > 0)) || die "hostfile '$hostfile' lists no hosts (expected 'host slots=N' lines)"

nodes=${#hosts[@]}
if [[ -n "$num_gpus" ]]; then
    total_gpus=$((nodes * num_gpus))
else
    total_gpus=$total_slots
fi
[[ -n "$master_addr" ]] || master_addr="${hosts[0]}"

cmd=(deepspeed --hostfile "$hostfile" --master_addr "$master_addr" --master_port "$master_port")
if [[ -n "$num_gpus" ]]; then
    cmd+=(--num_gpus "$num_gpus")
fi
cmd+=(--no_local_rank --module moespec.train)
cmd+=("${overrides[@]+"${overrides[@]}"}")

# The overrides are checked here, once, rather than by every rank after the launch.
python="${PYTHON:-python3}"
if "$python" -c "import moespec" 2>/dev/null; then
    "$python" -m moespec.train --check "${overrides[@]+"${overrides[@]}"}" >/dev/null || exit 2
else
    echo "launch_cluster.sh: overrides not checked ($python cannot import moespec; set PYTHON)" >&2
fi

echo "launch_cluster.sh: $nodes node(s), $total_gpus GPU(s), master $master_addr:$master_port" >&2
if ((dry_run)); then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
