#!/usr/bin/env bash
# The phantom benchmark recipe: regenerates what assets/phantom/ ships and the README's phantom results.
#
#   bash train/recipes/phantom.sh            # main part: data, backbone check, 3 seeds, 2 baselines, publish, evaluate
#   bash train/recipes/phantom.sh ablations  # the Table 4 ablations (one seed each), then their evaluation
#   bash train/recipes/phantom.sh all        # both
#   TRAIN_FLAGS='--amp none' bash train/recipes/phantom.sh ablations
#                                            # extra flags for every training (here: fp32 on a bf16 CPU)
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
CONFIG=train/configs/phantom.yaml
PREFIX=phantom
ENSEMBLE=assets/phantom/checkpoints          # every folder here is a member of the demo's phantom ensemble
BASELINES=assets/phantom/baselines
RESULTS=results/phantom
SEEDS=(0 1 2)
BASELINE_VARIANTS=(semantic_only frequency_only)
EVALUATED_SEEDS=(0)
ABLATIONS=(no_freq no_ffbi no_lffi no_dual_decoder no_tca)
PUBLISH_DTYPE=fp16

run_recipe "$@"
