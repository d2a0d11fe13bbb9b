"""The event log: the bottom layer everything else is built on.

``events`` appends to ``pgflow.events``; ``snapshots`` owns the visibility rule (a
reader's position is a Postgres snapshot, a batch is the diff to a newer one);
``streamer`` reads batches; ``listener`` wakes readers on NOTIFY; ``cursors`` stores a
reader's position in the same transaction as its effects. Nothing here knows about
workflows or connectors.
"""
