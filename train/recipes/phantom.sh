#!/usr/bin/env bash
# The phantom benchmark recipe: regenerates what assets/phantom/ ships and the README's phantom results.
#
#   bash train/recipes/phantom.sh            # main part: data, backbone check, 3 seeds, 2 baselines, publish, evaluate
#   bash train/recipes/phantom.sh ablations  # the Table 4 ablations (one seed each), then their evaluation
#   bash train/recipes/phantom.sh all        # both
#
# The backbone is the one of train/recipes/public.sh (pretrained on the real train images and the phantoms), so the
# phantom and the real-data checkpoints share it; that needs the real data too (train/recipes/common.sh, backbone).
# Every step skips what is finished and resumes what was interrupted (the trainer resumes from
# runs/phantom_<variant>-seed<seed>/latest), so the recipe can be completed in several sittings: run it again.
#
# Budget on this project's 2-core AMD EPYC (fp32): data 1 min, each segmentation run (train/configs/phantom.yaml,
# 480 steps of batch 8) ~30 min with JOBS=2 (two at a time, one thread each), publishing ~1 min per checkpoint,
# the evaluation ~6 min. On a CUDA machine the same commands run there (autocast bf16).
set -euo pipefail
cd "$(dirname "$0")/../.."
source train/recipes/common.sh

DATA=data/phantoms
ENSEMBLE=assets/phantom/checkpoints          # every folder here is a member of the demo's phantom ensemble
BASELINES=assets/phantom/baselines
RESULTS=results/phantom
SEEDS=(0 1 2)
ABLATIONS=(no_freq no_ffbi no_lffi no_dual_decoder no_tca)

prepare() {
    make_public_data
    make_phantom_data
    backbone
}

# runs VARIANT:SEED ...: the trainer's flags for train/configs/phantom.yaml into runs/phantom_VARIANT-seedSEED
runs() {
    for spec in "$@"; do
        printf '%s\n' "--config train/configs/phantom.yaml --variant ${spec%:*} --seed ${spec#*:} --run-dir runs/phantom_${spec%:*}-seed${spec#*:}"
    done
}

main_part() {
    prepare
    mapfile -t flags < <(runs "${SEEDS[@]/#/full:}" semantic_only:0 frequency_only:0)
    train "${flags[@]}"
    for seed in "${SEEDS[@]}"; do publish "phantom_full-seed$seed" "$ENSEMBLE/mini-seed$seed" "$DATA"; done
    publish phantom_semantic_only-seed0 "$BASELINES/mini_semantic_only" "$DATA"
    publish phantom_frequency_only-seed0 "$BASELINES/mini_frequency_only" "$DATA"
    step "evaluate the ensemble and the baselines on the test split -> $RESULTS"
    python -m train.evaluate --data "$DATA" --split test --out "$RESULTS" \
        --runs "FreqMedCLIP-mini (3-seed ensemble)=$ENSEMBLE/mini-seed0,$ENSEMBLE/mini-seed1,$ENSEMBLE/mini-seed2" \
               "FreqMedCLIP-mini (seed 0)=$ENSEMBLE/mini-seed0" \
               "Semantic only=$BASELINES/mini_semantic_only" \
               "Frequency only=$BASELINES/mini_frequency_only" \
        --full-method "FreqMedCLIP-mini (seed 0)"
}

ablations() {
    prepare
    local specs=()
    for variant in "${ABLATIONS[@]}"; do specs+=("$variant:0"); done
    mapfile -t flags < <(runs "${specs[@]}")
    train "${flags[@]}"
    evaluate_ablations "$DATA" "$RESULTS-ablations" "$ENSEMBLE" phantom_
}

case "${1:-main}" in
    main) main_part ;;
    ablations) ablations ;;
    all) main_part; ablations ;;
    *) echo "usage: $0 [main|ablations|all]" >&2; exit 2 ;;
esac
