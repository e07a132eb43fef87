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
    -o "$OUT/digits_compressed.safetensors" --report "$OUT/digits_compressed.safetensors.json" --force
echo
echo "the report (every step's config, figures, per-layer table and warnings): $OUT/digits_compressed.safetensors.json"
echo "load the result in Python:"
echo "    from modelzip_cli import load_model"
echo "    model = load_model(\"$OUT/digits_compressed.safetensors\")  # an nn.Module in eval mode"
echo
echo "== compare the teacher and the compressed student on the held-out digits"
$MZ compare sample_models/digits_teacher.safetensors "$OUT/digits_compressed.safetensors" \
    --data sample_models/digits_test.safetensors
