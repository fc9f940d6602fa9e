#!/usr/bin/env bash
# Stages what bench/device_check.sh needs on the GPU machine, which reaches no network and gets neither
# ../shared nor this .venv: into .whl/ the Python 3.12 wheels it lacks (the versions this project's .venv
# runs: pydantic and pydantic-core must match), into .devdata/tiny_coco/ the val2017 photos and annotations.
# Both folders are git-ignored; carry them.
#
#   bash bench/device_prepare.sh        # here, once, with `make test` done (.venv exists)
set -euo pipefail
cd "$(dirname "$0")/.."
names='pycocotools|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|ensemble[-_]boxes'
pins=$(.venv/bin/pip freeze | grep -iE "^(${names})==")
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
done
# shellcheck disable=SC2086  # one pin per word
.venv/bin/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl $pins
ls -la .whl
mkdir -p .devdata/tiny_coco/annotations
cp -r ../shared/data/tiny_coco/val2017 .devdata/tiny_coco/
cp ../shared/data/tiny_coco/annotations/*val2017.json .devdata/tiny_coco/annotations/
du -sh .whl .devdata
