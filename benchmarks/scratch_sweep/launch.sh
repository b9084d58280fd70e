#!/usr/bin/env bash
# Starts every run of one sweep round side by side, each pinned to its CPUs (taskset; OMP_NUM_THREADS = their
# count), stops them with SIGINT after TIMEOUT_S seconds and gathers their histories into $OUT/all.json:
#
#   bash benchmarks/scratch_sweep/launch.sh benchmarks/scratch_sweep/round4.txt 560
#
# A round file holds one run per line: name|device|cpus|JSON spec of run_one.py (device: cpu or cuda).
# The five rounds were run on an H100 machine (16 cores) against the scratch recipe of commit b7419d7 (lr 5e-4,
# upstream loss weights); their specs are overrides of that recipe. Needs the workspace's sources on PYTHONPATH.
set -u
cfg=$1; T=$2
OUT=${OUT:-/tmp/sweep_out}; mkdir -p $OUT /tmp/sweep_logs /tmp/sweep_json
export SWEEP_JSON=/tmp/sweep_json
export RFDETR_HOME=${RFDETR_HOME:-/tmp/rh} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
while IFS='|' read -r name dev cpus spec; do
  [ -z "$name" ] && continue; case "$name" in \#*) continue;; esac
  n=$(echo $cpus | tr ',' '\n' | wc -l)
  spec2=$(python -c "import json,sys; s=json.loads(sys.argv[1]); s.setdefault('train',{})['device']=sys.argv[2]; print(json.dumps(s))" "$spec" "$dev")
  OMP_NUM_THREADS=$n timeout -s INT $T taskset -c $cpus python benchmarks/scratch_sweep/run_one.py "$name" "$spec2" > /tmp/sweep_logs/$name.log 2>&1 &
  sleep 2
done < $cfg
wait
python - <<'PY'
import glob, json, os
runs = [json.load(open(f)) for f in sorted(glob.glob("/tmp/sweep_json/*.json"))]
json.dump(runs, open(os.path.join(os.environ.get("OUT", "/tmp/sweep_out"), "all.json"), "w"))
for r in runs:
    print(r["name"], " ".join(f"{s}:{sec:.0f}:{(a or 0):.3f}" for s, sec, a, b in r["history"]))
PY
for f in /tmp/sweep_logs/*.log; do grep -l -E "Traceback" $f && tail -5 $f; done
tar czf $OUT/logs.tgz -C /tmp sweep_logs
