#!/usr/bin/env bash
# Train pycoder-v2 on a borrowed GPU machine in one call (it has PyTorch and transformers but cannot
# rebuild the corpus: no site-packages to read, no network).
#
#   here:   .venv/bin/python models/train_reference_v2.py --export-data .devdata     # ~30 MB, xz
#   device: bash scripts/device_train_v2.sh MINUTES                                  # carry .devdata
#   here:   cat <files_at>/model.tar.* | tar xf - -C models/   then
#           .venv/bin/python models/eval_reference.py models/pycoder-v2 models/pycoder-5m
#           .venv/bin/python models/model_card_v2.py models/pycoder-v2
#
# MINUTES of training steps (default 8) are fitted to a --tokens value by timing the first steps
# (printed, so the run can be repeated exactly). The log shows the held-out loss and the induction
# monitor (repeat NLL of a random span 1,000 tokens later) every --eval-every steps. The model
# comes back as 16 MiB tar pieces under $OUT (the device returns files under a size limit).
# The working tree travels with the call: the shipped safetensors count against its 64 MiB, so
# leave them out of the index for the call (git rm --cached) and restore them afterwards.
set -euo pipefail
minutes="${1:-8}"
: "${OUT:?run this through the device tool, which sets OUT}"
test -d .devdata || { echo "error: .devdata missing: export it here first (see the header)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 models/train_reference_v2.py --data .devdata --device cuda --batch 32 \
    --warmup-tokens 10000000 --eval-every 200 --tokens-for-minutes "$minutes" \
    --max-minutes "$(python3 -c "print($minutes + 1)")" --write-model-on-stop \
    --ckpt-dir "$OUT/ckpt-unused" --out "$OUT/model" | tee "$OUT/train.log"
rm -rf "$OUT/ckpt-unused"    # checkpoints are over the size limit; the model dir is what comes back
tar cf - -C "$OUT" model | split -b 16m - "$OUT/model.tar."
rm -rf "$OUT/model"
ls -la "$OUT"
