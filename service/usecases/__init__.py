"""Use cases: one class or function per thing a user does (score a listing, import a catalog, rescan a
file, re-match stored listings, reindex). The API, the CLI and Ray all call these; nothing about scoring
is written twice."""
