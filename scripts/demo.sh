#!/usr/bin/env bash
# Fetches the demo model and data once (scripts/fetch-demo.sh), then fine-tunes all-MiniLM-L6-v2 on the
# Sentiment Labelled Sentences task (train imdb + yelp, test amazon) with QLoRA (NF4-dq, r = 8, 3 epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-demo.sh
cargo build --release --bin peftk
OUT="${1:-peftk-demo}"
target/release/peftk finetune --out "$OUT"
echo
echo "metrics: $OUT/metrics.jsonl   adapter (PEFT format): $OUT/adapter"
echo "try:     target/release/peftk predict --adapter $OUT/adapter \"a wonderful phone\" \"broke after a day\""
echo "eval:    target/release/peftk eval --adapter $OUT/adapter --json"
echo "compare: target/release/peftk compare --out peftk-compare   # all seven methods, results.{md,csv,json,svg,png}"
