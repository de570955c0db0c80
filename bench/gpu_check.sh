#!/usr/bin/env bash
# The GPU check: the CUDA tests and the GPU figures in one run, each part under its own time cap,
# then a report (report.md, report.json) in OUT. See docs/gpu.md.
#
#   bash bench/gpu_check.sh OUT             on the GPU machine: gpu-wheels/ travels with the project
#                                           (make gpu-wheels, here); no network needed there
#   bash bench/gpu_check.sh --dry-run OUT   the same parts on the CPU at tiny shapes (CI runs this):
#                                           uses what is installed, installs and downloads nothing
#
# Parts: 1. install the carried wheels into a temporary folder (not in a dry run); 2. the tests
# marked `cuda` (pytest -m cuda); 3. bench/gpu_figures.py; then bench/gpu_report.py. A part that
# reaches its cap is interrupted (SIGINT: pytest and the figures keep what they finished) and the
# next part runs. The caps sum to under 8 minutes. OUT gets at most 5 files: the report and logs.
# PYTHON: the interpreter (default: .venv/bin/python if there is one, else python3).
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
wheels=$root/gpu-wheels
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ $dry_run = 1 ]; then
    mode=dry-run tests_cap=${GPU_CHECK_TESTS_S:-120} figures_cap=${GPU_CHECK_FIGURES_S:-120}
else
    mode=gpu install_cap=${GPU_CHECK_INSTALL_S:-45} tests_cap=${GPU_CHECK_TESTS_S:-170}
    figures_cap=${GPU_CHECK_FIGURES_S:-210}
    if [ ! -f "$wheels/manifest.json" ]; then
        echo "gpu_check: $wheels/manifest.json is missing: run \`make gpu-wheels\` here and carry gpu-wheels" >&2
        exit 2
    fi
fi
# Nothing may reach for the network: there is none on the GPU machine, and a dry run downloads nothing.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# part NAME CAP COMMAND...: run it under its cap (SIGINT, then SIGKILL 20 s later), log to
# OUT/NAME.log, record "NAME rc seconds cap" for the report
part() {
    local name=$1 cap=$2
    shift 2
    local started=$SECONDS
    echo "gpu_check: $name (cap ${cap} s)"
    (cd "$root" && timeout -s INT -k 20 "$cap" "$@") >"$out/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" "$cap" >>"$work/parts.tsv"
    return $rc
}

if [ $dry_run = 0 ]; then
    if ! part install "$install_cap" "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --target "$work/site" "$wheels"/*.whl; then
        echo "gpu_check: installing the carried wheels failed; see $out/install.log" >&2
        exit 1
    fi
    mkdir -p "$work/cache" && tar -xzf "$wheels/fusion-train-cache.tar.gz" -C "$work/cache" || exit 1
    export PYTHONPATH=$PYTHONPATH:$work/site PATH=$work/site/bin:$PATH FUSION_TRAIN_CACHE=$work/cache
fi

mapfile -t test_files < <(cd "$root" && grep -rl --include='*.py' 'pytest.mark.cuda' tests)
part tests "$tests_cap" "$PYTHON" -m pytest -m cuda -p no:cacheprovider --junitxml="$work/tests.xml" \
    "${test_files[@]}"

figure_args=("$work/figures.json" --budget-s "$((figures_cap * 3 / 4))")
[ $dry_run = 1 ] && figure_args+=(--dry-run)
part figures "$figures_cap" "$PYTHON" -m bench.gpu_figures "${figure_args[@]}"

report_args=("$work" "$out" --mode "$mode")
[ $dry_run = 0 ] && report_args+=(--wheels "$wheels")
(cd "$root" && "$PYTHON" -m bench.gpu_report "${report_args[@]}")
