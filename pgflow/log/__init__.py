"""The event log: the bottom layer everything else is built on.

``events`` appends to ``pgflow.events``; ``snapshots`` owns the visibility rule (a
reader's position is a Postgres snapshot, a batch is the diff to a newer one);
``streamer`` reads batches; ``listener`` wakes readers on NOTIFY; ``cursor_rows`` is
the only SQL that writes a reader's stored position (``pgflow.cursors``), and
``cursors`` runs consumers that move it in the same transaction as their effects.
Nothing here knows about workflows or connectors.
"""
