"""The Ray Serve deployments of the facecast cluster, one file each, plus the messages they exchange, the ordering and
batching helpers, the settings and the one builder (`app.py`) that binds the graph."""
