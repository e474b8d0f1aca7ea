#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh) and run the test suite against the installed wheel.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. "${VITA_VENV:-.venv}/bin/activate"
# Run from a neutral folder so `import vita_engine` resolves to the installed wheel, not python/.
python -m pytest -q -p no:cacheprovider --rootdir="$PWD" -c "$PWD/pyproject.toml" "$PWD/tests" "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
