#!/usr/bin/env bash
# The N-body sequence: simulate and train kappa_nbody_cpu, simulate held-out boxes (another seed: boxes never used
# in training), draw mocks from the whole model and from its Gaussian part alone, and validate both against the
# held-out boxes, beside the simulations-against-simulations control; then the held-out bits/pixel of both and the
# simulator's own figures (C_ℓ against halofit, rank-Gaussianized peaks, box inflation). docs/nbody.md has the
# figures of one run.
#   bash pipelines/nbody.sh [RUN_DIR]          (default runs/nbody; ~13 h on 2 CPU cores, 11 of them the step-7 ablations)
set -euo pipefail
run=${1:-runs/nbody}
mkdir -p "$run"
export WANDB_MODE=offline MPLBACKEND=Agg

# 1. training store (12,000 maps from 32 boxes, split by box) and the emulator
python -m lensflow.train +experiment=kappa_nbody_cpu paths.root="$run" 2>&1 | tee "$run/train.log"
ckpt=$(ls -t "$run"/outputs/train/kappa_nbody_cpu/*/checkpoints/best.ckpt | head -1)
train_store=$(ls "$run"/data/sim-*.h5 | head -1)   # the training store, cached under paths.root/data

# 2. held-out boxes: seed 2, 40 boxes x 100 maps (validate's errors are clustered by box: it needs many boxes)
python -m lensflow.simulate sim=nbody_flat n_maps=4000 npix=64 pixel_arcmin=3.28 seed=2 sim.n_boxes=40 \
  out="$run/heldout.h5" overwrite=true

# 3. mocks: the whole model, and the Gaussian part alone (shifted log + crop Gaussian, no Glow)
python -m lensflow.generate ckpt="$ckpt" n_maps=4000 seed=1 out="$run/mocks.h5" overwrite=true
python pipelines/nbody.py gaussian-part --ckpt "$ckpt" --n 4000 --out "$run/gaussian_part.h5"

# 4. validate against the held-out boxes (exit 1 = FAIL is a result here, not an error)
# (memorization.training: the mocks are checked against the training maps, which the held-out store does not hold)
for cand in mocks gaussian_part; do
  python -m lensflow.validate reference="$run/heldout.h5" reference_split=all candidate="$run/$cand.h5" \
    out="$run/validate_$cand" max_maps=4000 overwrite=true progress=false memorization.training="$train_store" || true
done
# control: the training maps themselves against the held-out boxes (a perfect emulator of the training set)
python -m lensflow.validate reference="$run/heldout.h5" reference_split=all candidate="$train_store" \
  candidate_split=train out="$run/validate_training_maps" max_maps=4000 overwrite=true progress=false \
  memorization.enabled=false || true
# control: simulations against simulations, the held-out store's even boxes against its odd boxes (20 and 20)
python pipelines/nbody.py halves --store "$run/heldout.h5" --out-even "$run/even.h5" --out-odd "$run/odd.h5"
python -m lensflow.validate reference="$run/even.h5" reference_split=all candidate="$run/odd.h5" \
  out="$run/validate_sims" max_maps=2000 overwrite=true progress=false || true

# 5. the teacher study: students trained on this model's draws, scored by its exact log p (docs/emulator-design.md)
python -m lensflow.bench kl_teacher bench.data.teacher="$ckpt" out="$run/kl_teacher.json"

# 6. held-out bits/pixel (Gaussian part vs whole model) and the simulator's figures
python pipelines/nbody.py bits --ckpt "$ckpt" --maps "$run/heldout.h5" --n 2000 --out "$run/bits.json"
python pipelines/nbody.py sims --train "$train_store" --heldout "$run/heldout.h5" --out "$run/sims.json"
python -c "
from lensflow.compare.gaussianity import peak_excess
from lensflow.mapstore import open_store
for name in ('heldout', 'mocks', 'gaussian_part'):
    r = peak_excess(open_store('$run/' + name + '.h5').read())
    print(name, 'rank-Gaussianized peaks: max |z| =', round(r['max_abs_z'], 1))
"

# 7. what it took and what limits it (docs/nbody.md): the Gaussian part's small-scale spread against the shift of the
#    log, the latents' radii, then the ablations, trained and validated like the model above: each takes one of its
#    choices back (12 steps per level, the amplitude layer, the linear split priors, 16 boxes of 750 maps, the
#    maximum-likelihood shift), three more training seeds of the config and two of 8 steps, 16 steps, the amplitude
#    layer over 2 or 4 levels and with larger shifts (the C_ℓ spread-against-correlation trade), twice the training
#    steps, and the other variants
python pipelines/nbody.py spread --ckpt "$ckpt" --train "$train_store" --heldout "$run/heldout.h5" --out "$run/spread.json"
# the per-map moments' correlations (variance with skewness and kurtosis), box-bootstrapped, in each set
python pipelines/nbody.py moments --validate "$run/validate_mocks" "$run/validate_sims" --out "$run/moments.json"
# are the latents whitened as a whole on held-out maps? per-level radius spread and cross-level correlation
python pipelines/nbody.py radii --ckpt "$ckpt" --maps "$run/heldout.h5" --n 2000 --out "$run/radii.json"
# where the mocks' small-scale spread comes from: band powers, their correlations, and the finest latent's radius
python pipelines/nbody.py bands --ckpt "$ckpt" --maps "$run/heldout.h5" --mocks "$run/mocks.h5" --n 2000 \
  --out "$run/bands.json"
short="trainer.max_steps=1200"   # the previous config's training length: the rows below with it were measured there
eight="model.steps=8"            # the previous depth: the ablations below were measured at it, 1,200 steps unless said
old="model.amplitude_levels=0 model.split_hidden=0 data.simulate.sim.n_boxes=16"
for variant in "seed=1" "seed=2" "seed=3" "seed=4" "$short" "$short seed=1" "$short seed=2" "$short seed=3" \
  "$short model.steps=16" "$short model.amplitude_levels=4" "$short model.amplitude_levels=2" \
  "$short model.shift_scale=1.75" "$short model.amplitude_levels=4 model.shift_scale=1.75" \
  "$short model.amplitude_levels=4 model.shift_scale=2.0" "$short model.shift_scale=2.0" \
  "$short model.shift_scale=2.5" \
  "$short $eight" "$short $eight seed=1" "$short $eight seed=2" \
  "$short $eight model.amplitude_levels=0" "$short $eight model.amplitude_levels=4" \
  "$short $eight model.amplitude_levels=0 seed=1" "$short $eight model.shift_scale=1.75 seed=1" \
  "$eight model.amplitude_levels=0" "$short $eight model.amplitude_levels=0 model.levels=5" \
  "$short $eight model.amplitude_levels=0 model.split_hidden=0" "$short $eight $old" \
  "$short $eight $old model.shift_scale=1.0" "$eight $old model.shift_scale=1.0 trainer.max_steps=3000" \
  "$short $eight $old model.shift_scale=2.0" "$old model.shift_scale=1.0 model.steps=16 trainer.max_steps=2500"; do
  tag=$(echo "$variant" | tr ' =' '_-')
  # shellcheck disable=SC2086
  python -m lensflow.train +experiment=kappa_nbody_cpu $variant paths.root="$run" name="v_$tag"
  vckpt=$(ls -t "$run"/outputs/train/"v_$tag"/*/checkpoints/best.ckpt | head -1)
  python -m lensflow.generate ckpt="$vckpt" n_maps=4000 seed=1 out="$run/mocks_$tag.h5" overwrite=true
  python -m lensflow.validate reference="$run/heldout.h5" reference_split=all candidate="$run/mocks_$tag.h5" \
    out="$run/validate_$tag" max_maps=4000 overwrite=true progress=false memorization.training="$train_store" || true
  python pipelines/nbody.py bits --ckpt "$vckpt" --maps "$run/heldout.h5" --n 2000 --out "$run/bits_$tag.json"
  python pipelines/nbody.py bands --ckpt "$vckpt" --maps "$run/heldout.h5" --mocks "$run/mocks_$tag.h5" --n 2000 \
    --out "$run/bands_$tag.json"
done
