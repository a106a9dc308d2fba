"""Conversation: an audio LLM turns the caller's speech into the avatar's reply (realtime protocol, or offline)."""
