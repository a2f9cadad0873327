#!/usr/bin/env bash
# Reproduce the paper's Sec. 3 with btvae.py: Table 1 (FID over data sets and lambda2, several seeds),
# Figure 2 (sample grids), Figure 3 (2-d latent space on MNIST) and Table 2's material (blind pairs).
#
#   ./run_all.sh                          # the paper's settings: 3 data sets x 6 settings x 3 seeds, 50 epochs
#   DATASETS=mnist QUICK=1 ./run_all.sh   # MNIST's column on a 2-core CPU in under an hour (reduced budget),
#                                         # into results/quick
#   REPORT_ONLY=1 ./run_all.sh            # remake the tables and figures from finished runs, no training
#   PLAN=1 ./run_all.sh                   # print each run's btvae.py command, one a line (for a cluster: README)
#   BASELINES=1 ./run_all.sh              # the rate-matched baselines of results/README.md, "Is it more than a weaker KL?"
#
# Knobs (environment variables, paper settings by default): DATASETS, SEEDS, LAMBDAS, EPOCHS, FID_SAMPLES,
# FID_2048, FID_WEIGHTS, SUBSET, DATA_DIR, CACHE_DIR, OUT, JOBS, QUICK, PYTHON; with BASELINES=1, BETA_LAM1S and
# MATCHED_LAM1. FID_2048=1 (the default) adds
# btvae.py's --fid-2048: FID, precision and recall in the 2048-d Inception features, for the diversity question. A run whose metrics.json exists is
# skipped and one interrupted part-way is resumed from its last checkpoint, so an interrupted sweep continues
# where it stopped; a failed run leaves FAILED (with the reason) in its folder, the sweep goes on, and the
# table shows it as failed. Delete a run's folder to redo it.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${QUICK:-0}" = 1 ]; then
  # Reduced budget for a 2-core CPU: fewer images, epochs and FID samples, two runs at a time, kept apart.
  : "${SUBSET:=20000}" "${EPOCHS:=10}" "${FID_SAMPLES:=2000}" "${JOBS:=2}" "${OUT:=results/quick}"
fi
DATASETS=${DATASETS:-"mnist cifar10 celeba"}
SEEDS=${SEEDS:-"0 1 2"}
LAMBDAS=${LAMBDAS:-"0 0.00025 0.0025 0.025 0.25 -0.00025"}
FIGURE3_LAMBDA=${FIGURE3_LAMBDA:-0.025}  # the BTVAE of Figure 3: the paper's "best value in most cases"
EPOCHS=${EPOCHS:-50}
FID_SAMPLES=${FID_SAMPLES:-10000}
FID_2048=${FID_2048:-1}
FID_WEIGHTS=${FID_WEIGHTS:-}
SUBSET=${SUBSET:-}
DATA_DIR=${DATA_DIR:-data}
CACHE_DIR=${CACHE_DIR:-$DATA_DIR/btvae_cache}
OUT=${OUT:-results}
JOBS=${JOBS:-1}  # runs at a time; on one GPU, 2-4 (an estimate, not measured: results/README.md, "What the sweep cost")
PYTHON=${PYTHON:-python}

# One line per run: its folder name, then its btvae.py flags.
plan() {
  if [ "${BASELINES:-0}" = 1 ]; then baselines_plan; return; fi
  for dataset in $DATASETS; do
    for lam2 in $LAMBDAS; do
      for seed in $SEEDS; do
        echo "${dataset}_lam2=${lam2}_seed${seed} --dataset $dataset --lam2 $lam2 --seed $seed --fid-samples $FID_SAMPLES"
      done
    done
  done
  case " $DATASETS " in *" mnist "*)  # Figure 3: 2-d latent space, one seed, no FID
    for lam2 in 0 "$FIGURE3_LAMBDA"; do
      echo "figure3_mnist_latent2_lam2=${lam2}_seed0 --dataset mnist --lam2 $lam2 --seed 0 --latent-dim 2 --fid-samples 0"
    done ;;
  esac
}

# BASELINES=1: is the Barlow Twins term more than a weaker KL term? MNIST at the paper's budget, in the order of
# the design written before its runs (results/README.md): beta-VAEs (lambda2 = 0, smaller lambda1; 1.4e-04, halfway
# in log lambda1 between the VAE and 7.9e-05, added by the design's rule) seed 0 of each level and BTVAE(0.025)
# seeds 3 and 4; with MATCHED_LAM1 set to the level whose rate is nearest BTVAE(0.025)'s, its seeds 1-4, then seeds 1-2
# of every other level; the authors' variant, 5 seeds; free bits, 3 seeds.
BETA_LAM1S=${BETA_LAM1S:-"7.9e-05 2.5e-05 7.9e-06 1.4e-04"}
baselines_plan() {
  local common="--dataset mnist --fid-samples $FID_SAMPLES" lam1 seed
  for lam1 in $BETA_LAM1S; do echo "mnist_lam2=0_lam1=${lam1}_seed0 $common --lam2 0 --lam1 $lam1 --seed 0"; done
  for seed in 3 4; do echo "mnist_lam2=0.025_seed$seed $common --lam2 0.025 --seed $seed"; done
  beta_vae() { echo "mnist_lam2=0_lam1=${1}_seed$2 $common --lam2 0 --lam1 $1 --seed $2"; }
  if [ -n "${MATCHED_LAM1:-}" ]; then for seed in 1 2 3 4; do beta_vae "$MATCHED_LAM1" $seed; done; fi  # the answer first
  for seed in 1 2; do
    for lam1 in $BETA_LAM1S; do [ "$lam1" = "${MATCHED_LAM1:-}" ] || beta_vae "$lam1" $seed; done
  done
  for seed in 0 1 2 3 4; do
    echo "mnist_lam2=0.025_bt-on=mu+logvar_seed$seed $common --lam2 0.025 --bt-on mu+logvar --seed $seed"
  done
  for seed in 0 1 2; do echo "mnist_lam2=0_free-bits=0.05_seed$seed $common --lam2 0 --free-bits 0.05 --seed $seed"; done
}

# A planned line's btvae.py command: its flags and the sweep's, with --resume where the run has begun (a finished
# run's --resume says so and does nothing), so that the same command starts, continues or skips it.
command_of() {
  local name=$1; shift
  local dir="$OUT/runs/$name" command=("$PYTHON" btvae.py "$@" --epochs "$EPOCHS" --data-dir "$DATA_DIR")
  command+=(--cache-dir "$CACHE_DIR" --out "$dir")
  [ -f "$dir/checkpoint.pt" ] || [ -f "$dir/metrics.json" ] && command+=(--resume)
  [ -n "$SUBSET" ] && command+=(--subset "$SUBSET")
  [ -n "$FID_WEIGHTS" ] && command+=(--fid-weights "$FID_WEIGHTS")
  [ "$FID_2048" = 1 ] && command+=(--fid-2048)
  printf '%q ' "${command[@]}"
}

# Runs one planned line; never fails the sweep: a failure is written to FAILED in the run's folder. A folder that
# another run holds (a second sweep into the same OUT) is left to it: btvae.py refuses it with one line, which the
# log keeps, and no FAILED.
run_one() {
  local name=$1
  local dir="$OUT/runs/$name"
  [ -f "$dir/metrics.json" ] && { echo "done already: $name"; return 0; }
  mkdir -p "$dir"
  rm -f "$dir/FAILED"
  echo "start: $name"
  local start=$SECONDS status=0
  eval "$(command_of "$@")" >> "$dir/log.txt" 2>&1 || status=$?
  if [ "$status" = 0 ]; then
    echo "finished: $name ($((SECONDS - start)) s)"
  elif tail -n 1 "$dir/log.txt" | grep -q "is in use by another run"; then
    echo "busy: $name: another run holds its folder; left to it"
  else
    echo "exit status $status: $(grep -v '^\s*$' "$dir/log.txt" | tail -n 1)" > "$dir/FAILED"
    echo "FAILED: $name: $(cat "$dir/FAILED")"
  fi
}

# Stops every run in process group $1 and waits until each has saved what it keeps, then ends with status $2 (130
# for Ctrl-C, 143 for SIGTERM, as the shell would report them), leaving the tables as they were.
stop_sweep() {
  kill -TERM -- "-$1" 2>/dev/null || true
  while kill -0 -- "-$1" 2>/dev/null; do sleep 0.2; done
  echo "run_all.sh: stopped; each run keeps its last checkpoint (its log.txt says what it kept);" \
    "./run_all.sh again, with the same settings, continues the sweep" >&2
  exit "$2"
}

if [ "${PLAN:-0}" = 1 ]; then
  plan | while read -r line; do eval "command_of $line"; echo; done
  exit 0
fi

mkdir -p "$OUT/runs"
budget=""
[ -n "$SUBSET" ] && budget="$budget subset of $SUBSET training images,"
[ "$EPOCHS" != 50 ] && budget="$budget at most $EPOCHS epochs,"
[ "$FID_SAMPLES" != 10000 ] && budget="$budget FID on $FID_SAMPLES samples,"
if [ -n "$budget" ]; then
  echo "REDUCED BUDGET${QUICK:+ (QUICK=$QUICK)}:${budget%,} (the paper: all images, up to 50 epochs, 10,000 FID samples)" > "$OUT/BUDGET.txt"
  echo "*** $(cat "$OUT/BUDGET.txt") ***"
else
  rm -f "$OUT/BUDGET.txt"
fi

if [ "${REPORT_ONLY:-0}" != 1 ]; then
  # Runs are independent: JOBS of them at a time share the cores (each gets cores / JOBS threads).
  threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
  export OUT EPOCHS DATA_DIR CACHE_DIR SUBSET FID_WEIGHTS FID_2048 PYTHON OMP_NUM_THREADS=$threads
  export -f run_one command_of
  started=$SECONDS
  # The runs get a process group of their own (job control: set -m), so that a stop reaches every one of them:
  # Ctrl-C, or SIGTERM to this script alone (kill, a job scheduler), is passed on to the whole group, and each
  # run stops as btvae.py does, keeping its last checkpoint. Without this, a kill of the script alone would leave
  # the runs going on unseen.
  set -m
  plan | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _ &
  set +m
  runs=$(jobs -p)
  trap 'stop_sweep "$runs" 130' INT
  trap 'stop_sweep "$runs" 143' TERM
  wait $!
  trap - INT TERM
  echo "sweep took $((SECONDS - started)) s"
fi

"$PYTHON" tools/report.py "$OUT"
