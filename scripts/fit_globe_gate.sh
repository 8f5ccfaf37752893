#!/usr/bin/env bash
# Fit the global Gate bank only (the seed's fit_globe_gate.sh). Extra Hydra overrides pass through.
#   scripts/fit_globe_gate.sh model.path=Qwen/Qwen1.5-MoE-A2.7B output_dir=runs/qwen-gate
set -euo pipefail
exec globe fit train.families=[gate] "$@"
