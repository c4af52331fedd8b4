#!/usr/bin/env bash
# Installs everything pgfleet and its tests need: Debian packages (PostgreSQL 15
# server and client tools, PgBouncer for the benchmarks, the JDBC driver, a JDK and
# Node.js for the real-app tests), a Python venv and the Node test app's npm packages.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v pgbouncer >/dev/null || need+=(pgbouncer)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# Real-app tests (tests/test_apps_*.py): JDBC needs javac and the driver, node-postgres needs npm.
[ -f /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || need+=(default-jdk-headless)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Postgres refuses to run as root; pgfleet runs it as this unprivileged user.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
stamp="$VENV/.pgfleet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# The node-postgres test app's packages (git-ignored), refreshed when package.json changes.
node_app=tests/apps/node
if [ ! -d "$node_app/node_modules" ] || [ "$node_app/package.json" -nt "$node_app/node_modules" ] \
        || [ "$node_app/package-lock.json" -nt "$node_app/node_modules" ]; then
    (cd "$node_app" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
    touch "$node_app/node_modules"
fi
