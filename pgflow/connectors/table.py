"""Tail a PostgreSQL table (or query) by cursor: luno's reflexstreamer, gap-free.

Usage::

    from pgflow.connectors import table
    payments = table.Connector(
        table.TableStream("app.payments"),          # id, tx, foreign_id, type, ...
        table.CursorStore(dsn),                      # the workflow's database
    )
    builder.add_connector("payments", payments, handle_payment)

How rows are read
-----------------
Like the core event log, a source is read in snapshot batches (see
:mod:`pgflow.log.snapshots`): each batch is the rows whose transaction committed since the
consumer's last snapshot, in id order, so a row whose transaction commits late is never
skipped, no "gap settle" timeout is needed, and a transaction left open elsewhere only
delays its own rows. This needs two columns on the source:

* ``id``: an integer, unique, increasing key (``bigint GENERATED ALWAYS AS IDENTITY``);
* ``tx``: ``xid8 NOT NULL DEFAULT pg_current_xact_id()``, the inserting transaction.
  :func:`add_tx_column` adds it (plus the ``(tx, id)`` and ``(id)`` indexes the read
  needs, and a trigger that stamps it so an INSERT cannot forge it) to an existing
  table. Adding a column with a volatile default rewrites the table under an
  ACCESS EXCLUSIVE lock; for a big, busy table add it nullable, backfill in batches,
  then set the default and ``NOT NULL``.

``tx`` is set on INSERT only, so this tails *new rows*. To see updates and deletes too,
install change capture (:func:`pgflow.connectors.capture`) and tail its change log with
:func:`pgflow.connectors.capture.changes_stream`.

An id-only source (``tx_column=None``) is read with ``id > cursor`` and is **not**
gap-free: with concurrent writers a smaller id can commit after a larger one was read,
and that row is skipped for good. Use it only when a single writer inserts rows in
commit order (e.g. a serial batch import), or for sources that are frozen while read.

Where the cursor lives, and exactly-once
-----------------------------------------
The cursor is a row of ``pgflow.cursors`` named ``connector:<source label>:<consumer
name>`` (e.g. ``connector:app.payments:orders--payments-1-of-1``) in the
:class:`CursorStore`'s database, which is also where the source is read. The
consumer implements :class:`~pgflow.connectors.TransactionalConsumer`: the workflow
runner calls ``recv_batch_in(conn, limit)`` inside its transaction and the acks
advance the cursor in that same transaction (compare-and-set, under a per-consumer
advisory lock that assigns no xid), so triggering the workflow and moving past the row
commit together: exactly-once, across crashes. Plain ``recv()`` (for other uses) acks
in a transaction of its own after the caller's effects: at-least-once.

One cursor write per batch: a transactional ``ack`` only records, in memory, that the
consumer may move past its row (acks go in order, each one event further; acking twice
is harmless, skipping one raises). The cursor row is written once, by a single
compare-and-set to the last acked row, when the batch's last event is acked or when
the caller calls :meth:`TableConsumer.flush_in` (the runner does, before it commits a
batch it stopped early). A failed compare-and-set raises
:class:`~pgflow.log.cursors.LostCursor` inside the transaction, which must roll back. A
caller that stops acking part-way must call ``flush_in`` before committing, or the
acked rows are delivered again. Each batch starts from the stored cursor, so a
rolled-back batch leaves nothing advanced in memory; read one batch per transaction.

Rows become events through a translator (:data:`RowTranslator`); a translator raises
``ValueError`` for a row it cannot use, which surfaces as
:class:`~pgflow.connectors.MalformedEvent` so the runner dead-letters it and moves on.
"""

from __future__ import annotations

from pgflow.connectors._table_consumer import Connector, TableConsumer
from pgflow.connectors._table_cursors import CursorStore
from pgflow.connectors._table_rows import (
    Row,
    RowTranslator,
    default_translator,
    header_value,
    make_translator,
)
from pgflow.connectors._table_source import Source, TableStream, add_tx_column

__all__ = [
    "Connector",
    "CursorStore",
    "Row",
    "RowTranslator",
    "Source",
    "TableConsumer",
    "TableStream",
    "add_tx_column",
    "default_translator",
    "header_value",
    "make_translator",
]
