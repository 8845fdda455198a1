"""Import target for uvicorn workers: ``uvicorn --factory service.api.main:app_factory``.

Each worker process builds its Settings from the environment exactly once, here, and sizes its models
by its share of the cores: ``counterlens serve --workers N`` tells each worker N
(``COUNTERLENS_SERVER__WORKERS``); with uvicorn's own ``--workers N``, set that variable to N as well.
"""

from __future__ import annotations

from fastapi import FastAPI

from service.api.app import create_app
from service.container import process_share
from service.logs import configure_logging
from service.settings import Settings


def app_factory() -> FastAPI:
    # This process is one of server.workers: its models take its share of the cores.
    settings = Settings()
    settings = process_share(settings, settings.server.workers)
    configure_logging(settings.server.log_level)
    return create_app(settings, freeze_after_load=True)  # this worker process serves only this app
