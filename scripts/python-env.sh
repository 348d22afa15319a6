#!/usr/bin/env bash
# Creates (or brings up to date) the project-local Python environment the tests use:
# target/python-env, with the packages of tests/python/requirements.txt. Idempotent and quick
# when nothing changed; .ci/run calls it before the tests, and the tests call it again.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="target/python-env"
requirements="tests/python/requirements.txt"
stamp="$env_dir/.installed-requirements"
if [ -x "$env_dir/bin/python" ] && cmp -s "$requirements" "$stamp"; then
    exit 0
fi
mkdir -p target
python3 -m venv "$env_dir"
"$env_dir/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
