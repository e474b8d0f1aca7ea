#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), run the test suite against the installed wheel, then
# check the wheel alone in a fresh venv (scripts/wheel_check.sh).
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
# The wheel on its own: a fresh venv with only torch and dist/vita_engine-*.whl, then the CLI
# (scripts/wheel_check.sh, about a minute). VITA_WHEEL_CHECK=0 skips it for a quick local run.
if [ "${VITA_WHEEL_CHECK:-1}" != 0 ]; then
  if ! bash scripts/wheel_check.sh; then
    echo "scripts/test.sh: the wheel check failed" >&2
    [ $rc -ne 0 ] || rc=1
  fi
fi
exit $rc
