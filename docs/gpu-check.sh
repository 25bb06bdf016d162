#!/usr/bin/env bash
# The CUDA checks CI cannot run (it has no GPU), in one pass on a GPU server:
#   OUT=/tmp/gpu-check bash docs/gpu-check.sh
# 1. the tests marked `gpu`; 2. torchrun on CUDA (one process; and what two processes on a
# one-GPU machine are told); 3. whether a seed repeats on CUDA (same seed twice);
# 4. training-step throughput: fp32 / bf16 autocast x default / channels-last layout;
# 5. the issue-14 recipe (train/configs/kather2016.toml) on a folder shaped like the Kather set
#    (synthetic textures: wall time only), stopped after RECIPE_SECONDS; it resumes.
# Where lowmag is not installed (the lent device machine: its own torch, no registry), the
# wheels carried in .whl/ and lowmag itself are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-work}
RECIPE_SECONDS=${RECIPE_SECONDS:-200}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
say() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if ! $PY -c "import lowmag.train" 2>/dev/null; then
  say "installing the carried wheels and lowmag into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  # The checkout's lowmag/ (the core alone) must not shadow the installed one from the cwd.
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONSAFEPATH=1 IMPORT_MODE=--import-mode=append
fi
say "machine"
nvidia-smi -L
$PY -c "import torch, lowmag; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'lowmag', lowmag.__version__)"

say "1. tests marked gpu"
timeout 240 $PY -m pytest ${IMPORT_MODE:-} -p no:cacheprovider -o addopts="" -ra -m gpu -q --continue-on-collection-errors \
  tests/train/test_slides_and_scale.py tests/export/test_tensorrt.py tests/core/test_tensorrt_runtime.py 2>&1 | tail -15

say "tiny experiment (the tests' own image folder)"
$PY - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests/train")
from conftest import TINY_CONFIG, SIDE, make_image_folder
work = Path(sys.argv[1])
images = make_image_folder(work / "tiny-images")
text = TINY_CONFIG.format(images=images.as_posix(), side=SIDE).replace('device = "cpu"', 'device = "cuda"')
(work / "tiny.toml").write_text(text)
PY

say "2. torchrun, one process on the GPU"
timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m lowmag.train.cli teacher "$WORK/tiny.toml" --out "$WORK/ddp1" 2>&1 | tail -4
$PY -c "import json,sys; r=json.load(open(sys.argv[1]))['provenance']['config']['runtime']; print('runtime:', r)" "$WORK/ddp1/steps/teacher-scan/lowmag.json"
say "2b. torchrun, two processes on a one-GPU machine"
timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m lowmag.train.cli teacher "$WORK/tiny.toml" --out "$WORK/ddp2" 2>&1 | grep -iE "error|GPU" | head -6
echo "exit: ${PIPESTATUS[0]}"

say "3. the same seed twice on CUDA"
for k in a b; do
  timeout 120 $PY -m lowmag.train.cli teacher "$WORK/tiny.toml" --out "$WORK/seed-$k" 2>&1 | tail -1
done
$PY docs/gpu-check.py same-weights "$WORK/seed-a/steps/teacher-scan/model.safetensors" "$WORK/seed-b/steps/teacher-scan/model.safetensors"
for k in a b; do $PY -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print(sys.argv[1], 'macro F1', m['macro_f1']['value'])" "$WORK/seed-$k/steps/teacher-scan/metrics.json"; done

say "4. training-step throughput"
[ -n "${SKIP_STEP_BENCH:-}" ] && echo "skipped (SKIP_STEP_BENCH)" || timeout 180 $PY docs/gpu-check.py step-bench "$OUT/step-bench.json"

say "5. the issue-14 recipe on a Kather-shaped synthetic folder, for ${RECIPE_SECONDS} s"
$PY docs/gpu-check.py kather-shaped "$WORK/kather-shaped"
sed -e "s#^images = .*#images = \"$WORK/kather-shaped\"#" train/configs/kather2016.toml > "$WORK/kather-shaped.toml"
timeout "$RECIPE_SECONDS" $PY -m lowmag.train.cli run "$WORK/kather-shaped.toml" --out "$WORK/recipe" 2>&1 \
  | tr '\r' '\n' | grep -aE "^\[|INFO lowmag|rror" | cut -c1-220 | tail -40
$PY - "$WORK/recipe" "$OUT/recipe-epochs.json" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
steps = {}
for history in sorted(run.glob("**/steps/*/history.json")) + sorted(run.glob("**/steps/*/train_state.json")):
    data = json.loads(history.read_text())
    seconds = [e.get("train_seconds") for e in data.get("epochs", [])]
    steps[str(history.parent.relative_to(run))] = {"epochs": len(seconds), "train_seconds": seconds}
Path(sys.argv[2]).write_text(json.dumps(steps, indent=1))
for name, info in steps.items():
    s = [x for x in info["train_seconds"] if x is not None]
    print(f"{name}: {info['epochs']} epochs, median {sorted(s)[len(s)//2] if s else 'n/a'} s")
PY
tar -czf "$OUT/recipe.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' --exclude='cache' recipe 2>/dev/null
say "done"
