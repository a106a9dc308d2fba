"""`AudioEncoder`: streaming PCM -> per-chunk audio conditioning, for every session (a thin Serve class over
`model_core.audio_stage.AudioStage`).

What leaves this deployment, and to whom:
    push / end -> the ingress: one `ChunkTicket` per chunk that became ready: its frame span, its audio, and a
                  reference to its `ChunkFeatures` put in the object store (`put`, Ray's by default), which the
                  ingress hands to the score group unresolved — so the features go from here to the score group
                  without passing through the ingress, and without a second call to this deployment.
Per session it keeps the last `REPLAY_CHUNKS` tickets (a re-attaching ingress resends their audio with the buffered
frames, and resubmits chunks a dead ingress cut but never submitted); their references keep the features alive.
After every push, end and speaking change the session's state and its new tickets go to the `ResumeStore`, so a
replacement replica continues the session (`restore`) and a push the ingress retries is not applied twice (`offset`).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import ray
from ray import serve

from model_core.models import dit_config_for
from model_core.snapshot import pack, unpack
from model_core.audio_stage import AudioStage, ChunkAudioInput
from services.serving.affinity import AFFINITY_ROUTER, ReportsSessions
from services.serving.messages import ChunkFeatures, ChunkTicket
from services.serving.resume import ResumeStore, ResumeUnavailable, SessionNotHere, restore_call
from services.serving.settings import REPLAY_CHUNKS, AppSettings
from services.telemetry import AUDIO_ENCODE_SPAN, setup_telemetry, span


def pcm_to_s16le(pcm: np.ndarray) -> bytes:
    """[S] float in [-1, 1] -> int16 little-endian bytes."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class _AudioSessionState:
    """One session on this replica: the stage's state and the recent tickets."""

    def __init__(self, stage_session) -> None:
        self.stage = stage_session
        self.recent: deque[ChunkTicket] = deque(maxlen=REPLAY_CHUNKS)
        self.snapshots: dict[int, bytes] = {}    # new tickets' snapshots, written with the session's next save


@serve.deployment(name="AudioEncoder", max_ongoing_requests=256, request_router_config=AFFINITY_ROUTER)
class AudioEncoder(ReportsSessions):
    """Streaming audio -> per-chunk tickets (to the ingress) and features (to the score group)."""

    def __init__(self, settings: AppSettings, stage: AudioStage | None = None, put=None):
        """`stage`: the audio engine to serve (tests inject one); None builds it from the settings.
        `put(value) -> reference`: where features go for the score group (None: `ray.put`)."""
        self.settings = settings
        self.put = put or ray.put
        self.telemetry = setup_telemetry("facecast-audio")
        if stage is None:
            audio_config = settings.audio_config()
            stage = AudioStage(audio_config, dit_config_for(settings.preset_config, settings.checkpoint, audio_config))
        self.stage = stage
        self.sessions: dict[str, _AudioSessionState] = {}
        self.resume = ResumeStore.from_settings(settings)

    def open(self, session_id: str, stream, num_characters: int) -> None:
        self.sessions[session_id] = _AudioSessionState(self.stage.open(session_id, stream, num_characters))
        self._save(session_id)

    def push(self, session_id: str, pcm: np.ndarray, sample_rate_hz: int, character: int,
             carrier: dict | None = None, offset: int | None = None,
             from_chunk: int | None = None) -> list[ChunkTicket]:
        """pcm [S] int16 or float mono of one character -> tickets of the chunks that became ready.

        A retried push (the ingress did not hear back) says where its samples start (`offset`: the character's
        samples the ingress had sent before them) and which tickets it still lacks (`from_chunk`): samples this
        session already has are skipped, and every kept ticket from `from_chunk` on is returned."""
        session = self._session(session_id)
        if offset is not None:
            received = self.stage.character(session.stage, character).samples_received
            if received < offset:
                raise ResumeUnavailable(f"session {session_id!r}: {offset - received} samples of character "
                                        f"{character} were lost with a failed AudioEncoder replica")
            pcm = pcm[received - offset:]
        with span(AUDIO_ENCODE_SPAN, carrier, **{"session.id": session_id, "samples": int(pcm.shape[0])}):
            tickets = (self._cut(session, self.stage.push(session.stage, pcm, sample_rate_hz, character))
                       if pcm.shape[0] else [])
        self._save(session_id)
        return tickets if from_chunk is None else self.recent(session_id, from_chunk)

    def end(self, session_id: str, carrier: dict | None = None, from_chunk: int | None = None) -> list[ChunkTicket]:
        """No more audio: the remaining chunks (the last one final); `from_chunk` as for `push` (a retried end)."""
        session = self._session(session_id)
        with span(AUDIO_ENCODE_SPAN, carrier, **{"session.id": session_id, "end_of_input": True}):
            tickets = self._cut(session, self.stage.end(session.stage))
        self._save(session_id)
        return tickets if from_chunk is None else self.recent(session_id, from_chunk)

    def recent(self, session_id: str, from_chunk: int) -> list[ChunkTicket]:
        """Tickets still kept whose index is >= from_chunk (oldest first)."""
        return [ticket for ticket in self._session(session_id).recent if ticket.chunk_index >= from_chunk]

    def frontend_lookahead_s(self, fps: float) -> float:
        """Audio the front end needs past a video frame before it has that frame's features (at `fps`)."""
        return float(self.stage.frontend(float(fps)).lookahead_s)

    def set_speaking(self, session_id: str, character: int, speaking: bool) -> None:
        self.stage.set_speaking(self._session(session_id).stage, character, speaking)
        self._save(session_id)

    def state(self, session_id: str) -> dict:
        session = self._session(session_id).stage
        return {"chunk_index": session.chunk_index, "input_ended": session.input_ended,
                "sample_rate_hz": session.sample_rate_hz,
                "samples_received": session.characters[0].samples_received,
                "samples_by_character": [character.samples_received for character in session.characters]}

    def restore(self, session_id: str) -> dict:
        """Make sure this replica holds the session: a replacement replica loads its last snapshot (state and kept
        tickets, their features put again). Returns `state` plus restored: whether it was loaded."""
        restored = session_id not in self.sessions
        if restored:
            store = restore_call(self.resume, session_id)
            session = _AudioSessionState(unpack(store.need(session_id, "audio", "the audio front end")))
            kept = sorted((int(name.split(":")[1]), data) for name, data in store.fields(session_id, "ticket:").items())
            for _, data in kept:
                saved = unpack(data)
                features = self.put(ChunkFeatures(session_id, saved["chunk_index"], saved.pop("features"),
                                                  saved.pop("speaking"), saved["audio_ms"] / 1000))
                session.recent.append(ChunkTicket(**saved, features=features))
            self.sessions[session_id] = session
        return {"restored": restored, **self.state(session_id)}

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        if self.resume is not None:
            self.resume.forget(session_id)

    def session_ids(self) -> list[str]:
        return list(self.sessions)

    def held_bytes(self) -> int:
        """Bytes of audio this replica keeps in recent tickets (features live in the object store)."""
        return sum(len(ticket.audio_pcm_s16le) for session in self.sessions.values() for ticket in session.recent)

    def _cut(self, session: _AudioSessionState, inputs: list[ChunkAudioInput]) -> list[ChunkTicket]:
        tickets = []
        for item in inputs:
            features = self.put(ChunkFeatures(item.session_id, item.chunk_index, item.features, item.speaking,
                                              item.audio_s))
            ticket = ChunkTicket(
                session_id=item.session_id, chunk_index=item.chunk_index, first_frame=item.first_frame,
                num_frames=item.num_frames, fps=item.fps, final=item.final,
                audio_pcm_s16le=pcm_to_s16le(item.audio_pcm), sample_rate_hz=item.sample_rate_hz,
                audio_ms=item.audio_s * 1000, features=features)
            session.recent.append(ticket)
            tickets.append(ticket)
            if self.resume is not None:
                fields = {f.name: getattr(ticket, f.name) for f in dataclasses.fields(ticket) if f.name != "features"}
                session.snapshots[item.chunk_index] = pack({**fields, "features": item.features,
                                                            "speaking": item.speaking})
        return tickets

    def _save(self, session_id: str) -> None:
        """The session's state and its new tickets into the resume store (before the call returns)."""
        session = self.sessions[session_id]
        if self.resume is None:
            return
        fields = {"audio": pack(session.stage),
                  **{f"ticket:{index}": data for index, data in session.snapshots.items()}}
        drop = [f"ticket:{index - REPLAY_CHUNKS}" for index in session.snapshots if index >= REPLAY_CHUNKS]
        session.snapshots = {}
        self.resume.put(session_id, fields, drop)

    def _session(self, session_id: str) -> _AudioSessionState:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotHere(f"AudioEncoder has no session {session_id!r}") from None
