"""The package version, in a module of its own so that any layer (observability's
instrumentation scope, the CLI's ``--version``) can read it without importing
``pgflow/__init__`` and, through it, every layer above."""

__version__ = "0.1.0"
