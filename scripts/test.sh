#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh) and run the test suite against the installed wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. "${VITA_VENV:-.venv}/bin/activate"
# The browser test drives Debian's Chromium (never a Playwright-downloaded browser); best effort.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium: the browser test will be skipped" >&2
fi
# Run from a neutral folder so `import vita_engine` resolves to the installed wheel, not python/.
python -m pytest -q -p no:cacheprovider --rootdir="$PWD" -c "$PWD/pyproject.toml" "$PWD/tests" "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
