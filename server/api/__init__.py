"""The HTTP layer: FastAPI routes over the async engine (the engine knows nothing of HTTP)."""
