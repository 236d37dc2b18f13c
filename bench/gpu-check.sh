#!/usr/bin/env bash
# The GPU check: one script for the few minutes a GPU machine is lent. Installs nothing
# beyond the project (make install, if the venv is missing), runs in under 8 minutes, and
# prints: the card; the train stage vs the in-memory limit for resnet50 at 224 px (bf16,
# channels-last) and predict vs the model's forward pass; a short `dvc repro` of the demo on
# cuda; a 2-process DDP training when there are 2 GPUs. Exits non-zero on any failure.
# On a machine without CUDA it says so and exits 0.
#
#   bash bench/gpu-check.sh            # from the repository root (or anywhere)
#
# Fashion-MNIST (for the speed figures) is read from $OPENSIG_FASHION_MNIST, else
# /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist); without it the speed
# part is skipped with a message and the check fails, so the figures are never silently
# missing. Results land in $GPU_CHECK_OUT (default bench/results/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=$repo/.venv/bin
export PATH="$bin:$PATH"  # dvc repro runs the stages as plain `opensig ...`
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1 MLFLOW_TRACKING_URI=
unset MLFLOW_TRACKING_URI
started=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - started)); }

if [ ! -x "$bin/opensig" ]; then
  step "installing the project (make install)"
  make -s install
fi
if ! "$bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: needs a CUDA GPU (torch.cuda.is_available() is False on this machine);"
  echo "nothing measured. Run it where a GPU is lent: bash bench/gpu-check.sh"
  exit 0
fi

out=${GPU_CHECK_OUT:-$repo/bench/results/gpu-check}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

step "card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
  "$bin/python" -c 'import torch; print(torch.cuda.get_device_name())'
gpus=$("$bin/python" -c 'import torch; print(torch.cuda.device_count())')
"$bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "bf16", torch.cuda.is_bf16_supported())'

step "speed: resnet50, 224 px, bf16, channels-last (train stage vs limit, predict vs forward)"
fashion=${OPENSIG_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ ! -d "$fashion" ]; then
  echo "gpu-check: no Fashion-MNIST at $fashion (set OPENSIG_FASHION_MNIST to the IDX folder)" >&2
  exit 1
fi
(cd "$work" && cp "$repo/params.yaml" . && OPENSIG_FASHION_MNIST=$fashion timeout 330 \
  "$bin/opensig" bench speed --backbone resnet50 --image-size 224 --in-chans 3 \
  --device cuda --batch-size 128 --per-class 400 --epochs 2 --rounds 3 \
  --ingest-images 50 --out "$out" --work "$work/speed")
cat "$out"/speed_cuda_224px.md

step "demo: dvc repro on cuda (digits, 3 epochs)"
git clone -q "$repo" "$work/demo"
cd "$work/demo"
"$bin/python" - <<'EOF'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["train"].update(device="cuda", epochs=3)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF
"$bin/opensig" demo-data --source digits --out data
"$bin/dvc" add -q data
timeout 240 "$bin/dvc" repro
"$bin/python" - <<'EOF'
import csv, json
train, metrics = json.load(open("reports/train.json")), json.load(open("reports/metrics.json"))
epochs = len(list(csv.DictReader(open("reports/train/train_history.csv"))))
assert train["device"].startswith("cuda"), train["device"]
print(f"device {train['device']}: {train['seconds']:.1f} s for {epochs} epochs, "
      f"{train['images_per_s']:.0f} images/s; macro_f1 {metrics['macro_f1']:.3f}, "
      f"novel AUROC {metrics['novel']['auroc']:.3f}")
EOF

if [ "$gpus" -ge 2 ]; then
  step "DDP: torchrun, 2 processes on 2 GPUs"
  timeout 180 "$bin/torchrun" --standalone --nproc_per_node 2 -m opensig train
  "$bin/python" -c 'import json; r = json.load(open("reports/train.json"));
assert r["world_size"] == 2, r["world_size"]; print("world_size", r["world_size"],
  "images/s", round(r["images_per_s"]))'
else
  step "DDP: skipped (1 GPU)"
fi

step "gpu-check passed"
