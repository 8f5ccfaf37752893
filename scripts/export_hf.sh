#!/usr/bin/env bash
# Export a fit as a compressed GloBE directory and as a plain dense checkpoint (vLLM / transformers).
#   scripts/export_hf.sh MODEL_PATH ARTIFACTS_DIR OUT_PREFIX [overrides...]
set -euo pipefail
model=$1 arts=$2 out=$3
shift 3
globe export model.path="$model" artifacts="$arts" output_dir="$out-globe" export.format=globe "$@"
globe export model.path="$model" artifacts="$arts" output_dir="$out-dense" export.format=dense "$@"
# Families fitted in separate runs (fit_globe_up.sh / fit_globe_gate.sh) combine with
#   artifacts=runs/qwen-up,runs/qwen-gate   (artifacts is data: never split into a sweep, quotes optional)
