#!/usr/bin/env bash
# The two commands of the README, on a fresh Debian/Ubuntu or macOS (Homebrew) machine:
#   ./run.sh demo          install what is missing, set up saga_db, start all four processes
#   ./run.sh test [args]   install what is missing, run the whole test suite (args go to pytest)
# and for scripts:
#   ./run.sh upgrade       move an existing saga_db made by an earlier version to this layout
#   ./run.sh broker kafka|rabbitmq PORT   a private, throwaway broker in the foreground
#   ./run.sh cluster       HAProxy, 2 orchestrators, 2 of each service, a MariaDB primary +
#                          replica (MHA) and 3 RabbitMQ nodes, in the foreground
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

APT_UPDATED=
apt_install() {
  [ -n "$APT_UPDATED" ] || { as_root apt-get update -qq; APT_UPDATED=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_system_packages() {   # $1 = demo | test | cluster
  if have apt-get; then
    local missing=()
    have mariadbd || have mysqld || missing+=(mariadb-server)
    have mariadb || have mysql || missing+=(mariadb-client)
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null \
      || missing+=(python3-venv)
    [ "$1" = test ] && ! have chromium && missing+=(chromium)
    # the metrics test runs the real Prometheus; the cluster tests the real HAProxy
    [ "$1" = test ] && ! have prometheus && missing+=(prometheus)
    [ "$1" = test ] && ! have haproxy && missing+=(haproxy)
    # the database failover test: MHA (over ssh to the nodes, on loopback)
    [ "$1" = test ] && ! have masterha_manager && missing+=(mha4mysql-manager mha4mysql-node)
    [ "$1" = test ] && ! have sshd && missing+=(openssh-server)
    # the cluster: HAProxy in front of every process and of the database pair, whose
    # failover is MHA's (it reaches each database host over SSH: a private sshd)
    [ "$1" = cluster ] && ! have haproxy && missing+=(haproxy)
    [ "$1" = cluster ] && ! have masterha_manager && missing+=(mha4mysql-manager)
    [ "$1" = cluster ] && ! have sshd && missing+=(openssh-server)
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || have rabbitmq-server || missing+=(rabbitmq-server)
    if [ ${#missing[@]} -gt 0 ]; then
      echo "==> installing ${missing[*]}"
      apt_install "${missing[@]}"
    fi
  elif have brew; then
    have mariadbd || have mysqld || { echo "==> brew install mariadb"; brew install mariadb; }
    [ "$1" = cluster ] && ! have haproxy && { echo "==> brew install haproxy"; brew install haproxy; }
    have rabbitmq-server || { echo "==> brew install rabbitmq"; brew install rabbitmq; }
  else
    echo "Install MariaDB (or MySQL) and python3 yourself, then run this again." >&2
    exit 1
  fi
}

install_rabbitmq() {
  if ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && ! have rabbitmq-server; then
    if have apt-get; then echo "==> installing rabbitmq-server"; apt_install rabbitmq-server
    elif have brew; then brew install rabbitmq
    else echo "Install RabbitMQ yourself, then run this again." >&2; exit 1; fi
  fi
}

setup_venv() {
  local stamp=.venv/.requirements
  [ -x .venv/bin/python ] || python3 -m venv .venv
  if ! cmp -s requirements.txt "$stamp"; then
    echo "==> installing Python packages into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
    cp requirements.txt "$stamp"
  fi
}

db_admin() {   # run SQL as the server's administrator (socket authentication)
  if [ "$(id -u)" = 0 ]; then mariadb -uroot "$@"
  elif mariadb "$@" 2>/dev/null </dev/null; then mariadb "$@"
  else sudo mariadb -uroot "$@"; fi
}

start_database() {
  local host=${SAGA_DB_HOST:-127.0.0.1} port=${SAGA_DB_PORT:-3306}
  if ! mariadb-admin ping -h"$host" -P"$port" --silent 2>/dev/null; then
    echo "==> starting the MariaDB server"
    if have brew; then brew services start mariadb
    elif have service; then as_root service mariadb start || as_root service mysql start
    else as_root mysqld_safe >/dev/null 2>&1 & fi
    for _ in $(seq 60); do
      mariadb-admin ping -h"$host" -P"$port" --silent 2>/dev/null && break; sleep 0.5
    done
  fi
}

check_server_version() {   # the engine needs FOR UPDATE SKIP LOCKED: stop here if it cannot have it
  .venv/bin/python - <<'PY'
import sys
from saga.common import Database, UnsupportedServer, load_settings
try:
    Database(load_settings(), 1).check_server()
except UnsupportedServer as exc:
    sys.exit(f"run.sh: {exc}")
PY
}

provision_database() {
  local name=${SAGA_DB_NAME:-saga_db} user=${SAGA_DB_USER:-saga} pass=${SAGA_DB_PASSWORD:-saga}
  echo "==> creating database $name and its user $user (rights on $name only)"
  db_admin <<SQL
CREATE DATABASE IF NOT EXISTS \`$name\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS '$user'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS '$user'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON \`$name\`.* TO '$user'@'localhost';
GRANT ALL PRIVILEGES ON \`$name\`.* TO '$user'@'127.0.0.1';
SQL
  check_server_version
  .venv/bin/python tools/upgrade.py
  MYSQL_PWD="$pass" mariadb -h"${SAGA_DB_HOST:-127.0.0.1}" -P"${SAGA_DB_PORT:-3306}" \
    -u"$user" "$name" < schema.sql
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

demo_procfile() {   # the four processes, plus the brokers the demo needs that are not running
  cat Procfile
  if [ -z "${RABBITMQ_URL:-}" ] && ! port_open 5672; then
    if have brew; then brew services start rabbitmq >&2
    else echo "rabbitmq: python tools/brokers.py rabbitmq 5672 --dir .demo"; fi
  fi
  if [ "${SAGA_TRANSPORT:-http}" = kafka ] && [ -z "${KAFKA_BOOTSTRAP:-}" ] && ! port_open 9092; then
    echo "kafka: python tools/brokers.py kafka 9092 --dir .demo"
  fi
}

case "${1:-}" in
  demo)
    install_system_packages demo
    install_rabbitmq
    setup_venv
    start_database
    provision_database
    demo_procfile > .demo.Procfile
    echo "==> starting the orchestrator (:${ORCHESTRATOR_PORT:-5000}) and services A, B, C"
    echo "    try: curl -X POST localhost:5000/start -H 'Content-Type: application/json' \\"
    echo "           -d '{\"username\":\"john_doe\",\"address\":\"123 Main St\",\"payment\":\"Visa\"}'"
    echo "    and: curl -X POST localhost:5000/transfer -H 'Content-Type: application/json' -d '{\"amount\": 100}'"
    echo "    and: curl -X POST localhost:5001/register -H 'Content-Type: application/json' -d '{...the /start body...}'"
    echo "    monitor: http://127.0.0.1:${ORCHESTRATOR_PORT:-5000}/"
    PATH="$PWD/.venv/bin:$PATH" exec .venv/bin/honcho -f .demo.Procfile start
    ;;
  upgrade)
    install_system_packages demo
    setup_venv
    start_database
    provision_database
    ;;
  broker)
    [ $# -eq 3 ] && [ "$2" = kafka -o "$2" = rabbitmq ] || { echo "usage: $0 broker kafka|rabbitmq PORT" >&2; exit 2; }
    [ "$2" = rabbitmq ] && install_rabbitmq
    setup_venv
    exec .venv/bin/python tools/brokers.py "$2" "$3"
    ;;
  cluster)
    shift
    install_system_packages cluster
    install_rabbitmq
    setup_venv
    echo "==> starting the cluster under .cluster/ (Ctrl-C stops it all)"
    exec .venv/bin/python tools/cluster.py up "$@"
    ;;
  test)
    shift
    install_system_packages test
    setup_venv
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: $0 demo | test [pytest args] | upgrade | broker kafka|rabbitmq PORT | cluster" >&2
    exit 2
    ;;
esac
