#!/usr/bin/env bash
# Render the HTML report of a run (or a benchmark) to a PNG with headless Chromium.
# Usage: bash benchmarks/render_report.sh RUN_DIR|REPORT.html [OUT_PNG] [WIDTHxHEIGHT]
#   RUN_DIR: the report is made first (spikeprune report, into a temporary folder); REPORT.html: rendered as is.
#   default OUT_PNG: docs/report_example.png, default size 1200x2400 (the page is cut at that height).
# Needs `chromium` (apt-get install -y chromium) and spikeprune on PATH.
set -euo pipefail
run_dir=${1:?usage: render_report.sh RUN_DIR|REPORT.html [OUT_PNG] [WIDTHxHEIGHT]}
out_png=${2:-docs/report_example.png}
size=${3:-1200x2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "render_report.sh: no chromium found (apt-get install -y chromium)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -f "$run_dir" ]; then
  page=$(realpath "$run_dir")
else
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} spikeprune report "$run_dir" --out "$tmp/report"
  page="$tmp/report/report.html"
fi
mkdir -p "$(dirname "$out_png")"
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$tmp/profile" \
  --screenshot="$(realpath -m "$out_png")" --window-size="${size/x/,}" "file://$page" 2>/dev/null
echo "wrote $out_png"
