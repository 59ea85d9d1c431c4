#!/usr/bin/env bash
# Issue 17 on one GPU: two needle-model trainings side by side, each time-boxed, then each model's dense
# needle table (kvx needle on the GPU). The trainings share the GPU and the CPU cores (WORKERS batch
# processes each); a tiny model's step is launch- and data-bound, so they overlap. --steps-scale 4 makes the
# step caps four times the presets' (the time shares stay), so that the time box, not the caps, ends the stages.
#   continued  the shipped keys model (kvx/assets/needle-llama-keys) through keys-gpu's stages 4-9 (to 8K, then
#              mixed lengths), its weights trained under the preset's default RoPE (the shipped config serves them
#              with llama3 RoPE scaling: rescale the result the same way, --rescale-rope 3,1024, before comparing)
#   large      keys-large from scratch: the keys shape at twice the width (~3.2M parameters, ~13 MB)
# What the first run (2026-11-30, H200, 5.5-minute boxes) showed: keys-gpu from scratch copied single needles
# (0.85-0.95 at 1-2K) but grew no induction (0.01) and no key matching (multikey 0.05): from scratch needs a far
# longer box than one session's device time allows; keys-large ran out of memory in its checks (fixed since).
# Each job ran ~4-6 steps/s at 12-48K tokens a step, well under what the GPU allows, so this script first
# profiles 20 steps of keys-gpu's stage 4 alone (OUT/profile/profile.txt: batch wait, forward/backward and
# optimizer time per step, the slowest operators; under a minute).
# Usage: bash scripts/gpu_needle_training.sh OUT_DIR [MINUTES] [WORKERS]
#   MINUTES (default 6) is each training's time box (stage-end checks come on top: about a minute;
#   each training is killed 2 minutes past its box, each needle table after 150 s);
#   needs torch and transformers on the machine; kvx runs from this tree, no install.
set -uo pipefail
out=${1:?usage: gpu_needle_training.sh OUT_DIR [MINUTES] [WORKERS]}
minutes=${2:-6}
workers=${3:-7}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$out/versions.txt"
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print("device:", name, "| torch", torch.__version__, "| transformers", transformers.__version__)
PY

train() {  # NAME ARGS...: one time-boxed training into OUT/NAME (its log OUT/NAME.log)
  local name=$1; shift
  timeout "$limit" python3 scripts/train_needle_model.py --out "$out/$name" --checkpoint-dir "$out/ckpt-$name" \
    --checkpoint-every 500 --minutes "$minutes" --workers "$workers" --steps-scale 4 "$@" > "$out/$name.log" 2>&1
  echo "$name: training exit $? at $(date +%T)"
}
limit=$(python3 -c "print(int($minutes * 60 + 120))")  # the box, stage-end checks, a margin: then killed (the
# model saved at the last stage's end stays)
timeout 90 python3 scripts/train_needle_model.py --preset keys-gpu --profile 20 --profile-stage 4 --workers "$workers" \
  --init-from kvx/assets/needle-llama-keys --out "$out/profile" > "$out/profile.log" 2>&1
echo "profile: exit $? at $(date +%T)"; grep -m1 '^per step' "$out/profile.log"
echo "trainings start at $(date +%T), $minutes minutes each"
train continued --preset keys-gpu --init-from kvx/assets/needle-llama-keys --start-stage 4 &
train large --preset keys-large &
wait

for name in continued large; do  # each also served as the shipped model is: llama3 RoPE scaling 3,1024
  [[ -f $out/$name/model.safetensors ]] && python3 scripts/train_needle_model.py --rescale-rope 3,1024 \
    --init-from "$out/$name" --out "$out/$name-rope3" > /dev/null 2>&1
done
for name in continued continued-rope3 large large-rope3; do
  [[ -f $out/$name/model.safetensors ]] || { echo "$name: no model saved"; continue; }
  timeout 150 python3 -m kvx.cli needle --model "$out/$name" --lengths 1k,2k,4k,8k --depths 0,25,50,75,100 --samples 4 \
    --variants single,multikey,multivalue,absent --distractors 3 --device cuda --out "$out/$name-needle" \
    --no-progress > "$out/$name-needle.log" 2>&1 &  # resumable: a killed run keeps its finished cells
done
wait
for name in continued continued-rope3 large large-rope3; do  # the runner's summary: per length, then per variant and length
  [[ -f $out/$name-needle.log ]] && { echo "== $name"; grep -v '^wrote ' "$out/$name-needle.log"; }
done | tee "$out/needle-tables.txt"
