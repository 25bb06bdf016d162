#!/usr/bin/env bash
# On a GPU server: does `runtime.workers` (DataLoader worker processes) feed the GPU faster?
#   OUT=/tmp/gpu-workers bash docs/gpu-workers.sh
# docs/gpu-check.md found the recipe's steps waiting on the data path (30-45 ms per batch
# against 8-16 ms for a bare training step) with the default `workers = 0`. This trains the
# issue-14 recipe's teacher (144 px) and distils a 5x student (36 px) for EPOCHS epochs on
# a folder shaped like the Kather set, once per worker count, and writes each epoch's
# training seconds to $OUT/workers.json. It first reruns the tests marked `gpu`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-workers}
WORK=${WORK:-/tmp/gpu-work}
EPOCHS=${EPOCHS:-3}
WORKERS=${WORKERS:-0 2 4 8}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
say() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if ! $PY -c "import lowmag.train" 2>/dev/null; then
  say "installing the carried wheels and lowmag into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONSAFEPATH=1 IMPORT_MODE=--import-mode=append
fi
say "machine"
nvidia-smi -L; echo "cpus: $(nproc)"
$PY -c "import torch, lowmag; print('torch', torch.__version__, torch.cuda.get_device_name(), 'lowmag', lowmag.__version__)"

say "tests marked gpu"
timeout 240 $PY -m pytest ${IMPORT_MODE:-} -p no:cacheprovider -o addopts="" -ra -m gpu -q \
  tests/train/test_slides_and_scale.py 2>&1 | tail -4

say "Kather-shaped folder"
$PY docs/gpu-check.py kather-shaped "$WORK/kather-shaped"
for w in $WORKERS; do
  say "workers = $w"
  sed -e "s#^images = .*#images = \"$WORK/kather-shaped\"#" -e "s#^bootstrap = .*#bootstrap = 200#" \
      train/configs/kather2016.toml > "$WORK/w$w.toml"
  printf 'workers = %s\n' "$w" >> "$WORK/w$w.toml"   # [runtime] is the file's last table
  timeout 150 $PY -m lowmag.train.cli teacher "$WORK/w$w.toml" --out "$WORK/w$w" --epochs "$EPOCHS" 2>&1 | tail -1
  timeout 150 $PY -m lowmag.train.cli distill "$WORK/w$w.toml" --out "$WORK/w$w" --epochs "$EPOCHS" \
    --resolution scan/4 2>&1 | tail -1
done
$PY - "$WORK" "$OUT/workers.json" $WORKERS <<'PY'
import json, sys
from pathlib import Path
work, out, counts = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
table = {}
for w in counts:
    for history in sorted((work / f"w{w}" / "steps").glob("*/history.json")):
        seconds = [e["train_seconds"] for e in json.loads(history.read_text())["epochs"]]
        table.setdefault(history.parent.name, {})[w] = seconds
out.write_text(json.dumps(table, indent=1))
for step, rows in table.items():
    for w, seconds in rows.items():
        print(f"{step:28s} workers={w:2s} epoch seconds {seconds}")
PY
say "done"
