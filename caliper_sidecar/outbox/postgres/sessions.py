"""What every session the sidecar opens on PostgreSQL is set to, the pool's and the LISTEN
connection's: timeouts, so that a replica that stops while it holds a lock or a transaction
(frozen, powered off, cut off) never stalls the others, and TCP keepalives, so that the server
notices a peer that is gone (docs/guarantees.md, docs/operators.md).

An operator overrides any of them in `outbox.url`'s query string
(`postgresql://…/sidecar?lock_timeout=5s`): asyncpg sends a query parameter it does not know
itself to the server as a setting, and one named there (or in `options` as `-c name=value`)
is left out here. (Set on the role or the database instead, it would lose: the settings a
client sends at connection win over those.)
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

#: what the sidecar sets on its sessions, unless `outbox.url` names it
TIMEOUTS: Final = {
    # A lock waited for longer fails: ingest behind another replica's commit that never ends
    # answers 503 storage_busy in seconds instead of hanging. The sidecar's own holders take
    # milliseconds (the ingest lock is held for one group's insert and commit).
    "lock_timeout": "2s",
    # A statement running longer is cancelled. The sidecar's take milliseconds; the few that
    # may take long (migrations, pruning, VACUUM) lift it for themselves (LONG_WORK).
    "statement_timeout": "10s",
    # A session idle inside its transaction this long is ended by the server and its locks
    # released: a frozen replica's half-done commit lets the others go after 5 s. The
    # sidecar never leaves a transaction open while it does anything but its statements.
    "idle_in_transaction_session_timeout": "5s",
    # A peer gone without a word (powered off, cut off): probed after 10 s of quiet, every
    # 5 s, given up after 3 unanswered probes, or after 25 s of data it does not acknowledge.
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
}
#: for a transaction that may rightly wait or run long (a migration waits for another
#: replica's; pruning a chunk): no lock or statement timeout until it ends
LONG_WORK: Final = "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0"
_OPTION: Final = re.compile(r"(?:-c\s*|--)([A-Za-z_.]+)=")


def session_settings(dsn: str, **ours: str) -> dict[str, str]:
    """The server settings for a session on this URL: `ours`, and TIMEOUTS but for those the
    URL names (its query string reaches the server through asyncpg)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query, keep_blank_values=True)
    named = set(query)
    for options in query.get("options", []):
        named.update(_OPTION.findall(options))
    return {**{k: v for k, v in TIMEOUTS.items() if k not in named}, **ours}
