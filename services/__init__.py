"""facecast services: media I/O and serving components."""
