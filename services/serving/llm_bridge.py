"""`LLMBridge`: where an audio LLM will turn a caller's speech into the avatar's reply audio.

Until a provider is configured (the delivery-and-conversation issue: OpenAI Realtime protocol, or the offline
VAD -> ASR -> LLM -> TTS cascade), sessions are driven by raw audio from the product backend, and this deployment says
so instead of pretending to answer.  It holds no session state.
"""

from __future__ import annotations

from ray import serve

from services.serving.settings import AppSettings


@serve.deployment(name="LLMBridge", max_ongoing_requests=64)
class LLMBridge:
    """Where an audio LLM (OpenAI Realtime protocol, or the offline VAD -> ASR -> LLM -> TTS cascade) will turn a
    caller's speech into the avatar's reply audio.  Until a provider is configured (a later issue), sessions are
    driven by raw audio from the product backend and this deployment says so instead of pretending to answer."""

    def __init__(self, settings: AppSettings):
        self.settings = settings

    def status(self) -> dict:
        """Whether a provider is attached. The bridge (realtime LLM session per avatar session, reply audio pushed
        into AudioEncoder, barge-in clearing queued chunks) is the next delivery issue's work."""
        return {"available": False,
                "message": "no audio-LLM provider is configured; drive sessions with raw audio (StreamSession audio)"}
