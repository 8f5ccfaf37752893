#!/usr/bin/env bash
# Fit the global Up bank only (the seed's fit_globe_up.sh). Extra Hydra overrides pass through.
#   scripts/fit_globe_up.sh model.path=Qwen/Qwen1.5-MoE-A2.7B output_dir=runs/qwen-up
set -euo pipefail
exec globe fit train.families=[up] "$@"
