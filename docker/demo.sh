#!/usr/bin/env bash
# `make demo`: make a small checkpoint if there is none, serve it on the embedded store, replay a
# data set's test split through HTTP, print the rolling errors, stop the server.
#
# Environment (from the Makefile): DATA (a CSV; default: memcast's generated data set),
# CHECKPOINTS (directory), PORT, BIN (the virtualenv's bin). Optional: STREAMS, MAX_STEPS, EPOCHS,
# MODE (memory_only | full_model | none), WORK (scratch directory).
set -euo pipefail

BIN=${BIN:-.venv/bin}
CHECKPOINTS=${CHECKPOINTS:-checkpoints}
PORT=${PORT:-8765}
DATA=${DATA:-}
WORK=${WORK:-runs/demo}
STREAMS=${STREAMS:-4}
MAX_STEPS=${MAX_STEPS:-300}
EPOCHS=${EPOCHS:-2}
MODE=${MODE:-memory_only}
URL="http://127.0.0.1:${PORT}"

say() { printf '\n== %s\n' "$*"; }

mkdir -p "$WORK" "$CHECKPOINTS"
if [ -z "$DATA" ]; then
    DATA="$WORK/synthetic.csv"
    if [ ! -f "$DATA" ]; then
        say "making memcast's synthetic data set: $DATA"
        "$BIN/memcast" make-data --out "$DATA" --rows 4000
    fi
fi
[ -f "$DATA" ] || { echo "DATA=$DATA: no such file" >&2; exit 2; }

# one small checkpoint per data set, made once
stem=$(basename "$DATA" .csv)
MODEL="demo-${stem}"
if [ -f "$CHECKPOINTS/$MODEL/config.json" ] && [ -f "$CHECKPOINTS/$MODEL/model.safetensors" ]; then
    say "using the checkpoint $CHECKPOINTS/$MODEL"
else
    say "pretraining a small checkpoint on $DATA -> $CHECKPOINTS/$MODEL"
    "$BIN/memcast" pretrain --data "$DATA" --out "$CHECKPOINTS/$MODEL" --epochs "$EPOCHS" \
        --seq-len 48 --pred-len 12 --d-model 32 --max-train-windows 512
fi

say "starting memcast serve on $URL (embedded state store)"
env -u MEMCAST_REDIS_URL "$BIN/memcast" serve --port "$PORT" --checkpoints "$CHECKPOINTS" \
    --default-model "$MODEL" --log-level warning &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT INT TERM

"$BIN/python" -m memcast.harness wait-ready "$URL" --timeout 120

say "replaying the test split of $DATA: $STREAMS streams, $MAX_STEPS observations each, mode $MODE"
"$BIN/memcast" replay --url "$URL" --data "$DATA" --model "$MODEL" --mode "$MODE" \
    --streams "$STREAMS" --max-steps "$MAX_STEPS" --report-every 200 --json "$WORK/replay.json"

say "summary written to $WORK/replay.json; stopping the server"
