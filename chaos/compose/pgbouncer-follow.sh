#!/bin/sh
# Keeps PgBouncer pointed at the PostgreSQL primary (docker-compose.yml, service
# pgbouncer-follow). Every second it asks the pg_auto_failover monitor which node is primary;
# when that changes it rewrites PgBouncer's [databases] entry ($DATABASES_INI, included by
# pgbouncer.ini) and sends RELOAD on PgBouncer's admin console, which closes the server
# connections to the old node. A RELOAD that fails (PgBouncer not up yet) is tried again.
#   MONITOR_URL          postgresql://autoctl_node@monitor:5432/pg_auto_failover?sslmode=require
#   PGBOUNCER_ADMIN_URL  postgresql://postgres@pgbouncer:6432/pgbouncer
#   DATABASES_INI        /etc/pgbouncer/primary/databases.ini
#   DBNAME               orders
set -u
written=""
reloaded=""
while true; do
  primary=$(psql "$MONITOR_URL" -XAt -F ' ' -c \
    "SELECT primary_host, primary_port FROM pgautofailover.get_primary('default', 0)" 2>/dev/null)
  if [ -n "$primary" ] && [ "$primary" != "$written" ]; then
    set -- $primary
    printf '[databases]\n%s = host=%s port=%s dbname=%s\n' "$DBNAME" "$1" "$2" "$DBNAME" \
      > "$DATABASES_INI.tmp" && mv "$DATABASES_INI.tmp" "$DATABASES_INI"
    written="$primary"
    echo "pgbouncer-follow: primary is $1:$2"
  fi
  if [ -n "$written" ] && [ "$written" != "$reloaded" ]; then
    if psql "$PGBOUNCER_ADMIN_URL" -XAtq -c RELOAD >/dev/null 2>&1; then
      reloaded="$written"
      echo "pgbouncer-follow: PgBouncer reloaded"
    fi
  fi
  sleep 1
done
