#!/usr/bin/env bash
# The real-data recipe: regenerates what assets/public/ ships and the README's "Results on real public data".
#
#   bash train/recipes/public.sh            # main part: data, backbone, 3 seeds, 2 baselines, publish, evaluate
#   bash train/recipes/public.sh ablations  # the Table 4 ablations (one seed each), then their evaluation
#   bash train/recipes/public.sh all        # both
#   SEEDS="0 1" bash train/recipes/public.sh   # fewer ensemble members (default: 0 1 2)
#
# Data: the public files are read from $MIRROR (default ../shared/public-data, a byte-identical mirror) when it
# exists, else downloaded from their GitHub URLs (freqmedclip/data/public/lock.tsv pins every file's sha256).
# The mini CLIP backbone is pretrained on the real train images AND the phantoms, so one backbone serves both
# benchmarks: the shipped assets/backbones/mini-clip-real is checked, or rebuilt with REBUILD_BACKBONE=1
# (train/recipes/common.sh, backbone).
#
# Every step skips what is finished and resumes what was interrupted (train/recipes/common.sh); run it again after
# an interruption. Budget on this project's 2-core AMD EPYC (fp32): data 1 min, the backbone check seconds
# (pretraining with REBUILD_BACKBONE=1: 26 min), each segmentation run ~25 min alone (JOBS=2: two at a time, ~30 min per pair), publishing ~1 min per checkpoint,
# the evaluation ~10 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
source train/recipes/common.sh

DATA=data/public
ENSEMBLE=assets/public/checkpoints     # every folder here is a member of the demo's default ensemble
BASELINES=assets/public/baselines
RESULTS=results/public
read -r -a SEEDS <<< "${SEEDS:-0 1 2}"
ABLATIONS=(no_freq no_ffbi no_lffi no_dual_decoder no_tca)

prepare() {
    make_public_data
    make_phantom_data   # the backbone sees both
    backbone
}

# runs VARIANT:SEED ...: the trainer's flags for train/configs/public.yaml into runs/public_VARIANT-seedSEED
runs() {
    for spec in "$@"; do
        printf '%s\n' "--config train/configs/public.yaml --variant ${spec%:*} --seed ${spec#*:} --run-dir runs/public_${spec%:*}-seed${spec#*:}"
    done
}

main_part() {
    prepare
    mapfile -t flags < <(runs "${SEEDS[@]/#/full:}" frequency_only:0 semantic_only:0)
    train "${flags[@]}"
    for seed in "${SEEDS[@]}"; do publish "public_full-seed$seed" "$ENSEMBLE/mini-seed$seed" "$DATA"; done
    publish public_semantic_only-seed0 "$BASELINES/mini_semantic_only" "$DATA"
    publish public_frequency_only-seed0 "$BASELINES/mini_frequency_only" "$DATA"
    step "evaluate the ensemble and the baselines on the test split -> $RESULTS"
    local members=("${SEEDS[@]/#/$ENSEMBLE/mini-seed}")
    local runs=("FreqMedCLIP-mini (${#SEEDS[@]}-seed ensemble)=$(IFS=,; echo "${members[*]}")")
    for seed in "${SEEDS[@]}"; do runs+=("FreqMedCLIP-mini (seed $seed)=$ENSEMBLE/mini-seed$seed"); done
    python -m train.evaluate --data "$DATA" --split test --out "$RESULTS" \
        --runs "${runs[@]}" "Semantic only=$BASELINES/mini_semantic_only" "Frequency only=$BASELINES/mini_frequency_only" \
        --full-method "FreqMedCLIP-mini (seed 0)"
}

ablations() {
    prepare
    local specs=()
    for variant in "${ABLATIONS[@]}"; do specs+=("$variant:0"); done
    mapfile -t flags < <(runs "${specs[@]}")
    train "${flags[@]}"
    evaluate_ablations "$DATA" "$RESULTS-ablations" "$ENSEMBLE" public_
}

case "${1:-main}" in
    main) main_part ;;
    ablations) ablations ;;
    all) main_part; ablations ;;
    *) echo "usage: $0 [main|ablations|all]" >&2; exit 2 ;;
esac
