#!/usr/bin/env bash
# `make demo`: the main job on the bundled sample model. Run from the repository root.
set -euo pipefail
MZ=.venv/bin/modelzip
OUT=sample_models/demo_out
mkdir -p "$OUT"
echo "== inspect the digits teacher"
$MZ inspect sample_models/digits_teacher.safetensors
echo "== evaluate it on the held-out digits"
$MZ eval sample_models/digits_teacher.safetensors --data sample_models/digits_test.safetensors
