#!/usr/bin/env bash
# Issue 17's numbered cases, rerun against the real torch backend (tiny preset, eager), one process at a
# time. Each case prints one line to cases.tsv:
#   case  expected_rc  rc  stderr_lines  traceback(yes/no)  stray_workers  first stderr line
# and its checks (rows kept, run.json status, file modes) as "check" lines. Needs root for the tmpfs cases.
# Usage: bash reports/faults-2026-11-30/cases.sh /tmp/faults   (from the repository root, venv active)
set -u
WORK=${1:-/tmp/faults}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python}
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK" || exit 1
touch "$WORK/.start"
OUT="$HERE/cases.tsv"
: > "$OUT"
TINY=(--preset tiny --framework torch --execution eager --no-report)
pb() { "$PY" -m bench "$@"; }

strays() { pgrep -f "bench.engine.worker" | wc -l; }
temps() { find /tmp -maxdepth 1 -name 'hgbench-*' -newer "$WORK/.start" | wc -l; }  # worker temp folders left since the start

# record CASE EXPECTED RC STDERR_FILE
record() {
  local lines tb first
  lines=$(grep -c . "$4" || true)
  if grep -q "Traceback" "$4"; then tb=yes; else tb=no; fi
  first=$(grep -m1 . "$4" | cut -c1-220)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$lines" "$tb" "$(strays)" "$first" | tee -a "$OUT"
}
check() { printf 'check\t%s\n' "$*" | tee -a "$OUT"; }
status_of() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('status'))" "$1/run.json" 2>/dev/null || echo none; }
rows_of() { "$PY" -c 'import csv,sys; print(sum(1 for _ in csv.DictReader(open(sys.argv[1]))))' "$1/summary.csv" 2>/dev/null || echo 0; }
hints() { cat "$@" 2>/dev/null | grep -c -- '--resume'; }  # the resume hint is printed on the console (stdout)

# ---------------------------------------------------------------- 1. orphaned workers
long_run() { exec "$PY" -m bench run "${TINY[@]}" --phase forward,forward_backward --batch-size 1,2 --iters 100000 --min-time 4 --out "$1" --run-id r; }
for sig in TERM HUP INT; do
  long_run "1-$sig" > "1-$sig.out" 2> "1-$sig.err" &
  pid=$!; sleep 30; kill -"$sig" "$pid"; wait "$pid"; rc=$?
  sleep 1
  case $sig in TERM) want=143;; HUP) want=129;; INT) want=130;; esac
  record "1 SIG$sig to parent" "$want" "$rc" "1-$sig.err"
  check "1 SIG$sig: run.json status=$(status_of "1-$sig/r"), rows kept=$(rows_of "1-$sig/r"), temp folders left=$(temps), resume hint: $(hints "1-$sig.out" "1-$sig.err")"
done
# SIGKILL: the parent cannot react; the worker must die with it, and --resume must notice.
long_run 1-KILL > 1-KILL.out 2> 1-KILL.err &
pid=$!; sleep 30; kill -KILL "$pid"; wait "$pid"; rc=$?; sleep 1
record "1 SIGKILL to parent" 137 "$rc" 1-KILL.err
check "1 SIGKILL: run.json status=$(status_of 1-KILL/r) (stale 'running' expected), rows kept=$(rows_of 1-KILL/r), live_worker.json left=$(ls 1-KILL/r/live_worker.json 2>/dev/null | wc -l)"
pb run --resume 1-KILL/r > 1-KILL-resume.out 2> 1-KILL-resume.err; rc=$?
record "1 --resume after SIGKILL" 0 "$rc" 1-KILL-resume.err
check "1 resume says the parent is gone: $(grep -c 'is gone' 1-KILL-resume.err 1-KILL-resume.out | paste -sd, -); status=$(status_of 1-KILL/r), rows=$(rows_of 1-KILL/r)"

# ---------------------------------------------------------------- 2. compare on a failed or incomplete new run
pb run "${TINY[@]}" --phase forward --batch-size 1,2 --out base --run-id b > /dev/null 2>&1
check "2 base run: status=$(status_of base/b), rows=$(rows_of base/b)"
pb compare base/b 1-TERM/r > 2-interrupted.out 2> 2-interrupted.err; rc=$?
grep -m1 -i "incomplete" 2-interrupted.out > 2-interrupted.why; record "2 compare vs interrupted new run" 1 "$rc" 2-interrupted.why
cp -r base/b 2-failed
"$PY" - 2-failed <<'EOF'
import sys, pandas as pd
path = f"{sys.argv[1]}/summary.csv"
frame = pd.read_csv(path, dtype=str, keep_default_na=False)
frame.loc[frame["cell_id"].str.endswith("b2-forward"), ["status", "error"]] = ["failed", "injected failure"]
frame.to_csv(path, index=False)
EOF
pb compare base/b 2-failed > 2-failed.out 2> 2-failed.err; rc=$?
grep -m1 -i "incomplete" 2-failed.out > 2-failed.why; record "2 compare vs new run with a failed cell" 1 "$rc" 2-failed.why
cp -r base/b 2-header; head -1 base/b/summary.csv > 2-header/summary.csv; head -1 base/b/samples.csv > 2-header/samples.csv
pb compare base/b 2-header > 2-header.out 2> 2-header.err; rc=$?
grep -m1 -i "incomplete" 2-header.out > 2-header.why; record "2 compare vs header-only new run" 1 "$rc" 2-header.why
pb compare base/b 2-failed --allow-partial > 2-partial.out 2> 2-partial.err; rc=$?
grep -m1 -i "incomplete\|warning" 2-partial.out > 2-partial.why; record "2 compare --allow-partial (warns)" 0 "$rc" 2-partial.why

# ---------------------------------------------------------------- 3. unwritable output paths
echo > F
pb run "${TINY[@]}" --out F > /dev/null 2> 3a.err; record "3 run --out FILE" 2 $? 3a.err
pb run "${TINY[@]}" --out F/sub > /dev/null 2> 3b.err; record "3 run --out FILE/sub" 2 $? 3b.err
pb run "${TINY[@]}" --out /proc/hgbench > /dev/null 2> 3c.err; record "3 run --out /proc/..." 2 $? 3c.err
mkdir -p ro && mount -t tmpfs -o size=1m,ro tmpfs ro
pb run "${TINY[@]}" --out ro/x > /dev/null 2> 3d.err; record "3 run --out read-only mount" 2 $? 3d.err
(cd ro && "$PY" -m bench run "${TINY[@]}" > /dev/null 2> ../3e.err); record "3 run, default --out in read-only cwd" 2 $? 3e.err
pb profile --preset tiny --framework torch --execution eager --out F > /dev/null 2> 3f.err; record "3 profile --out FILE" 2 $? 3f.err
pb profile --preset tiny --framework torch --execution eager --out ro/x > /dev/null 2> 3g.err; record "3 profile --out read-only" 2 $? 3g.err
pb report base/b --out F > /dev/null 2> 3h.err; record "3 report --out FILE" 2 $? 3h.err
pb report base/b --out ro/x > /dev/null 2> 3i.err; record "3 report --out read-only" 2 $? 3i.err
mkdir -p D
pb compare base/b base/b --json D > /dev/null 2> 3j.err; record "3 compare --json FOLDER" 2 $? 3j.err
pb compare base/b base/b --csv F/x.csv > /dev/null 2> 3k.err; record "3 compare --csv under a FILE" 2 $? 3k.err
umount ro

# ---------------------------------------------------------------- 4. disk full
# The issue's repro (a 300 KiB tmpfs) is now refused before any worker starts (too little room).
mkdir -p small && mount -t tmpfs -o size=300k tmpfs small
pb run "${TINY[@]}" --phase forward --batch-size 1,2 --out small > /dev/null 2> 4a.err; record "4 run --out on a 300 KiB disk" 2 $? 4a.err
umount small
# The disk fills while the run is under way: a filler takes every free byte once the first rows are written.
mkdir -p full && mount -t tmpfs -o size=4m tmpfs full
"$PY" -m bench run "${TINY[@]}" --phase forward --batch-size 1,2,4 --out full --run-id r > 4.out 2> 4.err &
pid=$!
for _ in $(seq 1 240); do [ "$(rows_of full/r)" -ge 1 ] && break; sleep 0.5; done
rows_before=$(rows_of full/r)
dd if=/dev/zero of=full/filler bs=64k > /dev/null 2>&1
wait "$pid"; rc=$?
record "4 disk fills during a run" 75 "$rc" 4.err
check "4 disk full: rows when the disk filled=$rows_before, rows kept=$(rows_of full/r), run.json status=$(status_of full/r), resume hint: $(hints 4.out 4.err), last line: $(tail -1 4.out | cut -c1-200)"
rm -f full/filler
pb run --resume full/r > 4-resume.out 2> 4-resume.err; rc=$?
record "4 --resume once space is freed" 0 "$rc" 4-resume.err
check "4 after resume: status=$(status_of full/r), rows=$(rows_of full/r)"
umount full

# ---------------------------------------------------------------- 5. damaged CSVs
damage() {  # damage NAME SCRIPT: a copy of base/b with SCRIPT applied to it (python, argv[1] = the copy)
  rm -rf "5-$1"; cp -r base/b "5-$1"; "$PY" - "5-$1" <<< "$2"
}
damage cut 'import sys; p=f"{sys.argv[1]}/summary.csv"; t=open(p).read(); open(p,"w").write(t[:-40])'
pb compare base/b 5-cut > /dev/null 2> 5a.err; record "5 compare, summary.csv cut mid-line" 2 $? 5a.err
pb report 5-cut --out 5-cut-report > /dev/null 2> 5b.err; record "5 report, summary.csv cut mid-line" 2 $? 5b.err
damage inf 'import sys,pandas as pd; p=f"{sys.argv[1]}/summary.csv"; f=pd.read_csv(p,dtype=str,keep_default_na=False); f.loc[f.index[-1],"latency_ms_median"]="inf"; f.to_csv(p,index=False)'
pb compare base/b 5-inf > /dev/null 2> 5c.err; record "5 compare, inf latency" 2 $? 5c.err
damage dup 'import sys; p=f"{sys.argv[1]}/summary.csv"; lines=open(p).read().splitlines(True); open(p,"w").write("".join(lines+[lines[-1]]))'
pb compare base/b 5-dup > /dev/null 2> 5d.err; record "5 compare, duplicate row" 2 $? 5d.err
damage params 'import sys,pandas as pd; p=f"{sys.argv[1]}/summary.csv"; f=pd.read_csv(p,dtype=str,keep_default_na=False); f.loc[f.index[-1],"num_params"]="many"; f.to_csv(p,index=False)'
pb report 5-params --out 5-params-report > /dev/null 2> 5e.err; record "5 report, non-numeric num_params" 2 $? 5e.err
pb profile --preset tiny --framework torch --execution eager --phase forward --out prof > /dev/null 2>&1
pdir=$(ls -d prof/*/ | head -1); pdir=${pdir%/}
"$PY" -c 'import sys; p=sys.argv[1]+"/stages.csv"; t=open(p).read(); open(p,"w").write(t[:-25])' "$pdir"
pb report "$pdir" --out 5-prof-report > /dev/null 2> 5f.err; record "5 report, stages.csv cut mid-line" 2 $? 5f.err

# ---------------------------------------------------------------- 6. huge input size
pb run "${TINY[@]}" --phase forward --batch-size 1 --input-size 160000x160000 --out 6 --run-id r > 6.out 2> 6.err; rc=$?
record "6 --input-size 160000x160000" 1 "$rc" 6.err
check "6 rows: $(rows_of 6/r), statuses: $(cut -d, -f1-200 6/r/summary.csv 2>/dev/null | "$PY" -c 'import sys,csv; r=list(csv.DictReader(sys.stdin)); print(sorted({(x["cell_id"].split("-")[-1], x["status"]) for x in r}))')"

# ---------------------------------------------------------------- 7. bad or foreign run.json
cp -r base/b 7-bad; echo '{"settings": ' > 7-bad/run.json
pb run --resume 7-bad > /dev/null 2> 7a.err; record "7 --resume, run.json not JSON" 2 $? 7a.err
pb run --like 7-bad --out 7 > /dev/null 2> 7b.err; record "7 --like, run.json not JSON" 2 $? 7b.err
cp -r base/b 7-foreign; echo '{"name": "something else"}' > 7-foreign/run.json
pb run --resume 7-foreign > /dev/null 2> 7c.err; record "7 --resume, foreign run.json" 2 $? 7c.err
pb run --like 7-foreign --out 7 > /dev/null 2> 7d.err; record "7 --like, foreign run.json" 2 $? 7d.err

# ---------------------------------------------------------------- 8. a worker killed by a person
"$PY" -m bench run "${TINY[@]}" --phase forward --batch-size 1 --iters 100000 --min-time 30 --timing-only --out 8 --run-id r > 8.out 2> 8.err &
pid=$!; sleep 12; pkill -KILL -f "bench.engine.worker"; wait "$pid"; rc=$?
record "8 worker SIGKILLed by a person" 1 "$rc" 8.err
check "8 row: $("$PY" -c 'import sys,csv; r=[x for x in csv.DictReader(open(sys.argv[1])) if x["status"]!="ok"]; print([(x["cell_id"], x["status"], x["error"].splitlines()[0][:200]) for x in r])' 8/r/summary.csv)"

# ---------------------------------------------------------------- 9. --help of every module with a main
for module in bench bench.engine.worker bench.regress.ab_check bench.experiments.ab_check_experiment bench.experiments.coverage \
              bench.experiments.regression_check bench.experiments.gpu_check; do
  "$PY" -m "$module" --help > /dev/null 2> "9-$module.err"; record "9 python -m $module --help" 0 $? "9-$module.err"
done

# ---------------------------------------------------------------- 10. result file modes follow the umask
check "10 modes (umask $(umask)): $(stat -c '%a %n' base/b/summary.csv base/b/samples.csv base/b/run.json | paste -sd' ' -)"
(umask 027; pb run "${TINY[@]}" --phase forward --batch-size 1 --timing-only --out 10 --run-id r > /dev/null 2>&1)
check "10 modes (umask 027): $(stat -c '%a %n' 10/r/summary.csv 10/r/samples.csv 10/r/run.json | paste -sd' ' -)"

# ---------------------------------------------------------------- 11. messages
pb run "${TINY[@]}" --framework all,torch > /dev/null 2> 11a.err; record "11 --framework all,torch" 2 $? 11a.err
HGBENCH_CI_THRESHOLD=abc "$PY" -m bench.regress.ab_check --baseline base/b --out 11b > /dev/null 2> 11b.err; record "11 HGBENCH_CI_THRESHOLD=abc" 2 $? 11b.err
pb run "${TINY[@]}" --out '' > /dev/null 2> 11c.err; record "11 --out ''" 2 $? 11c.err
HGBENCH_TEST_SLOWDOWN=abc "$PY" -m bench run "${TINY[@]}" --out 11d > /dev/null 2> 11d.err; record "11 HGBENCH_TEST_SLOWDOWN=abc" 2 $? 11d.err
pb run "${TINY[@]}" --phase forward --batch-size 1000000000 --out 11e --run-id r > /dev/null 2> 11e.err; rc=$?
record "11 --batch-size 1000000000" 1 "$rc" 11e.err
check "11 batch 1e9 rows: $("$PY" -c 'import sys,csv; print([(x["cell_id"], x["status"]) for x in csv.DictReader(open(sys.argv[1]))])' 11e/r/summary.csv)"

check "stray workers at the end: $(strays); temp folders left: $(temps)"
