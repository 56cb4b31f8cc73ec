#!/bin/sh
# The image's entrypoint: SageMaker's `docker run IMAGE serve` runs `cuda_compat.sh serve`.
#
# The image carries CUDA 13 user-space libraries; a host driver older than CUDA 13 needs the
# forward-compatibility libcuda the CUDA base image ships in /usr/local/cuda/compat. Newer
# NVIDIA Container Toolkits no longer mount it by themselves, so, as SageMaker's guide for
# bring-your-own containers asks, put it on the library path only when the host driver is
# older than it (a newer driver must win). Without a GPU (or nvidia-smi) nothing changes.
set -e

compat_dir="${CUDA_COMPAT_DIR:-/usr/local/cuda/compat}"
if [ -d "$compat_dir" ] && command -v nvidia-smi >/dev/null 2>&1; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
    compat_lib=$(ls "$compat_dir"/libcuda.so.*.* 2>/dev/null | head -n 1 || true)
    compat=${compat_lib##*libcuda.so.}
    if [ -n "$driver" ] && [ -n "$compat" ] && [ "$driver" != "$compat" ] \
        && [ "$(printf '%s\n%s\n' "$driver" "$compat" | sort -V | head -n 1)" = "$driver" ]; then
        echo "cuda_compat: host driver $driver is older than CUDA's $compat: using $compat_dir" >&2
        export LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
fi

exec "$@"
