#!/bin/bash
# Fit a tiny template set (defaults), a tiny native set (brain_mri_native.yaml, 3 epochs) and a tiny
# native two-sequence set (T1w + FLAIR on their own grids, brain_mri_multiseq.yaml, 3 epochs) with
# their fixed seeds and score their test scans, with the code found first on PYTHONPATH (a checkout
# of the code before or after a change). Compare two runs with experiments/compare_scores.py.
#   experiments/bit_identity.sh OUT_DIR [CODE_ROOT]      (data is made once in $DATA, default /tmp/anomaly3d_bitid_data)
# Run it from outside any checkout (e.g. from CODE_ROOT itself): `python -m` puts the current folder
# ahead of PYTHONPATH, so a run started inside another checkout would test that checkout's code.
set -e
OUT=$1; ROOT=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$HERE/../.venv/bin/python}
DATA=${DATA:-/tmp/anomaly3d_bitid_data}
if [ -n "$ROOT" ]; then export PYTHONPATH=$ROOT; fi
A="$PY -m anomaly3d_core"
mkdir -p "$OUT"
[ -f "$DATA/tpl/manifest.csv" ] || $A demo-data "$DATA/tpl" --size tiny --seed 0
[ -f "$DATA/nat/manifest.csv" ] || $A demo-data "$DATA/nat" --size tiny --seed 0 --space native
[ -d "$DATA/ms/test" ] || $A demo-data "$DATA/ms" --size tiny --seed 0 --space native --sequences T1w,FLAIR
S="--set tracking.enabled=false"
[ -d "$OUT/tpl_model" ] || $A fit --train "$DATA/tpl/train" --out "$OUT/tpl_model" $S --set data.cache=false
$A score --model "$OUT/tpl_model" --input "$DATA/tpl/test" --out "$OUT/tpl_scores" $S
[ -d "$OUT/nat_model" ] || $A fit --train "$DATA/nat/train" --out "$OUT/nat_model" \
    --config "$HERE/configs/brain_mri_native.yaml" $S --set data.cache=false --set training.num_epochs=3
$A score --model "$OUT/nat_model" --input "$DATA/nat/test" --out "$OUT/nat_scores" $S
[ -d "$OUT/ms_model" ] || $A fit --train "$DATA/ms/train" --out "$OUT/ms_model" \
    --config "$HERE/configs/brain_mri_multiseq.yaml" $S --set data.cache=false --set training.num_epochs=3
$A score --model "$OUT/ms_model" --input "$DATA/ms/test" --out "$OUT/ms_scores" $S
