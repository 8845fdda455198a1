"""The pure core of counterlens: listings, references, matches, signals, fusion and verdict policy.

Nothing in this package imports FastAPI, SQLAlchemy, ONNX Runtime or FAISS; adapters implement the
Protocols in :mod:`service.domain.ports` and the composition root injects them.
"""
