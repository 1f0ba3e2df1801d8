"""Chaos topology for orders-api: PostgreSQL failover, PgBouncer, NATS cluster, HAProxy."""
