#!/usr/bin/env bash
# The main job: install, train the micro MoE on the bundled corpus (~10 min on 2 CPU
# cores), then generate from the best checkpoint. Offline; safe to re-run (it resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/micro}
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
python train.py data/tinyshakespeare.txt --val-split 0.1 --model-size micro \
    --max-steps ${STEPS:-280} --max-time ${MAX_TIME:-660} --eval-every 50 \
    --output-dir "$OUT" --resume auto
python inference.py "$OUT/best" --prompt "ROMEO:" --max-length 120 --seed 0
