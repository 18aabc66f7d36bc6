#!/usr/bin/env bash
# The CUDA toolkit that `cargo build --features cuda` needs, from PyPI (no GPU and no
# OS package needed): nvcc, cicc (nvvm), the runtime headers and libcudart, CCCL's headers.
# NVIDIA's CUDA 12 nvcc wheels hold ptxas only; the CUDA 13 ones (`nvidia-cuda-nvcc`
# 13.0) hold the whole compiler, laid out as a toolkit under nvidia/cu13/.
#
#   scripts/setup-cuda.sh            install into $TABLETRACE_HOME/cuda13 (once) and
#                                    print the environment a build needs
#   scripts/setup-cuda.sh --check    also build the release binary with --features cuda
#                                    into target/cuda (candle's kernels through nvcc, then
#                                    the workspace: ~18 CPU-minutes here), say what it
#                                    links, and run the GPU tests (they skip without a GPU)
#   source <(scripts/setup-cuda.sh --env)   set that environment in this shell
#
# CUDA_COMPUTE_CAP (default 80: A100 and newer run its PTX; 90 for H100/H200) picks the
# architecture candle's kernels are compiled for — without a GPU nothing can detect it.
# The binary needs an NVIDIA driver that runs CUDA 13 (>= 580) where it runs.
set -euo pipefail
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
prefix="$home/cuda13"
root="$prefix/nvidia/cu13"
version=13.0

if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/lib/libcublas.so.13" ]; then
  echo "installing CUDA $version (nvcc, nvvm, runtime, crt, cccl, nvrtc, cuBLAS, cuRAND) from PyPI into $prefix" >&2
  rm -rf "$prefix"   # pip --target skips a top-level folder (nvidia/) that exists
  python3 -m pip install --quiet --disable-pip-version-check --target "$prefix" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-nvvm==$version.*" "nvidia-cuda-runtime==$version.*" \
    "nvidia-cuda-crt==$version.*" "nvidia-cuda-cccl==$version.*" "nvidia-cuda-nvrtc==$version.*" \
    "nvidia-cublas==$version.*" "nvidia-curand==10.4.0.*"
fi
# The wheels ship versioned libraries only; the linker looks for libX.so.
for lib in cudart cublas cublasLt nvrtc curand; do
  so=""
  for f in "$root/lib/lib$lib.so."*; do
    name="${f##*/}"
    # the library's major-version name (libX.so.13), not libX.so.13.0.1
    if [[ "$name" =~ ^lib$lib\.so\.[0-9]+$ ]]; then so="$name"; break; fi
  done
  [ -n "$so" ] || { echo "error: lib$lib.so.<major> missing in $root/lib" >&2; exit 1; }
  ln -sf "$so" "$root/lib/lib$lib.so"
done
# libcuda.so belongs to the GPU driver, not to any wheel. cudarc links against it, so the
# build gets a stub (as the toolkit's lib64/stubs/libcuda.so): every cu* function cuda.h
# declares, returning CUDA_ERROR_NO_DEVICE (100), under the driver's soname, so that the
# binary loads the real driver where it runs.
if [ ! -e "$root/lib/stubs/libcuda.so" ]; then
  mkdir -p "$root/lib/stubs"
  { gcc -E -P -I"$root/include" "$root/include/cuda.h" | grep -o -E '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t'
    grep -o -E 'CUDAAPI[[:space:]]+cu[A-Z][A-Za-z0-9_]*' "$root/include/cuda.h" | awk '{print $2}'
  } | sort -u | awk '{print "int " $1 "(void) { return 100; }"}' > "$root/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/cuda_stub.c"
fi
[ -d "$root/lib64" ] || ln -s lib "$root/lib64"

env_lines() {
  cat <<EOF
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export CUDA_TOOLKIT_ROOT_DIR="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib:$root/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
EOF
}

case "${1:-}" in
  --env) env_lines; exit 0 ;;
  --check) ;;
  "") echo "nvcc: $("$root/bin/nvcc" --version | tail -1)"; echo "environment for a CUDA build:"; env_lines; exit 0 ;;
  *) echo "error: unknown option $1 (--env, --check)" >&2; exit 2 ;;
esac

eval "$(env_lines)"
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
echo "nvcc: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
start=$(date +%s)
# One cargo resolution for the binary and the tests (a second one would compile candle's
# kernels again): the CLI's test target makes cargo build the release binary.
sel=(--release --locked --features tabletrace/cuda -p tabletrace -p tabletrace-train --target-dir target/cuda)
cargo test "${sel[@]}" --test cli --test integration --no-run
bin=target/cuda/release/tabletrace
echo "built $bin and the tests in $(( $(date +%s) - start )) s; it links $(ldd "$bin" | grep -o -E 'lib(cudart|cuda|cublas|cublasLt|curand|nvrtc)\.so[.0-9]*' | sort -u | tr '\n' ' ')"
# Without an NVIDIA driver the binary cannot load (libcuda.so.1 is the driver's): run it
# against the stub, whose every call fails, so the CPU paths and the GPU test's skip run.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  mkdir -p "$root/lib/stubs/run" && ln -sf ../libcuda.so "$root/lib/stubs/run/libcuda.so.1"
  export LD_LIBRARY_PATH="$root/lib/stubs/run:$LD_LIBRARY_PATH"
  echo "no NVIDIA driver here: running against the stub libcuda (the GPU test skips)"
fi
"$bin" --version
# The tests of what the GPU computes differently (crates/train/tests/device.rs): the CUDA
# recipe on the CPU, and CUDA against the CPU where a GPU answers.
cargo test "${sel[@]}" --test integration device -- --nocapture
echo "CUDA check done in $(( $(date +%s) - start )) s"
