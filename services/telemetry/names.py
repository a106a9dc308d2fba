"""The names facecast's telemetry is recorded under: span names, span and metric attribute keys, metric names
and their histogram buckets.

What lives here
---------------
Plain string and tuple constants, and :func:`score_step_stage`. The span tree and the meaning of each metric are
drawn in :mod:`services.telemetry`'s docstring.

What this file does not know
----------------------------
OpenTelemetry itself: no providers, exporters, tracers or context. Setting those up is
:mod:`services.telemetry.providers`; opening spans and carrying context across Ray hops is
:mod:`services.telemetry.spans`.
"""

from __future__ import annotations

SERVICE_NAME = "facecast"
INSTRUMENTATION_NAME = "facecast"

# --- span names -------------------------------------------------------------
SESSION_SPAN = "facecast.session"
CHUNK_SPAN = "facecast.chunk"
AUDIO_ENCODE_SPAN = "facecast.audio.encode"
SCORE_STEP_SPAN = "facecast.score.step"
VAE_DECODE_SPAN = "facecast.vae.decode"
EGRESS_SPAN = "facecast.egress"

# --- span attribute keys ----------------------------------------------------
ATTR_SESSION_ID = "session.id"
ATTR_PRESET = "preset"
ATTR_CHUNK_INDEX = "chunk.index"
ATTR_STEP = "step"

# --- metric names and attribute values --------------------------------------
TTFF_METRIC = "facecast.session.ttff"
CHUNK_INTERVAL_METRIC = "facecast.chunk.interval"
STAGE_DURATION_METRIC = "facecast.chunk.stage.duration"
FPS_METRIC = "facecast.session.fps"
REALTIME_FACTOR_METRIC = "facecast.chunk.realtime_factor"
SESSIONS_ACTIVE_METRIC = "facecast.sessions.active"
CHUNKS_IN_FLIGHT_METRIC = "facecast.chunks.in_flight"
SESSIONS_REJECTED_METRIC = "facecast.sessions.rejected"
METRIC_NAMES = (
    TTFF_METRIC,
    CHUNK_INTERVAL_METRIC,
    STAGE_DURATION_METRIC,
    FPS_METRIC,
    REALTIME_FACTOR_METRIC,
    SESSIONS_ACTIVE_METRIC,
    CHUNKS_IN_FLIGHT_METRIC,
    SESSIONS_REJECTED_METRIC,
)

ATTR_STAGE = "stage"
ATTR_REASON = "reason"
STAGE_AUDIO = "audio"
STAGE_SCORE = "score"
STAGE_VAE = "vae"
STAGE_EGRESS = "egress"

SECONDS_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
# The seconds buckets would put every fps / realtime-factor value in one bucket,
# so those two get buckets of their own.
FPS_BUCKETS = (1.0, 5.0, 10.0, 15.0, 20.0, 24.0, 25.0, 30.0, 50.0, 60.0)
REALTIME_FACTOR_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


def score_step_stage(k: int) -> str:
    """The ``stage`` attribute value for denoising step ``k``: ``score_step_<k>``."""
    return f"score_step_{int(k)}"
