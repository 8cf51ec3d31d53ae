-- strata change capture: the trigger function shared by every captured table.
--
-- Installed by strata_sql::install_change_capture(), or put it in your own
-- migrations (strata_sql::CHANGE_CAPTURE_FUNCTION_SQL holds this file, and
-- strata_sql::change_capture_trigger_sql() writes the per-table triggers).
--
-- Trigger arguments: TG_ARGV[0] = key column, TG_ARGV[1] = version column ('' for none).
-- Each changed row sends, on commit, on channel 'strata_changes':
--   {"schema": "...", "table": "...", "op": "INSERT|UPDATE|DELETE", "key": "<text>", "version": "<text>|null"}
-- An UPDATE that changes the key also sends the old key (op UPDATE). TRUNCATE sends
-- one notification without a key: the listener invalidates the whole cache.
CREATE OR REPLACE FUNCTION strata_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $strata$
DECLARE
    key_col     text := TG_ARGV[0];
    version_col text := NULLIF(TG_ARGV[1], '');
    old_row     jsonb;
    new_row     jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('strata_changes', json_build_object(
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP)::text);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_row := to_jsonb(OLD);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_row := to_jsonb(NEW);
        PERFORM pg_notify('strata_changes', json_build_object(
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
            'key', new_row ->> key_col,
            'version', CASE WHEN version_col IS NULL THEN NULL ELSE new_row ->> version_col END)::text);
    END IF;
    IF old_row IS NOT NULL AND (new_row IS NULL OR (old_row -> key_col) IS DISTINCT FROM (new_row -> key_col)) THEN
        PERFORM pg_notify('strata_changes', json_build_object(
            'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'op', TG_OP,
            'key', old_row ->> key_col,
            'version', CASE WHEN version_col IS NULL THEN NULL ELSE old_row ->> version_col END)::text);
    END IF;
    RETURN NULL;
END
$strata$;
