#!/usr/bin/env bash
# The CPU emulators end to end, as docs/results.md and docs/emulator-design.md report them:
#   train kappa_quick and kappa_cpu -> generate mocks at T = 1 -> simulate held-out maps with a fresh seed ->
#   lensflow.validate (every default statistic, permutation-calibrated verdict, omnibus test, field-level KL gap).
# Usage: pipelines/cpu_models.sh [OUT_DIR] [quick|cpu|both]     (about 20 minutes for both on 2 idle cores)
set -euo pipefail
out="${1:-runs}"
which="${2:-both}"
mkdir -p "$out"
export WANDB_MODE="${WANDB_MODE:-offline}" MPLBACKEND=Agg

run_one() {  # experiment, maps per set
  local exp="$1" n="$2"
  python -m lensflow.train +experiment="$exp" paths.output_dir="$out/outputs" paths.data_dir="$out/data" \
      callbacks.progress_bar_refresh_rate=500 | tee "$out/$exp-train.txt"
  local ckpt
  ckpt=$(grep "best checkpoint:" "$out/$exp-train.txt" | awk '{print $3}')
  python -m lensflow.generate ckpt="$ckpt" n_maps="$n" seed=1 out="$out/$exp-mocks.h5" overwrite=true progress=false
  # held-out simulations: the experiment's field with a seed the training store never used
  python -m lensflow.simulate sim=lognormal_flat n_maps="$n" npix=64 pixel_arcmin=3.28 seed=20261201 \
      out="$out/$exp-heldout.h5" overwrite=true progress=false
  python -m lensflow.validate reference="$out/$exp-heldout.h5" reference_split=all candidate="$out/$exp-mocks.h5" \
      max_maps="$n" emulator="$ckpt" field.max_maps=1000 out="$out/$exp-validate" overwrite=true progress=false \
      2>&1 | tee "$out/$exp-validate.txt" || true
  python - "$out/$exp-validate/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
f = s["field"]
print(f"{sys.argv[1]}: {'PASS' if s['pass'] else 'FAIL'} at {s['inputs']['candidate']['n_maps_used']} mocks vs "
      f"{s['inputs']['reference']['n_maps_used']} held-out simulations; KL gap {f['kl_bits_per_dim']:.5f} ± "
      f"{f['kl_se']:.5f} bits/pixel on {f['n_maps']} held-out maps; omnibus p = {s['omnibus']['pvalue']:.3g}")
PY
}

case "$which" in
  quick) run_one kappa_quick 1000 ;;
  cpu) run_one kappa_cpu 4000 ;;
  both) run_one kappa_quick 1000; run_one kappa_cpu 4000 ;;
  *) echo "error: second argument must be quick, cpu or both, got '$which'" >&2; exit 2 ;;
esac
