"""Operator tools over a running system: schema migrations, retention (prune),
read-only SQL inspection, dead-letter replay. They use the workflow engine and the log;
nothing below imports them.
"""
