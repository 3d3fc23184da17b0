"""The PostgreSQL outbox schema and its migrations, tracked in a version table.

Everything lives in the `caliper_sidecar` schema of the configured database. Migrations run
under an advisory lock, so that replicas starting at once migrate once; each entry moves the
schema one version up and is never edited once released.

Running totals (what `/v1/status` and the capacity check read) are kept by statement-level
triggers, as SQLite's are, but spread over `TOTAL_SHARDS` rows picked at random: one counter
row shared by every replica would serialize all of their ingest on its row lock. The trigger
functions carry their own search_path, so a statement from any session (an operator's psql, a
bulk COPY) keeps the totals right.
"""

from __future__ import annotations

from typing import Final

SCHEMA: Final = "caliper_sidecar"
TOTAL_SHARDS: Final = 16
#: pg_advisory_xact_lock key for migrations ("calipers" in ASCII)
MIGRATION_LOCK: Final = 0x63616C6970657273
#: … and for replicas joining ("replicas")
REPLICAS_LOCK: Final = 0x7265706C69636173
#: the room kept for the drain, in rows of the reserve table (36 bytes on disk each: 2 MiB)
RESERVE_ROWS: Final = 58_000

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the queue, dead letters, app jobs, platform jobs, sharded totals and their triggers.
    f"""
    CREATE TABLE events (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        body bytea NOT NULL,
        size integer NOT NULL,
        received_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        first_attempt_at double precision,
        last_attempt_at double precision,
        last_error text,
        delivered_at double precision,
        claimed_by text,
        claim_until double precision,
        platform_job text,
        platform_id text,
        confirmed_at double precision
    );
    CREATE INDEX events_waiting ON events (seq) WHERE delivered_at IS NULL;
    CREATE INDEX events_delivered ON events (delivered_at) WHERE delivered_at IS NOT NULL;
    CREATE INDEX events_by_platform_job ON events (platform_job) WHERE platform_job IS NOT NULL;
    CREATE TABLE dead_letters (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        body bytea NOT NULL,
        received_at double precision NOT NULL,
        reason text NOT NULL,
        status integer,
        response text NOT NULL DEFAULT '',
        attempts integer NOT NULL,
        first_attempt_at double precision,
        last_attempt_at double precision,
        dead_lettered_at double precision NOT NULL
    );
    CREATE TABLE platform_jobs (
        id text PRIMARY KEY,
        sent_at double precision NOT NULL,
        state text NOT NULL,
        polls integer NOT NULL DEFAULT 0,
        last_error text
    );
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        created_at double precision NOT NULL,
        event_ids text NOT NULL
    );
    CREATE INDEX jobs_by_time ON jobs (created_at);
    CREATE TABLE totals (
        shard integer PRIMARY KEY,
        events bigint NOT NULL DEFAULT 0,
        bytes bigint NOT NULL DEFAULT 0,
        dead_letters bigint NOT NULL DEFAULT 0,
        delivered_total bigint NOT NULL DEFAULT 0,
        dead_lettered_total bigint NOT NULL DEFAULT 0
    );
    INSERT INTO totals (shard) SELECT generate_series(0, {TOTAL_SHARDS - 1});

    CREATE FUNCTION count_change(
        d_events bigint, d_bytes bigint, d_dead bigint, d_delivered bigint, d_dead_total bigint
    ) RETURNS void LANGUAGE sql SET search_path = {SCHEMA} AS $$
        -- One shard, drawn once (random() in the WHERE would be drawn again for every row).
        WITH pick AS (SELECT floor(random() * {TOTAL_SHARDS})::integer AS shard)
        UPDATE totals SET events = events + d_events, bytes = bytes + d_bytes,
            dead_letters = dead_letters + d_dead, delivered_total = delivered_total + d_delivered,
            dead_lettered_total = dead_lettered_total + d_dead_total
        FROM pick WHERE totals.shard = pick.shard
    $$;
    CREATE FUNCTION events_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(count(*), coalesce(sum(size), 0), 0, 0, 0)
            FROM new_rows WHERE delivered_at IS NULL HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION events_updated() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        -- waiting -> delivered leaves the queue; delivered -> waiting (sent again) rejoins it
        PERFORM count_change(
                sum(CASE WHEN o.delivered_at IS NULL THEN -1 ELSE 1 END),
                sum(CASE WHEN o.delivered_at IS NULL THEN -o.size ELSE n.size END),
                0, sum(CASE WHEN o.delivered_at IS NULL THEN 1 ELSE -1 END), 0)
            FROM old_rows o JOIN new_rows n USING (seq)
            WHERE (o.delivered_at IS NULL) <> (n.delivered_at IS NULL) HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION events_deleted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(-count(*), -coalesce(sum(size), 0), 0, 0, 0)
            FROM old_rows WHERE delivered_at IS NULL HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION dead_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(0, 0, count(*), 0, count(*)) FROM new_rows HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE FUNCTION dead_deleted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(0, 0, -count(*), 0, 0) FROM old_rows HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE TRIGGER events_in AFTER INSERT ON events REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION events_inserted();
    CREATE TRIGGER events_changed AFTER UPDATE ON events
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION events_updated();
    CREATE TRIGGER events_out AFTER DELETE ON events REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION events_deleted();
    CREATE TRIGGER dead_in AFTER INSERT ON dead_letters REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION dead_inserted();
    CREATE TRIGGER dead_out AFTER DELETE ON dead_letters REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION dead_deleted();
    """,
    # 2: what the platform's answers and the apps' envelopes say (as SQLite's version 4):
    # why an accepted event can never be confirmed, and the sensor of the app's envelope.
    """
    ALTER TABLE events ADD COLUMN unconfirmed text;
    ALTER TABLE events ADD COLUMN sensor text;
    ALTER TABLE dead_letters ADD COLUMN sensor text;
    ALTER TABLE events ADD COLUMN sender text;
    ALTER TABLE dead_letters ADD COLUMN sender text;
    -- Following a platform job is a lease, like a claim: any live replica adopts the jobs of
    -- one that stopped or died. And the live replicas, with what they must agree on.
    ALTER TABLE platform_jobs ADD COLUMN followed_by text;
    ALTER TABLE platform_jobs ADD COLUMN follow_until double precision;
    CREATE TABLE replicas (
        id text PRIMARY KEY,
        settings text NOT NULL,
        seen_until double precision NOT NULL
    );
    """,
    # 3: a drain that writes no new row versions beside the ones it frees, so that a database
    # whose disk filled keeps draining. The queue of waiting events moves to a table of its own
    # (seq and claim only): claiming updates its small rows in place (HOT: no index covers the
    # claim columns, and fillfactor leaves room on each page), and an acknowledgement deletes
    # the queue row and updates the event in place, which no index covers any more either
    # (the partial indexes on delivered_at and platform_job made every such update write a new
    # version of the row and of every index entry elsewhere). A platform job lists its events.
    f"""
    CREATE TABLE queue (
        seq bigint PRIMARY KEY,
        claimed_by text,
        claim_until double precision
    ) WITH (fillfactor = 50);
    INSERT INTO queue (seq, claimed_by, claim_until)
        SELECT seq, claimed_by, claim_until FROM events WHERE delivered_at IS NULL;
    ALTER TABLE events DROP COLUMN claimed_by, DROP COLUMN claim_until;
    ALTER TABLE platform_jobs ADD COLUMN seqs bigint[] NOT NULL DEFAULT '{{}}';
    UPDATE platform_jobs p SET seqs = coalesce(
        (SELECT array_agg(seq ORDER BY seq) FROM events e WHERE e.platform_job = p.id), '{{}}');
    DROP INDEX events_waiting;
    DROP INDEX events_delivered;
    DROP INDEX events_by_platform_job;
    ALTER TABLE events SET (fillfactor = 70);
    -- Room kept for the drain on the tables' own disk: ingest refills it before storing
    -- events, a drain write that finds the disk full empties it and goes on (see
    -- PostgresOutbox). Rows of one bigint: no TOAST table and no index, so that TRUNCATE
    -- gives the space back to the file system without writing a page.
    CREATE TABLE reserve (filler bigint NOT NULL);
    -- One shard of the totals per transaction, not per statement: a transaction of several
    -- statements (the acknowledgements of concurrent deliveries, committed together) would
    -- otherwise lock several shards in random order, and two such transactions deadlock.
    CREATE OR REPLACE FUNCTION count_change(
        d_events bigint, d_bytes bigint, d_dead bigint, d_delivered bigint, d_dead_total bigint
    ) RETURNS void LANGUAGE sql SET search_path = {SCHEMA} AS $$
        WITH pick AS (SELECT (txid_current() % {TOTAL_SHARDS})::integer AS shard)
        UPDATE totals SET events = events + d_events, bytes = bytes + d_bytes,
            dead_letters = dead_letters + d_dead, delivered_total = delivered_total + d_delivered,
            dead_lettered_total = dead_lettered_total + d_dead_total
        FROM pick WHERE totals.shard = pick.shard
    $$;
    """,
)

VERSION: Final = len(MIGRATIONS)
