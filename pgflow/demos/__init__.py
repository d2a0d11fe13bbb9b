"""Runnable demonstrations (``pgflow demo``); examples for users, never imported by
the library itself."""
