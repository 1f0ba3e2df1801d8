-- pgbench ceiling for POST /orders: the statements the API issues for a first create.
\set t random(1000, 1015)
\set k random(1, 9223372036854775806)
BEGIN;
INSERT INTO idempotency_keys (tenant_id, key, request_hash, status_code, response_json, created_at) VALUES (:t, :k, '44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a', 201, '{"id": "b964c070-775c-447a-aa01-9a7068351b01", "tenantId": "1000", "status": "draft", "version": 1, "createdAt": "2026-11-27T10:14:54.804761Z"}', now()) ON CONFLICT (tenant_id, key) DO NOTHING RETURNING idempotency_keys.tenant_id;
INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at) VALUES (gen_random_uuid(), :t, 'draft', 1, NULL, now(), now());
COMMIT;
