"""Delivery: where a session's video and voice go (gRPC stream, LiveKit room, local WebRTC page, MP4 file)."""
