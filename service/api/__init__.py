"""The HTTP adapter: FastAPI app factory, lifespan, routers, schemas, errors and metrics."""
