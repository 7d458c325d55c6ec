#!/usr/bin/env bash
# The phantom benchmark recipe: regenerates what assets/ ships and the README's phantom results.
#
#   bash train/recipes/phantom.sh            # main part: data, CLIP backbone, 3 seeds, 2 baselines, publish, evaluate
#   bash train/recipes/phantom.sh ablations  # the Table 4 ablations (one seed each), then their evaluation
#   bash train/recipes/phantom.sh all        # both
#
# Every step skips what is finished and resumes what was interrupted (the trainer resumes from
# runs/<config>-seed<seed>/latest), so the recipe can be completed in several sittings: run it again.
#
# The shipped mini CLIP backbone is kept, because the checkpoints are tied to its exact weights (their configs
# hold its sha256); pretraining is then a check that it was made with this recipe's arguments. To rebuild it too,
# set REBUILD_BACKBONE=1: it is pretrained into runs/mini-clip and copied over assets/backbones/mini-clip, and
# every segmentation run must then be trained again (an old run refuses to resume on other backbone weights).
#
# Budget on this project's 2-core CPU (fp32): data 25 s, pretraining ~14 min, each segmentation run ~25-30 min
# (12 epochs x 36 steps of 8, ~2.3 min per epoch alone on both cores, + 4 validations), publishing ~1.5 min per
# checkpoint, the evaluation ~6 min. On a CUDA machine the same commands run there (autocast bf16).
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=data/phantoms
BACKBONE=assets/backbones/mini-clip
ENSEMBLE=assets/phantom/checkpoints          # every folder here is a member of the demo's default ensemble
BASELINES=assets/phantom/baselines
RESULTS=results/phantom
SEEDS=(0 1 2)
ABLATIONS=(no_freq no_ffbi no_lffi no_dual_decoder no_tca)

source train/recipes/common.sh

make_data() {
    step "phantom data -> $DATA"
    python -m freqmedclip.data.phantoms --out "$DATA" --workers 2
}

pretrain() {
    if [[ "${REBUILD_BACKBONE:-0}" == 1 ]]; then
        step "CLIP pretraining -> runs/mini-clip -> $BACKBONE"
        python -m train.pretrain_clip --data "$DATA" --out runs/mini-clip
        swap_in runs/mini-clip "$BACKBONE"
    else
        step "CLIP pretraining (shipped in $BACKBONE: checks its arguments)"
        python -m train.pretrain_clip --data "$DATA" --out "$BACKBONE"
    fi
}

# runs CONFIG:SEED ...: the trainer's flags for train/configs/CONFIG.yaml into runs/CONFIG-seedSEED
runs() { for spec in "$@"; do printf '%s\n' "--config train/configs/${spec%:*}.yaml --seed ${spec#*:}"; done; }

main_part() {
    make_data
    pretrain
    mapfile -t flags < <(runs "${SEEDS[@]/#/mini:}" mini_semantic_only:0 mini_frequency_only:0)
    train "${flags[@]}"
    for seed in "${SEEDS[@]}"; do publish "mini-seed$seed" "$ENSEMBLE/mini-seed$seed" "$DATA"; done
    publish mini_semantic_only-seed0 "$BASELINES/mini_semantic_only" "$DATA"
    publish mini_frequency_only-seed0 "$BASELINES/mini_frequency_only" "$DATA"
    step "evaluate the ensemble and the baselines on the test split -> $RESULTS"
    python -m train.evaluate --data "$DATA" --split test --out "$RESULTS" \
        --runs "FreqMedCLIP-mini (3-seed ensemble)=$ENSEMBLE/mini-seed0,$ENSEMBLE/mini-seed1,$ENSEMBLE/mini-seed2" \
               "FreqMedCLIP-mini (seed 0)=$ENSEMBLE/mini-seed0" \
               "Semantic only=$BASELINES/mini_semantic_only" \
               "Frequency only=$BASELINES/mini_frequency_only" \
        --full-method "FreqMedCLIP-mini (seed 0)"
}

ablations() {
    make_data
    pretrain
    local specs=()
    for variant in "${ABLATIONS[@]}"; do specs+=("mini_$variant:0"); done
    mapfile -t flags < <(runs "${specs[@]}")
    train "${flags[@]}"
    evaluate_ablations "$DATA" "$RESULTS-ablations" "$ENSEMBLE" mini_
}

case "${1:-main}" in
    main) main_part ;;
    ablations) ablations ;;
    all) main_part; ablations ;;
    *) echo "usage: $0 [main|ablations|all]" >&2; exit 2 ;;
esac
