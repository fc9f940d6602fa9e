#!/usr/bin/env bash
# The prepared GPU check: the multi-view engine on a COCO-sized R50-FPN and box fusion on the GPU, in one
# command that fits a lent machine's minutes (~5 min on an H200). Results land in $OUT.
#
# Here, once:  bash bench/device_prepare.sh         (wheels into .whl/, photos into .devdata/)
# There:       device run, carry [".whl", ".devdata"], command: bash bench/device_check.sh, timeout_s 540
# Dry run on this CPU machine (checks the script, not the numbers):
#              OUT=/tmp/out DEVICE=cpu VIEWS=0.25x,0.5x:flip IMAGES=2 SIZES=1000 PY=.venv/bin/python \
#                  TINY_COCO=../shared/data/tiny_coco bash bench/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a folder for the results}"
DEVICE=${DEVICE:-cuda}
VIEWS=${VIEWS:-paper}
IMAGES=${IMAGES:-8}
SIZES=${SIZES:-1000 10000 100000}
PY=${PY:-python3}
TINY_COCO=${TINY_COCO:-.devdata/tiny_coco}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$PY" = python3 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}
"$PY" - <<'PYEOF' | tee "$OUT/versions.txt"
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PYEOF
engine() {  # batch size, images
    "$PY" bench/multiview_engine.py --arch resnet50 --images "$2" --batch-size "$1" --repeats 2 \
        --max-detections 20 --quality-images 0 --views "$VIEWS" --device "$DEVICE" --tiny-coco "$TINY_COCO"
}
engine 1 "$IMAGES" 2>&1 | tee "$OUT/r50_engine_batch1.txt"
engine 4 "$IMAGES" 2>&1 | tee "$OUT/r50_engine_batch4.txt"
# shellcheck disable=SC2086  # SIZES is a list
"$PY" bench/fusion_vs_ensemble_boxes.py --sizes $SIZES --repeats 3 --device "$DEVICE" 2>&1 \
    | tee "$OUT/fusion_${DEVICE}.txt"
