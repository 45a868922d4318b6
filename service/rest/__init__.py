"""The REST and WebSocket transport: a thin FastAPI adapter over the DataPlane."""
