#!/usr/bin/env bash
# `make demo`: the seed's whole pipeline on the bundled digits teacher, then a side-by-side comparison.
# Run from the repository root.
set -euo pipefail
MZ=.venv/bin/modelzip
OUT=sample_models/demo_out
mkdir -p "$OUT"
echo "== the teacher"
$MZ inspect sample_models/digits_teacher.safetensors
echo
echo "== chain: distill → gradual structured prune → static int8 (sample_models/recipe.toml)"
$MZ chain sample_models/digits_teacher.safetensors --recipe sample_models/recipe.toml \
    --data sample_models/digits_train.safetensors --eval-data sample_models/digits_test.safetensors \
    -o "$OUT/digits_compressed.safetensors" --force
echo
echo "== compare the teacher and the compressed student on the held-out digits"
$MZ compare sample_models/digits_teacher.safetensors "$OUT/digits_compressed.safetensors" \
    --data sample_models/digits_test.safetensors
