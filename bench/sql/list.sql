-- pgbench ceiling for GET /orders (first page, limit 10): the statement the API issues.
SELECT orders.id, orders.tenant_id, orders.status, orders.version, orders.total_cents, orders.created_at, orders.updated_at FROM orders WHERE orders.tenant_id = :tenant ORDER BY orders.created_at DESC, orders.id DESC LIMIT 11;
