#!/usr/bin/env bash
# The full HMST system on the fact-QA world (hmst/qa.py): pretrain the LM on QA text,
# fine-tune it on answers, assemble retriever + memories + critic + early exit, train
# the meta-controller with PPO, run the benches and the demo. Offline.
# Cost: the pretraining (9k steps of batch 64) is ~7 min on one H100 and several hours
# on 2 CPU cores (measured: ~2 steps/s at batch 16); every later stage runs on the CPU
# in minutes. Pretraining resumes (--resume auto); each later stage reuses its output
# when present (delete it to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/qa}
[ -f "$OUT/data/train.txt" ] || python scripts/make_qa_corpus.py --out "$OUT/data"
python train.py "$OUT/data/train.txt" \
    --val-file "$OUT/data/val.txt" --output-dir "$OUT/lm_run" --vocab-size 2048 \
    --seq-len 128 --batch-size 64 --learning-rate 1e-3 --warmup-steps 100 \
    --max-steps ${STEPS:-9000} --eval-every 1000 --eval-batches 20 \
    --set model.d_ff=512 --resume auto
[ -d "$OUT/lm" ] || python -m hmst.training.qa_sft --model "$OUT/lm_run/last" --out "$OUT/lm" \
    --steps 1600
[ -d "$OUT/system" ] || python -m hmst.inference.build --model "$OUT/lm" --out "$OUT/system"
[ -d "$OUT/system/controller" ] || python -m hmst.training.rl_train \
    --checkpoint "$OUT/system" --episodes ${EPISODES:-20000}
python bench/bench_fact_qa.py --system "$OUT/system"
python bench/bench_controller.py --system "$OUT/system"
python demo.py --system "$OUT/system"
