# The recipe of phantom.sh and public.sh (sourced, not run on its own): each script sets its settings and calls run_recipe.
#
# Every step skips what is finished and resumes what was interrupted: the trainer resumes from
# runs/<run>/latest, pretraining from its state files, publishing compares timestamps.

step() { printf '\n== %s (%s UTC)\n' "$*" "$(date -u +%H:%M:%S)"; }

# train ARGS...: one `python -m train.train` per argument, each ARGS a word-split list of its flags.
# JOBS=2 runs two at a time with one thread each: on 2 cores ~1.35x the throughput of one run on two threads
# (measured: 4.5 s/step each instead of 3.0 s/step), each run's log in its run directory's log.txt.
train() {
    if ! [[ "${JOBS:-1}" =~ ^[1-9][0-9]*$ ]]; then
        echo "JOBS must be a positive integer, got '$JOBS'" >&2
        exit 2
    fi
    step "train: $# run(s), ${JOBS:-1} at a time"
    if [[ "${JOBS:-1}" == 1 ]]; then
        # shellcheck disable=SC2086  # the flags are meant to split
        for flags in "$@"; do python -m train.train $flags; done
    else
        printf '%s\n' "$@" | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} sh -c 'python -m train.train $1 > /dev/null' _ {}
    fi
}

# publish RUN DEST DATA: the run's best checkpoint in $PUBLISH_DTYPE (mask-checked on DATA), unless DEST is newer
publish() {
    if [[ ! -f "runs/$1/best/config.json" ]]; then
        echo "runs/$1/best/config.json is missing: train it first (nothing published)" >&2
        exit 1
    fi
    if [[ "$2/config.json" -nt "runs/$1/best/config.json" ]]; then
        echo "$2 is up to date with runs/$1"
        return
    fi
    step "publish runs/$1 -> $2"
    python -m train.export "runs/$1" "$2" --data "$3" --dtype "$PUBLISH_DTYPE"
}

# swap_in SRC DEST: copy directory SRC over DEST whole (never half-copied), unless their weights are equal
swap_in() {
    if [[ ! -f "$1/open_clip_model.safetensors" ]]; then
        echo "$1 holds no open_clip_model.safetensors: nothing to copy to $2" >&2
        exit 1
    fi
    if cmp -s "$1/open_clip_model.safetensors" "$2/open_clip_model.safetensors"; then
        return
    fi
    mkdir -p "$(dirname "$2")" && rm -rf "$2.new" && cp -r "$1" "$2.new"
    rm -rf "$2.old" && { [[ ! -e "$2" ]] || mv "$2" "$2.old"; }
    mv "$2.new" "$2" && rm -rf "$2.old"
}

# backbone: the mini CLIP backbone both recipes train on, pretrained on the real train images AND the phantoms.
# The shipped one (assets/backbones/mini-clip-real) is kept, because every checkpoint is tied to its exact weights
# (their configs hold its sha256): pretraining then only checks that it was made with these arguments. With
# REBUILD_BACKBONE=1 it is pretrained into runs/mini-clip-real (resumable) and copied over the shipped one, and every
# segmentation run of both recipes must then be trained again (an old run refuses to resume on other weights).
# Needs data/public and data/phantoms (make_public_data, make_phantom_data).
BACKBONE=assets/backbones/mini-clip-real
PRETRAIN_ARGS=(--data data/public data/phantoms --epochs 6)
backbone() {
    if [[ "${REBUILD_BACKBONE:-0}" == 1 ]]; then
        step "CLIP pretraining on data/public + data/phantoms -> runs/mini-clip-real -> $BACKBONE"
        python -m train.pretrain_clip "${PRETRAIN_ARGS[@]}" --out runs/mini-clip-real
        swap_in runs/mini-clip-real "$BACKBONE"
    else
        step "CLIP pretraining (shipped in $BACKBONE: checks its arguments)"
        python -m train.pretrain_clip "${PRETRAIN_ARGS[@]}" --out "$BACKBONE"
    fi
}

# make_public_data: the real public files from $MIRROR (default ../shared/public-data, a byte-identical mirror) when
# it exists, else from their GitHub URLs (freqmedclip/data/public/lock.tsv pins every file's sha256)
make_public_data() {
    step "real public data -> data/public"
    local mirror=${MIRROR:-../shared/public-data}
    if [[ -d "$mirror" ]]; then
        python -m freqmedclip.data.public --out data/public --mirror "$mirror" --workers 2
    else
        python -m freqmedclip.data.public --out data/public --workers 2
    fi
}

make_phantom_data() {
    step "phantom data -> data/phantoms"
    python -m freqmedclip.data.phantoms --out data/phantoms --workers 2
}

# The recipe both scripts run, on the settings each one sets before calling run_recipe:
#   DATA, CONFIG (train/configs/*.yaml), PREFIX (runs/<PREFIX>_<variant>-seed<seed>), ENSEMBLE and BASELINES (where
#   the seeds and the two single-stream baselines are published), RESULTS, SEEDS, BASELINE_VARIANTS (training order),
#   EVALUATED_SEEDS (single seeds evaluated beside the ensemble), ABLATIONS, PUBLISH_DTYPE (the shipped weights),
#   OPERATING_POINT_FLAGS (extra flags of train.operating_point; default none).
OPERATING_POINT_FLAGS=()

# runs VARIANT:SEED ...: the trainer's flags for $CONFIG into runs/<PREFIX>_VARIANT-seedSEED, then $TRAIN_FLAGS.
# TRAIN_FLAGS='--amp none' keeps a run in fp32 where the config's `amp: auto` would pick bf16 (a CPU with native
# bf16): an ablation must differ from the seeds it is compared with only in what it ablates.
runs() {
    for spec in "$@"; do
        local run_dir="runs/${PREFIX}_${spec%:*}-seed${spec#*:}"
        printf '%s
' "--config $CONFIG --variant ${spec%:*} --seed ${spec#*:} --run-dir $run_dir${TRAIN_FLAGS:+ $TRAIN_FLAGS}"
    done
}

prepare() {
    make_public_data
    make_phantom_data   # the backbone sees both
    backbone
}

main_part() {
    prepare
    mapfile -t flags < <(runs "${SEEDS[@]/#/full:}" "${BASELINE_VARIANTS[@]/%/:0}")
    train "${flags[@]}"
    for seed in "${SEEDS[@]}"; do publish "${PREFIX}_full-seed$seed" "$ENSEMBLE/mini-seed$seed" "$DATA"; done
    publish "${PREFIX}_semantic_only-seed0" "$BASELINES/mini_semantic_only" "$DATA"
    publish "${PREFIX}_frequency_only-seed0" "$BASELINES/mini_frequency_only" "$DATA"
    local members=("${SEEDS[@]/#/$ENSEMBLE/mini-seed}")
    local ensemble="FreqMedCLIP-mini (${#SEEDS[@]}-seed ensemble)"
    local methods=("$ensemble=$(IFS=,; echo "${members[*]}")")
    for seed in "${EVALUATED_SEEDS[@]}"; do methods+=("FreqMedCLIP-mini (seed $seed)=$ENSEMBLE/mini-seed$seed"); done
    methods+=("Semantic only=$BASELINES/mini_semantic_only" "Frequency only=$BASELINES/mini_frequency_only")
    # each method's mask threshold is chosen on validation; the ensemble's also ships with it, for the demo
    step "operating points on the validation split -> $RESULTS/operating_points.json, $ENSEMBLE/operating_point.json"
    python -m train.operating_point --data "$DATA" --split val --out "$RESULTS/operating_points.json" \
        --runs "${methods[@]}" --ship "$ensemble=$ENSEMBLE/operating_point.json" "${OPERATING_POINT_FLAGS[@]}"
    step "evaluate the ensemble and the baselines on the test split -> $RESULTS"
    python -m train.evaluate --data "$DATA" --split test --out "$RESULTS" --runs "${methods[@]}" \
        --operating-points "$RESULTS/operating_points.json" --full-method "FreqMedCLIP-mini (seed 0)"
}

# the Table 4 ablations (one seed each) against the shipped seeds: seed 0 is the reference; the other seeds show how
# much Avg Dice moves with the seed alone, the noise floor of single-seed ablations
ablations() {
    prepare
    mapfile -t flags < <(runs "${ABLATIONS[@]/%/:0}")
    train "${flags[@]}"
    step "evaluate the ablations on the test split -> $RESULTS-ablations"
    local methods=()
    for seed in "${SEEDS[@]}"; do methods+=("FreqMedCLIP-mini (seed $seed)=$ENSEMBLE/mini-seed$seed"); done
    for variant in "${ABLATIONS[@]}"; do methods+=("$variant=runs/${PREFIX}_$variant-seed0"); done
    python -m train.evaluate --data "$DATA" --split test --out "$RESULTS-ablations" --runs "${methods[@]}" \
        --full-method "FreqMedCLIP-mini (seed 0)"
}

run_recipe() {
    case "${1:-main}" in
        main) main_part ;;
        ablations) ablations ;;
        all) main_part; ablations ;;
        *) echo "usage: $0 [main|ablations|all]" >&2; exit 2 ;;
    esac
}
