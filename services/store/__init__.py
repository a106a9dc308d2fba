"""The session store: Redis session records (`sessions.py`) and the embedded redis-server facecast can own
(`redis_server.py`)."""
