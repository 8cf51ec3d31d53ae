-- strata change capture: a transactional outbox, the trigger function that writes it,
-- and a wake-up notification. Idempotent.
--
-- Installed by strata_sql::install_change_capture(), or put it in your own
-- migrations (strata_sql::CHANGE_CAPTURE_FUNCTION_SQL holds this file, and
-- strata_sql::change_capture_trigger_sql() writes the per-table triggers). Run it as
-- the role that is to own the outbox (the listener reads it as that role, or as a
-- role granted SELECT, DELETE on strata_change_outbox and SELECT, UPDATE on
-- strata_change_outbox_horizon). It is created in the current schema.
--
-- Trigger arguments: TG_ARGV[0] = key column, TG_ARGV[1] = version column ('' for none).
-- Each changed row writes one outbox row (schema, table, op, key as text, version as
-- text), in the writing transaction: it exists exactly when the change committed. An
-- UPDATE that changes the key also writes the old key. TRUNCATE writes one row
-- without a key (the listener invalidates the whole cache). The transaction then
-- notifies channel 'strata_changes' with its transaction id: a wake-up, which carries
-- no invalidation (Postgres sends one per transaction: identical payloads merge).
--
-- Only the owner may write the outbox; the function runs as its owner (SECURITY
-- DEFINER), so writers need no right on the outbox, and no one but the owner may use
-- the function in a trigger of their own (EXECUTE revoked from PUBLIC).
CREATE TABLE IF NOT EXISTS strata_change_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    op          text NOT NULL,
    key         text,
    version     text
);
CREATE INDEX IF NOT EXISTS strata_change_outbox_tx ON strata_change_outbox (tx);
-- Outbox rows with tx below pruned_below may have been deleted: a listener that has
-- not read every change committed before that must flush its caches instead.
CREATE TABLE IF NOT EXISTS strata_change_outbox_horizon (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_below xid8 NOT NULL
);
INSERT INTO strata_change_outbox_horizon (pruned_below) VALUES ('0') ON CONFLICT DO NOTHING;
REVOKE ALL ON strata_change_outbox, strata_change_outbox_horizon FROM PUBLIC;

CREATE OR REPLACE FUNCTION strata_notify_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $strata$
DECLARE
    key_col     text := TG_ARGV[0];
    version_col text := NULLIF(TG_ARGV[1], '');
    old_row     jsonb;
    new_row     jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO strata_change_outbox (schema_name, table_name, op)
        VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP);
    ELSE
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            old_row := to_jsonb(OLD);
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') THEN
            new_row := to_jsonb(NEW);
            INSERT INTO strata_change_outbox (schema_name, table_name, op, key, version)
            VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, new_row ->> key_col,
                    CASE WHEN version_col IS NULL THEN NULL ELSE new_row ->> version_col END);
        END IF;
        IF old_row IS NOT NULL AND (new_row IS NULL OR (old_row -> key_col) IS DISTINCT FROM (new_row -> key_col)) THEN
            INSERT INTO strata_change_outbox (schema_name, table_name, op, key, version)
            VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, old_row ->> key_col,
                    CASE WHEN version_col IS NULL THEN NULL ELSE old_row ->> version_col END);
        END IF;
    END IF;
    PERFORM pg_notify('strata_changes', pg_current_xact_id()::text);
    RETURN NULL;
END
$strata$;
REVOKE ALL ON FUNCTION strata_notify_change() FROM PUBLIC;
-- A SECURITY DEFINER function must not resolve names through the caller's search
-- path: pin it to the schema the outbox was just created in (temporary objects last).
DO $strata$
BEGIN
    EXECUTE format('ALTER FUNCTION strata_notify_change() SET search_path = %I, pg_temp', current_schema());
END
$strata$;
