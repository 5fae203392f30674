# GPU sign check, part 2 of 2 (issue 27, item 2): ISIC2018-LT, the manifest's split, the five main arms under
# --classifier finetune and --classifier partial on the same run (so on the same synthetic sets), seed 0, then seeds
# 0,1 if time is left. Carried: `.devdata/p2` (the rest of the images, manifest.csv, TAESD's config.json and weights).
# Env: DEV (cuda), TRAIN_EXTRA, EVAL_EXTRA, SEEDS (0,1), KEEP (/tmp/keep), PARTS (.devdata/p2), OUTD ($OUT), RUN.
# On the CPU, as a dry run of the script: DEV=cpu with a small manifest, TRAIN_EXTRA="--generations 1 --epochs 1
# --imitation-epochs 1" EVAL_EXTRA="--epochs 1 --per-class 10".
DEV=${DEV:-cuda}; SEEDS=${SEEDS:-0,1}; KEEP=${KEEP:-/tmp/keep}; PARTS=${PARTS:-.devdata/p2}; OUTD=${OUTD:-$OUT}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$DEV" != cpu ]; then
  [ -d /tmp/site/diffusers ] || { echo "COLD: no /tmp/site here (a fresh machine)"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD/src
  mv $PARTS/isic/images/* $KEEP/isic/images/
fi
cp $PARTS/isic/manifest.csv $KEEP/isic/manifest.csv
ls $KEEP/isic/images | wc -l
R=${RUN:-/tmp/isicrun}; T="python3 -m tailfuse"; START=$(date +%s)
log() { echo "[$(( $(date +%s) - START )) s] $*"; }
pack() {  # $1: name
  tar czf $OUTD/$1.tgz -C $R/eval results.json results.md scores.npz decisions.npz 2>/dev/null; log "packed $1"; }
ARMS='real,oversample,cmo,vae-roundtrip,tailfuse'
C="--pool 5 --loss weighted --no-quality --device $DEV --quiet $EVAL_EXTRA"
log encode; $T encode --data $KEEP/isic/manifest.csv --vae $PARTS/taesd --run $R --device $DEV --quiet || exit 4
log train; $T train --run $R --threads ${TRAIN_THREADS:-12} --quiet $TRAIN_EXTRA || exit 5
log "evaluate finetune seed 0"; $T evaluate --run $R --arms $ARMS --classifier finetune --seeds 0 $C && pack finetune-s0
log "evaluate partial seed 0"; $T evaluate --run $R --arms $ARMS --classifier partial --seeds 0 $C && pack partial-s0
if [ $(( $(date +%s) - START )) -lt ${SEED1_BEFORE:-290} ]; then
  log "evaluate finetune seeds 0,1"; $T evaluate --run $R --arms $ARMS --classifier finetune --seeds $SEEDS $C && pack finetune-s01
  log "evaluate partial seeds 0,1"; $T evaluate --run $R --arms $ARMS --classifier partial --seeds $SEEDS $C && pack partial-s01
fi
log done
