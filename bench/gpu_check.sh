#!/usr/bin/env bash
# One GPU device check of metricgold_ros (bench/gpu_check.py): ours vs diffusers, the FLOP
# floor, torch.compile, the node end to end. Writes gpu_check.json and gpu_check.md to $OUT
# (else --out DIR, default a new mktemp folder). See BENCHMARKS.md, "GPU device check".
#
#   bash bench/gpu_check.sh [gpu_check.py options]   # run (about 7.5 min on a GPU)
#   bash bench/gpu_check.sh --fetch-wheels           # here, with network: fill .whl/
#
# Python: $PYTHON, else .venv/bin/python when it runs, else python3. When that Python lacks
# diffusers or rclpy and .whl/ (or $MG_WHEELS) holds wheels, they are installed, offline,
# into a scratch prefix first (the GPU machine has torch but neither, and no network).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=${MG_WHEELS:-$REPO/.whl}
PIN_FILE=$REPO/bench/gpu_wheels.txt

if [ "${1:-}" = --fetch-wheels ]; then
    # Wheels for the GPU machine's Python (3.12, x86-64): diffusers and the ROS 2 runtime.
    # Keep .whl/ out of git (.git/info/exclude) and name it in the device tool's carry list.
    PYVER=${MG_WHEEL_PYTHON:-3.12}
    mkdir -p "$WHEELS"
    EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null)
    if [ "$WHEELS" = "$REPO/.whl" ] && [ -n "$EXCLUDE" ]; then
        mkdir -p "$(dirname "$EXCLUDE")"
        grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
    fi
    platforms=()
    for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    grep -v '^\s*#' "$PIN_FILE" | grep -v '^\s*$' | xargs \
        "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64 \
        "${platforms[@]}" -d "$WHEELS" || exit 1
    "${PYTHON:-python3}" bench/gpu_wheels.py "$WHEELS" || exit 1
    echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
    exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
echo "gpu_check.sh: python $(command -v "$PY" || echo "$PY") ($("$PY" -V 2>&1))"

if ! "$PY" -c 'import diffusers, rclpy' 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        # A new private folder, never a fixed /tmp name: whoever made that first would put
        # their modules on our PYTHONPATH.
        PREFIX=${MG_PREFIX:-$(mktemp -d "${TMPDIR:-/tmp}/metricgold-gpu-check-prefix.XXXXXX")}
        echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $PREFIX"
        if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --ignore-installed \
                --disable-pip-version-check --prefix "$PREFIX" "$WHEELS"/*.whl; then
            # The ROS wheels' libraries sit in PREFIX/lib and SITE/ros_*.libs; their
            # bootstrapper (a .pth, not read from PYTHONPATH) would set LD_LIBRARY_PATH.
            LIBS=$PREFIX/lib
            for dir in "$PREFIX"/lib*/python3*/site-packages "$PREFIX"/lib*/python3*/dist-packages
            do
                [ -d "$dir" ] || continue
                export PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}"
                for libs in "$dir"/ros_*.libs; do [ -d "$libs" ] && LIBS="$LIBS:$libs"; done
            done
            export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
        else
            echo "gpu_check.sh: WARNING: installing the wheels failed; the check reports" \
                 "what is missing"
        fi
    else
        echo "gpu_check.sh: WARNING: $PY lacks diffusers or rclpy and $WHEELS holds no" \
             "wheels (bash bench/gpu_check.sh --fetch-wheels, then carry .whl); the check" \
             "reports what is missing"
    fi
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# The check stops itself at --budget (default 450 s); this is the backstop.
BUDGET=450
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --budget) BUDGET=${args[i + 1]:-450} ;;
        --budget=*) BUDGET=${args[i]#--budget=} ;;
    esac
done
timeout -k 10 "$(( ${BUDGET%.*} + 30 ))" "$PY" bench/gpu_check.py "$@"
