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
#: … and for ingest (and replays): one at a time, so that events commit in seq order
INGEST_LOCK: Final = 0x696E676573742121
#: the seqs whose bodies one partition of `bodies` holds (fixed: partitions are named by it)
BODIES_SPAN: Final = 16_384
#: a destination's waiting events after its head are counted one by one up to this many
EXACT_UP_TO: Final = 100
#: … and for lowering a destination's position ("positio!": a dead letter replayed to it),
#: which whatever deletes rows or bodies below the lowest position takes shared
POSITIONS_LOCK: Final = 0x706F736974696F21


def _on_leases(statements: str) -> str:
    """plpgsql statements run on the leases of the queue `p_destination` names: [upstream]'s
    (`batches`) when it is NULL, else that destination's rows of `destination_batches`. One
    text for both, so that a destination's leases work exactly as [upstream]'s: `{leases}`
    names the table, `{mine}` is a condition on its rows of this queue, and `{key}` and
    `{key_value}` add the destination column to an INSERT. (Part of migration 5's text: never
    change it once released.)"""
    upstream = {"{leases}": "batches", "{mine}": "true", "{key}": "", "{key_value}": ""}
    theirs = {
        "{leases}": "destination_batches",
        "{mine}": "destination = p_destination",
        "{key}": "destination, ",
        "{key_value}": "p_destination, ",
    }
    return f"""IF p_destination IS NULL THEN
            {_fill(statements, upstream)}
        ELSE
            {_fill(statements, theirs)}
        END IF;"""


def _fill(text: str, marks: dict[str, str]) -> str:
    for mark, value in marks.items():
        text = text.replace(mark, value)
    return text


# Migration 5's statements on leases, each run on [upstream]'s or a destination's.

#: take_from_claim's work: these seqs out of the claim's lease rows
_TAKE_FROM_LEASES: Final = _on_leases(
    """
        FOR b IN SELECT id, seqs FROM {leases} WHERE claimed_by = p_claim FOR UPDATE LOOP
            kept := ARRAY(SELECT s FROM unnest(b.seqs) s WHERE s <> ALL(p_seqs) ORDER BY s);
            taken := taken || ARRAY(SELECT s FROM unnest(b.seqs) s WHERE s = ANY(p_seqs));
            IF cardinality(kept) = 0 THEN
                DELETE FROM {leases} WHERE id = b.id;
            ELSIF cardinality(kept) < cardinality(b.seqs) THEN
                UPDATE {leases} SET seqs = kept, lo = kept[1] WHERE id = b.id;
            END IF;
        END LOOP;"""
)
#: claim_head's look for events given back (released, failed, or whose lease expired)
_GIVEN_BACK_WAITS: Final = _on_leases(
    """
        given_back := p_given_back_first AND (
            EXISTS (SELECT 1 FROM {leases} WHERE {mine} AND claimed_by IS NULL)
            OR EXISTS (SELECT 1 FROM {leases} WHERE {mine} AND claim_until < t));"""
)
#: claim_head's leases: on the events claimed, and on those of another sensor passed over
_LEASE_CLAIMED: Final = _on_leases(
    """
        IF cardinality(passed) > 0 THEN
            INSERT INTO {leases} ({key}lo, seqs) VALUES ({key_value}passed[1], passed);
        END IF;
        INSERT INTO {leases} ({key}lo, seqs, claimed_by, claim_until)
            VALUES ({key_value}seqs[1], seqs, p_claim, claim_until);"""
)
#: give_back's lease, given back: no claim, no expiry
_LEASE_GIVEN_BACK: Final = _on_leases(
    """
            INSERT INTO {leases} ({key}lo, seqs) VALUES ({key_value}taken[1], taken);"""
)

#: the session setting a replica that reconciles (reconcile.after_s) connects with
RECONCILING_SETTING: Final = "caliper_sidecar.reconciling"
#: true in such a session
RECONCILING: Final = f"coalesce(current_setting('{RECONCILING_SETTING}', true), '') = 'on'"

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
    -- PostgresStorage). Rows of one bigint: no TOAST table and no index, so that TRUNCATE
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
    # 4: a drain that leaves (almost) no dead row versions: events are written once. PgQ's
    # design, fitted to leases and the dedupe window. Ingest commits one group at a time
    # (INGEST_LOCK), so events become visible in seq order and a cursor, `head`, says which were
    # never claimed: a claim takes the next events from it and writes one `batches` row (a
    # lease on their seqs); an acknowledgement deletes that row and writes one `sent` row.
    # Per-event rows change only when something goes wrong (a failed attempt). Bodies live in
    # `bodies`, partitioned by seq range, and a partition is dropped whole once nothing in it
    # waits (no dead tuples, and its space goes back to the file system at once); the events'
    # other columns stay, for the dedupe window and the journeys, until pruned.
    f"""
    CREATE TABLE head (next bigint NOT NULL);
    INSERT INTO head SELECT coalesce(max(seq), 0) + 1 FROM events;
    -- Claimed events (claimed_by set) and events given back to be claimed again (NULL);
    -- lo is the least of seqs, which are kept sorted.
    CREATE TABLE batches (
        id bigserial PRIMARY KEY,
        lo bigint NOT NULL,
        seqs bigint[] NOT NULL,
        claimed_by text,
        claim_until double precision
    );
    -- Looked up by claim (outcomes) and by lease (expired ones are taken over): without
    -- these, every lookup walked the table's dead versions, as many as batches in a drain.
    CREATE INDEX batches_by_claim ON batches (claimed_by);
    CREATE INDEX batches_by_lease ON batches (claim_until);
    INSERT INTO batches (lo, seqs)
        SELECT min(seq), array_agg(seq ORDER BY seq) FROM (
            SELECT seq, (row_number() OVER (ORDER BY seq) - 1) / 100 AS chunk FROM queue
        ) q GROUP BY chunk;
    -- Events delivered together, until pruned; span covers seqs, for the GiST index.
    CREATE TABLE sent (
        id bigserial PRIMARY KEY,
        span int8range NOT NULL,
        seqs bigint[] NOT NULL,
        delivered_at double precision NOT NULL,
        platform_job text,
        unconfirmed text,
        confirmed_at double precision,
        platform_ids jsonb
    );
    INSERT INTO sent (span, seqs, delivered_at, platform_job, unconfirmed, confirmed_at,
            platform_ids)
        SELECT int8range(min(seq), max(seq), '[]'), array_agg(seq ORDER BY seq), delivered_at,
            platform_job, unconfirmed, confirmed_at,
            jsonb_object_agg(seq::text, platform_id) FILTER (WHERE platform_id IS NOT NULL)
        FROM events WHERE delivered_at IS NOT NULL
        GROUP BY delivered_at, platform_job, unconfirmed, confirmed_at;
    CREATE INDEX sent_span ON sent USING gist (span);
    CREATE INDEX sent_by_time ON sent (delivered_at);
    CREATE INDEX sent_by_platform_job ON sent (platform_job) WHERE platform_job IS NOT NULL;
    -- The successful attempt is the sent row's now.
    UPDATE events SET attempts = greatest(attempts - 1, 0) WHERE delivered_at IS NOT NULL;

    CREATE TABLE bodies (seq bigint PRIMARY KEY, body bytea NOT NULL) PARTITION BY RANGE (seq);
    DO $$ DECLARE part bigint; BEGIN
        FOR part IN SELECT DISTINCT seq / {BODIES_SPAN} FROM events WHERE body <> '' LOOP
            EXECUTE format('CREATE TABLE bodies_%s PARTITION OF bodies FOR VALUES '
                'FROM (%s) TO (%s)', part, part * {BODIES_SPAN}, (part + 1) * {BODIES_SPAN});
        END LOOP;
    END $$;
    INSERT INTO bodies (seq, body) SELECT seq, body FROM events WHERE body <> '';

    DROP TRIGGER events_changed ON events;
    DROP FUNCTION events_updated();
    DROP TABLE queue;
    ALTER TABLE events DROP COLUMN body, DROP COLUMN delivered_at, DROP COLUMN platform_job,
        DROP COLUMN platform_id, DROP COLUMN confirmed_at, DROP COLUMN unconfirmed;
    ALTER TABLE events SET (fillfactor = 100);
    ALTER TABLE platform_jobs DROP COLUMN seqs;

    -- An event stored waits; one deleted stopped waiting unless a sent row holds it
    -- (delivered, pruned); deliveries count themselves (see writes.py).
    CREATE OR REPLACE FUNCTION events_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(count(*), coalesce(sum(size), 0), 0, 0, 0)
            FROM new_rows HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION events_deleted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(-count(*), -coalesce(sum(size), 0), 0, 0, 0)
            FROM old_rows o WHERE NOT EXISTS (
                SELECT 1 FROM sent s WHERE s.span @> o.seq AND o.seq = ANY(s.seqs))
            HAVING count(*) > 0;
        RETURN NULL;
    END $$;

    -- Take these seqs out of the claim's batch rows (the outcome of a lease: what another
    -- replica took over after it expired is not there any more); the seqs taken, sorted.
    CREATE FUNCTION take_from_claim(p_claim text, p_seqs bigint[]) RETURNS bigint[]
        LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        b record;
        taken bigint[] := '{{}}';
        kept bigint[];
    BEGIN
        FOR b IN SELECT id, seqs FROM batches WHERE claimed_by = p_claim FOR UPDATE LOOP
            kept := ARRAY(SELECT s FROM unnest(b.seqs) s WHERE s <> ALL(p_seqs) ORDER BY s);
            taken := taken || ARRAY(SELECT s FROM unnest(b.seqs) s WHERE s = ANY(p_seqs));
            IF cardinality(kept) = 0 THEN
                DELETE FROM batches WHERE id = b.id;
            ELSIF cardinality(kept) < cardinality(b.seqs) THEN
                UPDATE batches SET seqs = kept, lo = kept[1] WHERE id = b.id;
            END IF;
        END LOOP;
        RETURN ARRAY(SELECT s FROM unnest(taken) s ORDER BY s);
    END $$;
    -- Claim the next events from the head, in one statement: claims take turns at the head
    -- (FOR UPDATE: a short wait, never a skip), so it is held for no round trip. Which events
    -- go is outbox/batching.py's fill_batch, over sizes instead of bodies: the oldest, of the
    -- oldest one's sensor, within both limits (at least one); others of another sensor passed
    -- over on the way are given back. None while no full batch waits and the oldest has
    -- lingered less than p_linger: ready_in says how long until it has. None either when
    -- events given back wait and p_given_back_first (given_back): they go first.
    CREATE FUNCTION claim_head(
        p_claim text, p_max_events integer, p_max_bytes bigint, p_linger double precision,
        p_lease double precision, p_given_back_first boolean,
        OUT seqs bigint[], OUT full_batch boolean, OUT claim_until double precision,
        OUT ready_in double precision, OUT given_back boolean
    ) LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    #variable_conflict use_column
    DECLARE
        t double precision := extract(epoch from clock_timestamp());
        at_head bigint;
        c record;
        n integer := 0;
        all_bytes bigint := -1;
        used bigint := 0;
        sensor text;
        oldest double precision;
        passed bigint[] := '{{}}';
        other_sensor boolean := false;
    BEGIN
        -- A claim lost in a database crash costs nothing: no WAL flush to wait for.
        PERFORM set_config('synchronous_commit', 'off', true);
        seqs := '{{}}';
        full_batch := false;
        given_back := p_given_back_first AND (
            EXISTS (SELECT 1 FROM batches WHERE claimed_by IS NULL)
            OR EXISTS (SELECT 1 FROM batches WHERE claim_until < t));
        IF given_back THEN
            RETURN;
        END IF;
        SELECT next INTO at_head FROM head FOR UPDATE;
        FOR c IN SELECT e.seq, e.size, e.sensor, e.received_at FROM events e
                WHERE e.seq >= at_head ORDER BY e.seq LIMIT p_max_events LOOP
            n := n + 1;
            all_bytes := all_bytes + c.size + 1;
            IF n = 1 THEN
                sensor := c.sensor;
                oldest := c.received_at;
            END IF;
            IF full_batch THEN
                CONTINUE;
            ELSIF c.sensor IS DISTINCT FROM sensor THEN
                other_sensor := true;
                passed := passed || c.seq;
            ELSIF cardinality(seqs) > 0 AND used + c.size + 1 > p_max_bytes THEN
                full_batch := true;
            ELSE
                used := used + c.size + (CASE WHEN cardinality(seqs) > 0 THEN 1 ELSE 0 END);
                seqs := seqs || c.seq;
            END IF;
        END LOOP;
        IF n = 0 THEN
            RETURN;
        END IF;
        IF n < p_max_events AND all_bytes <= p_max_bytes AND t - oldest < p_linger THEN
            seqs := '{{}}';
            ready_in := p_linger - (t - oldest);
            RETURN;
        END IF;
        full_batch := full_batch OR other_sensor OR n >= p_max_events;
        passed := ARRAY(SELECT s FROM unnest(passed) s WHERE s < seqs[cardinality(seqs)]);
        UPDATE head SET next = seqs[cardinality(seqs)] + 1;
        IF cardinality(passed) > 0 THEN
            INSERT INTO batches (lo, seqs) VALUES (passed[1], passed);
        END IF;
        claim_until := t + p_lease;
        INSERT INTO batches (lo, seqs, claimed_by, claim_until)
            VALUES (seqs[1], seqs, p_claim, claim_until);
    END $$;
    -- The acknowledgements of concurrent deliveries, in one statement (one round trip and
    -- one WAL flush for the group): the i-th is claim p_claims[i] with the seqs whose
    -- p_owners entry is i, sent in platform job p_jobs[i] (NULL: none). Each is one sent row,
    -- of what is still under its claim (what another replica took over after the lease
    -- expired is left alone); a platform job is followed by p_follower for a lease. How many
    -- events each recorded.
    CREATE FUNCTION acknowledge(
        p_claims text[], p_seqs bigint[], p_owners integer[], p_jobs text[],
        p_unconfirmed text[], p_follower text, p_lease double precision
    ) RETURNS integer[] LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        t double precision := extract(epoch from clock_timestamp());
        done bigint[];
        recorded integer[] := '{{}}';
        n_events bigint := 0;
        n_bytes bigint := 0;
    BEGIN
        FOR i IN 1 .. coalesce(cardinality(p_claims), 0) LOOP
            done := take_from_claim(p_claims[i], ARRAY(
                SELECT s FROM unnest(p_seqs, p_owners) AS u(s, owner) WHERE owner = i));
            recorded := recorded || cardinality(done);
            CONTINUE WHEN cardinality(done) = 0;
            INSERT INTO sent (span, seqs, delivered_at, platform_job, unconfirmed)
                VALUES (int8range(done[1], done[cardinality(done)], '[]'), done, t, p_jobs[i],
                    p_unconfirmed[i]);
            n_events := n_events + cardinality(done);
            n_bytes := n_bytes + (SELECT sum(size) FROM events WHERE seq = ANY(done));
            IF p_jobs[i] IS NOT NULL THEN
                INSERT INTO platform_jobs (id, sent_at, state, followed_by, follow_until)
                    VALUES (p_jobs[i], t, 'waiting', p_follower, t + p_lease)
                    ON CONFLICT (id) DO NOTHING;
            END IF;
        END LOOP;
        IF n_events > 0 THEN
            PERFORM count_change(-n_events, -n_bytes, 0, n_events, 0);
        END IF;
        RETURN recorded;
    END $$;
    -- Give seqs of a claim back, to be claimed again; with an error, as a failed attempt.
    CREATE FUNCTION give_back(p_claim text, p_seqs bigint[], p_error text)
        RETURNS integer LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        taken bigint[] := take_from_claim(p_claim, p_seqs);
        t double precision := extract(epoch from clock_timestamp());
    BEGIN
        IF cardinality(taken) > 0 THEN
            INSERT INTO batches (lo, seqs) VALUES (taken[1], taken);
        END IF;
        IF p_error IS NOT NULL THEN
            UPDATE events SET attempts = attempts + 1,
                first_attempt_at = coalesce(first_attempt_at, t), last_attempt_at = t,
                last_error = p_error
            WHERE seq = ANY(taken);
        END IF;
        RETURN cardinality(taken);
    END $$;
    """,
    # 5: [[destinations]]: every event goes to [upstream] and to each destination, each with
    # its own place in the queue, written as little per event as [upstream]'s: a destination
    # has a head (`next`, the lowest seq it never claimed) and leases on seq arrays in
    # `destination_batches`, exactly as `head` and `batches` are for [upstream] (the same
    # functions run on either), and rows in `destination_attempts` only for events that
    # failed there. Its position, below which everything is delivered or dead-lettered
    # there, is the least of its head and its leases' lo. Bodies and rows stay until the
    # lowest position has passed them (bodies.py's horizon, pruning): an event [upstream]
    # dead-letters stays, `upstream_dead`, while a destination needs it. `only_for` names
    # the one queue a row was stored for (a dead letter replayed after its row was gone);
    # every other queue passes it over. Dead letters name their destination.
    f"""
    ALTER TABLE events ADD COLUMN only_for text, ADD COLUMN upstream_dead boolean;
    CREATE INDEX events_upstream_dead ON events (seq) WHERE upstream_dead;
    ALTER TABLE dead_letters ADD COLUMN destination text NOT NULL DEFAULT 'upstream';
    ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_id_key,
        ADD CONSTRAINT dead_letters_id_destination UNIQUE (id, destination);
    CREATE INDEX dead_letters_by_destination ON dead_letters (destination, seq);

    CREATE TABLE destinations (
        name text PRIMARY KEY,
        next bigint NOT NULL,
        blocks boolean NOT NULL DEFAULT true,
        delivered_total bigint NOT NULL DEFAULT 0,
        dead_lettered_total bigint NOT NULL DEFAULT 0,
        dead_letters bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE destination_batches (
        id bigserial PRIMARY KEY,
        destination text NOT NULL,
        lo bigint NOT NULL,
        seqs bigint[] NOT NULL,
        claimed_by text,
        claim_until double precision
    );
    CREATE INDEX destination_batches_by_claim ON destination_batches (claimed_by);
    CREATE INDEX destination_batches_by_lease ON destination_batches (destination, claim_until);
    CREATE INDEX destination_batches_by_lo ON destination_batches (destination, lo);
    CREATE TABLE destination_attempts (
        destination text NOT NULL,
        seq bigint NOT NULL,
        attempts integer NOT NULL,
        first_attempt_at double precision,
        last_attempt_at double precision,
        last_error text,
        PRIMARY KEY (destination, seq)
    );

    -- The newest seq drawn (committed or not: under INGEST_LOCK, every one drawn is).
    CREATE FUNCTION newest_seq() RETURNS bigint LANGUAGE sql STABLE
        SET search_path = {SCHEMA} AS $$
        SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM events_seq_seq
    $$;
    -- Each destination's position, and the events its leases hold.
    CREATE VIEW destination_places AS
        SELECT d.name, d.blocks, d.next, least(d.next, b.lo) AS position,
            coalesce(b.held, 0) AS held
        FROM destinations d LEFT JOIN LATERAL (
            SELECT min(lo) AS lo, sum(cardinality(seqs)) AS held FROM destination_batches
            WHERE destination = d.name
        ) b ON true;
    -- How many events wait for each destination: those its leases hold, and those after its
    -- head, counted one by one up to {EXACT_UP_TO} (so that the count comes down to 0 whatever
    -- seqs were skipped) and beyond that from seqs, which costs nothing per event: a seq
    -- there that names no row for it (drawn by an insert that did not commit, or a row stored
    -- for another queue alone) makes that an overcount until the head passes it, never an
    -- undercount.
    CREATE VIEW destination_waiting AS
        SELECT p.name, p.blocks, p.held + CASE WHEN a.near < {EXACT_UP_TO} THEN a.near
                ELSE greatest(a.near, (SELECT max(seq) FROM events) + 1 - p.next) END
                AS waiting
        FROM destination_places p CROSS JOIN LATERAL (
            SELECT count(*) AS near FROM (
                SELECT FROM events e WHERE e.seq >= p.next
                    AND (e.only_for IS NULL OR e.only_for = p.name)
                LIMIT {EXACT_UP_TO}
            ) n
        ) a;
    -- The lowest position: rows and bodies from there on are kept (NULL: no destinations).
    CREATE FUNCTION kept_from() RETURNS bigint LANGUAGE sql STABLE
        SET search_path = {SCHEMA} AS $$
        SELECT min(position) FROM destination_places
    $$;

    -- [upstream]'s totals count what waits for [upstream]: not a row stored for a
    -- destination alone, nor one [upstream] dead-lettered that destinations still need.
    CREATE OR REPLACE FUNCTION events_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(count(*), coalesce(sum(size), 0), 0, 0, 0)
            FROM new_rows WHERE only_for IS NULL OR only_for = 'upstream' HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION events_deleted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(-count(*), -coalesce(sum(size), 0), 0, 0, 0)
            FROM old_rows o
            WHERE (o.only_for IS NULL OR o.only_for = 'upstream') AND o.upstream_dead IS NOT TRUE
                AND NOT EXISTS (
                    SELECT 1 FROM sent s WHERE s.span @> o.seq AND o.seq = ANY(s.seqs))
            HAVING count(*) > 0;
        RETURN NULL;
    END $$;
    -- A destination's dead letters count on its row, never in [upstream]'s totals.
    CREATE OR REPLACE FUNCTION dead_inserted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(0, 0, count(*), 0, count(*)) FROM new_rows
            WHERE destination = 'upstream' HAVING count(*) > 0;
        UPDATE destinations d SET dead_letters = d.dead_letters + n.dead,
            dead_lettered_total = d.dead_lettered_total + n.dead
        FROM (SELECT destination, count(*) AS dead FROM new_rows
            WHERE destination <> 'upstream' GROUP BY destination) n
        WHERE d.name = n.destination;
        RETURN NULL;
    END $$;
    CREATE OR REPLACE FUNCTION dead_deleted() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        PERFORM count_change(0, 0, -count(*), 0, 0) FROM old_rows
            WHERE destination = 'upstream' HAVING count(*) > 0;
        UPDATE destinations d SET dead_letters = d.dead_letters - n.dead
        FROM (SELECT destination, count(*) AS dead FROM old_rows
            WHERE destination <> 'upstream' GROUP BY destination) n
        WHERE d.name = n.destination;
        RETURN NULL;
    END $$;

    -- Version 4's lease functions, on the leases of [upstream] (p_destination NULL, as
    -- before) or of a destination. Calls that name no destination resolve to these.
    DROP FUNCTION take_from_claim(text, bigint[]);
    CREATE FUNCTION take_from_claim(p_claim text, p_seqs bigint[], p_destination text DEFAULT NULL)
        RETURNS bigint[] LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        b record;
        taken bigint[] := '{{}}';
        kept bigint[];
    BEGIN
        {_TAKE_FROM_LEASES}
        RETURN ARRAY(SELECT s FROM unnest(taken) s ORDER BY s);
    END $$;
    DROP FUNCTION claim_head(text, integer, bigint, double precision, double precision, boolean);
    CREATE FUNCTION claim_head(
        p_claim text, p_max_events integer, p_max_bytes bigint, p_linger double precision,
        p_lease double precision, p_given_back_first boolean, p_destination text DEFAULT NULL,
        OUT seqs bigint[], OUT full_batch boolean, OUT claim_until double precision,
        OUT ready_in double precision, OUT given_back boolean
    ) LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    #variable_conflict use_column
    DECLARE
        t double precision := extract(epoch from clock_timestamp());
        queue text := coalesce(p_destination, 'upstream');
        at_head bigint;
        c record;
        n integer := 0;
        all_bytes bigint := -1;
        used bigint := 0;
        sensor text;
        oldest double precision;
        passed bigint[] := '{{}}';
        other_sensor boolean := false;
    BEGIN
        -- A claim lost in a database crash costs nothing: no WAL flush to wait for.
        PERFORM set_config('synchronous_commit', 'off', true);
        seqs := '{{}}';
        full_batch := false;
        {_GIVEN_BACK_WAITS}
        IF given_back THEN
            RETURN;
        END IF;
        IF p_destination IS NULL THEN
            SELECT next INTO at_head FROM head FOR UPDATE;
        ELSE
            SELECT next INTO at_head FROM destinations WHERE name = p_destination FOR UPDATE;
        END IF;
        -- (rows stored for another queue alone are passed over)
        FOR c IN SELECT e.seq, e.size, e.sensor, e.received_at FROM events e
                WHERE e.seq >= at_head AND (e.only_for IS NULL OR e.only_for = queue)
                ORDER BY e.seq LIMIT p_max_events LOOP
            n := n + 1;
            all_bytes := all_bytes + c.size + 1;
            IF n = 1 THEN
                sensor := c.sensor;
                oldest := c.received_at;
            END IF;
            IF full_batch THEN
                CONTINUE;
            ELSIF c.sensor IS DISTINCT FROM sensor THEN
                other_sensor := true;
                passed := passed || c.seq;
            ELSIF cardinality(seqs) > 0 AND used + c.size + 1 > p_max_bytes THEN
                full_batch := true;
            ELSE
                used := used + c.size + (CASE WHEN cardinality(seqs) > 0 THEN 1 ELSE 0 END);
                seqs := seqs || c.seq;
            END IF;
        END LOOP;
        IF n = 0 THEN
            RETURN;
        END IF;
        IF n < p_max_events AND all_bytes <= p_max_bytes AND t - oldest < p_linger THEN
            seqs := '{{}}';
            ready_in := p_linger - (t - oldest);
            RETURN;
        END IF;
        full_batch := full_batch OR other_sensor OR n >= p_max_events;
        passed := ARRAY(SELECT s FROM unnest(passed) s WHERE s < seqs[cardinality(seqs)]);
        IF p_destination IS NULL THEN
            UPDATE head SET next = seqs[cardinality(seqs)] + 1;
        ELSE
            UPDATE destinations SET next = seqs[cardinality(seqs)] + 1 WHERE name = p_destination;
        END IF;
        claim_until := t + p_lease;
        {_LEASE_CLAIMED}
    END $$;
    -- Give seqs of a claim back, to be claimed again; with an error, as a failed attempt
    -- (a destination's attempts are rows of their own: only events that failed there have
    -- one).
    DROP FUNCTION give_back(text, bigint[], text);
    CREATE FUNCTION give_back(
        p_claim text, p_seqs bigint[], p_error text, p_destination text DEFAULT NULL
    ) RETURNS integer LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        taken bigint[] := take_from_claim(p_claim, p_seqs, p_destination);
        t double precision := extract(epoch from clock_timestamp());
    BEGIN
        IF cardinality(taken) > 0 THEN
            {_LEASE_GIVEN_BACK}
        END IF;
        IF p_error IS NULL THEN
            NULL;
        ELSIF p_destination IS NULL THEN
            UPDATE events SET attempts = attempts + 1,
                first_attempt_at = coalesce(first_attempt_at, t), last_attempt_at = t,
                last_error = p_error
            WHERE seq = ANY(taken);
        ELSE
            INSERT INTO destination_attempts AS a (destination, seq, attempts,
                first_attempt_at, last_attempt_at, last_error)
            SELECT p_destination, s, 1, t, t, p_error FROM unnest(taken) s
            ON CONFLICT (destination, seq) DO UPDATE SET attempts = a.attempts + 1,
                last_attempt_at = t, last_error = p_error;
        END IF;
        RETURN cardinality(taken);
    END $$;
    -- A destination's acknowledgements of concurrent deliveries, in one statement, as
    -- acknowledge's for [upstream]: the i-th is claim p_claims[i] with the seqs whose
    -- p_owners entry is i; what is still under its claim is done there (its lease row gone,
    -- which moves the position on). How many events each recorded.
    CREATE FUNCTION destination_acknowledge(
        p_destination text, p_claims text[], p_seqs bigint[], p_owners integer[]
    ) RETURNS integer[] LANGUAGE plpgsql SET search_path = {SCHEMA} AS $$
    DECLARE
        done bigint[];
        recorded integer[] := '{{}}';
        n_events bigint := 0;
    BEGIN
        FOR i IN 1 .. coalesce(cardinality(p_claims), 0) LOOP
            done := take_from_claim(p_claims[i], ARRAY(
                SELECT s FROM unnest(p_seqs, p_owners) AS u(s, owner) WHERE owner = i),
                p_destination);
            recorded := recorded || cardinality(done);
            CONTINUE WHEN cardinality(done) = 0;
            n_events := n_events + cardinality(done);
            DELETE FROM destination_attempts WHERE destination = p_destination
                AND seq = ANY(done);
        END LOOP;
        IF n_events > 0 THEN
            UPDATE destinations SET delivered_total = delivered_total + n_events
            WHERE name = p_destination;
        END IF;
        RETURN recorded;
    END $$;
    """,
    # 6: marks, what happened to an event at a destination beside its delivery (replayed
    # from an archive; verified, missing, resent or given up by reconciliation), one row
    # each, shown in its journey, `at` on the database's clock. They go with the event: when
    # neither its row nor a dead letter of it is left (pruned, purged), nor is its journey,
    # so its marks are deleted too, by whatever statement deleted the last of it.
    f"""
    CREATE TABLE marks (
        seq bigserial PRIMARY KEY,
        id text NOT NULL,
        at double precision NOT NULL,
        what text NOT NULL,
        destination text NOT NULL,
        detail text
    );
    CREATE INDEX marks_by_id ON marks (id);
    CREATE FUNCTION marks_gone() RETURNS trigger LANGUAGE plpgsql
        SET search_path = {SCHEMA} AS $$ BEGIN
        IF EXISTS (SELECT 1 FROM marks) THEN
            DELETE FROM marks m USING (SELECT DISTINCT id FROM old_rows) o WHERE m.id = o.id
                AND NOT EXISTS (SELECT 1 FROM events e WHERE e.id = o.id)
                AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.id = o.id);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER marks_of_events_out AFTER DELETE ON events REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION marks_gone();
    CREATE TRIGGER marks_of_dead_out AFTER DELETE ON dead_letters
        REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION marks_gone();
    """,
    # 7: reconciliation. A sent row's `checked_at` is when reconciliation was done with its
    # events (each verified, given up, or found missing and sent again); NULL while that is
    # still to come, which holds the row, its events and their bodies (bodies.horizon,
    # pruning). A row is born NULL only in a session of a replica that reconciles
    # (RECONCILING); rows sent before, or without reconciliation, have nothing to wait for.
    f"""
    ALTER TABLE sent ADD COLUMN checked_at double precision;
    UPDATE sent SET checked_at = delivered_at;
    ALTER TABLE sent ALTER COLUMN checked_at SET DEFAULT
        CASE WHEN {RECONCILING} THEN NULL ELSE extract(epoch from clock_timestamp()) END;
    CREATE INDEX sent_unchecked ON sent (lower(span)) WHERE checked_at IS NULL;
    """,
    # 8: reconciliation one replica at a time. Every replica listed the platform for the same
    # delivered events, and each sent what it found lost again: a lost event twice with two
    # replicas. The replica whose turn it is (reconciling.take_turn) is the one that checks.
    """
    CREATE TABLE reconcile_turn (
        one int PRIMARY KEY CHECK (one = 1),
        replica text NOT NULL,
        until double precision NOT NULL
    );
    """,
)

VERSION: Final = len(MIGRATIONS)
