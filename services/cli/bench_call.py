"""`facecast bench call`: the turn latency a caller feels, on a real local cluster (separate Ray processes for the
ingress, the workers and the LLMBridge), through the public gRPC API.

    a scripted caller: question 1 (spoken by Piper), silence, question 2, ... sent at real time on one
    conversation session  ─►  per turn: the moment the question's last sample was sent  ->  REPLY_STARTED (sent with
    the first video chunk that shows the reply) arrives  =  end of speech -> first avatar frame of the answer

The silence after each question is long enough for the whole answer, so no turn interrupts the one before. The first
turn is a warm-up (models load on the first conversation) and is reported apart. Modes: `offline` (the on-server
cascade) and `realtime`, against the local protocol peer (`services.llm.realtime_peer`: a scripted 3 s reply
streamed at PEER_SPEEDUP x real time, no model): there the figure that matters is what the avatar adds to the LLM's
own first audio (the peer's first audio delta of the turn -> the answer's first frame).
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from model_core.bench import cpu_label
from services.api import pb, pb_grpc
from services.deploy.local_cluster import LocalCluster
from services.net import free_port

QUESTIONS = (
    "What is the capital of France?", "Can you tell me a fun fact about the ocean?", "How are you today?",
    "What should I cook for dinner tonight?", "Why is the sky blue?", "What is your favourite book?",
    "How far away is the moon?", "Can you recommend a good movie?", "What is the tallest mountain on Earth?",
    "How do plants make their food?", "What is the best way to learn a language?", "Tell me a short joke.",
)
PEER_SPEEDUP = 4.0
"""How much faster than real time the protocol peer streams its reply (hosted realtime LLMs stream several times
faster than they speak; at 1.0 the avatar could not see a chunk's audio before real time brings it)."""
GAP_S = 9.0
"""Silence after each question: the reply (at most ~72 tokens, ~6 s of speech) is over before the next one."""


def _questions(count: int) -> tuple[np.ndarray, list[float]]:
    """16 kHz int16 audio of `count` questions with GAP_S of silence after each, and where each question ends (s)."""
    from services.llm.conversation import PcmResampler
    from services.llm.offline import REPLY_RATE_HZ, CascadeModels, OfflineConfig

    models = CascadeModels.shared(OfflineConfig.from_settings())
    pieces, ends, at = [np.zeros(8000, np.int16)], [], 0.5
    for k in range(count):
        speech = PcmResampler(16000).convert(models.speak(QUESTIONS[k % len(QUESTIONS)]), REPLY_RATE_HZ)
        pieces += [speech, np.zeros(int(GAP_S * 16000), np.int16)]
        at += len(speech) / 16000
        ends.append(at)
        at += GAP_S
    return np.concatenate(pieces), ends


def _call(target: str, image: bytes, pcm: np.ndarray, mode: int, stages: list | None = None
          ) -> tuple[float, list[tuple[float, str, float]]]:
    """Stream `pcm` at real time into a new conversation session; returns (the time its first sample was sent,
    [(arrival time, event type, turn_latency_ms)]). `stages` collects each chunk's server-side stage times (ms)."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.AvatarServiceStub(channel)
    session = stub.CreateSession(pb.CreateSessionRequest(reference_image=image,
                                                         conversation=pb.ConversationOptions(mode=mode)), timeout=120)
    attached, started, events = threading.Event(), [0.0], []

    def requests():
        yield pb.SessionInput(attach=pb.Attach(session_id=session.session_id, session_token=session.session_token))
        attached.wait(60)
        piece = 640
        started[0] = clock = time.perf_counter()
        for index, start in enumerate(range(0, len(pcm), piece)):
            time.sleep(max(0.0, clock + index * piece / 16000 - time.perf_counter()))
            yield pb.SessionInput(audio=pb.AudioInput(pcm_s16le=pcm[start:start + piece].astype("<i2").tobytes(),
                                                      sample_rate_hz=16000, channels=1))
        yield pb.SessionInput(control=pb.Control(end_of_input=True))

    try:
        for output in stub.StreamSession(requests(), timeout=len(pcm) / 16000 + 300):
            if output.WhichOneof("output") != "event":
                if stages is not None and output.WhichOneof("output") == "video_chunk":
                    stages.append(dict(output.video_chunk.stats.stage_ms))
                continue
            event = output.event
            if event.type == pb.Event.ATTACHED:
                attached.set()
            events.append((time.perf_counter(), pb.Event.Type.Name(event.type), event.turn_latency_ms, event.message))
            if event.type == pb.Event.SESSION_ENDED:
                break
    finally:
        channel.close()
    return started[0], events


class _Peer:
    """The realtime protocol peer on an event loop of its own (the bench's calls are synchronous)."""

    def __enter__(self):
        import asyncio

        from services.llm.realtime_peer import RealtimePeer

        self.peer, self.loop = RealtimePeer(reply_s=3.0, speedup=PEER_SPEEDUP), asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.peer.__aenter__(), self.loop).result(10)
        return self.peer

    def __exit__(self, *exc):
        import asyncio

        asyncio.run_coroutine_threadsafe(self.peer.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def bench_call(turns: int = 10, preset_name: str = "talk128", decoder: str = "fast", mode: str = "offline",
               progress: bool = True) -> dict:
    import contextlib

    say = print if progress else (lambda *a, **k: None)
    say(f"speaking {turns + 1} questions with Piper ...")
    pcm, ends = _questions(turns + 1)
    with open("assets/reference.png", "rb") as handle:
        image = handle.read()
    args = {"preset": preset_name, "decoder": decoder, "max_chunks_in_flight": 2}
    with (_Peer() if mode == "realtime" else contextlib.nullcontext()) as peer:
        if peer is not None:
            args.update(realtime_url=peer.url, realtime_api_key="bench-key", offline_conversation=False)
        say("starting the local cluster ...")
        cluster = LocalCluster.start(args, grpc_port=free_port(), num_cpus=4, num_gpus=3)
        try:
            say(f"calling: {len(pcm) / 16000:.0f} s of a caller at real time ...")
            started, events = _call(cluster.target, image, pcm, pb.ConversationOptions.OFFLINE if mode == "offline"
                                    else pb.ConversationOptions.REALTIME, stages := [])
        finally:
            cluster.stop()
        llm_first_audio = [at - started for at in peer.first_audio_at] if peer is not None else []
    replies = [(at - started, latency, note) for at, kind, latency, note in events if kind == "REPLY_STARTED"]
    per_turn = []
    for k, end in enumerate(ends):
        window_end = ends[k + 1] if k + 1 < len(ends) else float("inf")
        reply = next((r for r in replies if end < r[0] < window_end), None)
        llm = next((at for at in llm_first_audio if end < at < window_end), None)
        per_turn.append({"question": QUESTIONS[k % len(QUESTIONS)], "speech_end_s": end,
                         "first_frame_after_s": None if reply is None else reply[0] - end,
                         "server_turn_latency_ms": None if reply is None else reply[1],
                         "server_note": None if reply is None else reply[2],
                         "llm_first_audio_after_s": None if llm is None else llm - end,
                         "avatar_adds_s": None if llm is None or reply is None else reply[0] - llm})
    measured = [t["first_frame_after_s"] for t in per_turn[1:] if t["first_frame_after_s"] is not None]
    added = [t["avatar_adds_s"] for t in per_turn[1:] if t["avatar_adds_s"] is not None]
    from services.llm.offline import OfflineConfig
    from services.llm.smollm2 import resolve_runtime

    runtime = resolve_runtime(OfflineConfig.from_settings().llm_runtime) if mode == "offline" else None
    return {"machine": cpu_label(), "preset": preset_name, "decoder": decoder, "mode": mode, "llm_runtime": runtime,
            "avatar_adds_p50_s": float(np.percentile(added, 50)) if added else None,
            "avatar_adds_p95_s": float(np.percentile(added, 95)) if added else None,
            "turns": turns, "answered": len(measured), "warmup_turn": per_turn[0],
            "p50_s": float(np.percentile(measured, 50)) if measured else None,
            "p95_s": float(np.percentile(measured, 95)) if measured else None,
            "server_p50_ms": float(np.percentile([t["server_turn_latency_ms"] for t in per_turn[1:]
                                                  if t["server_turn_latency_ms"] is not None], 50))
            if measured else None,
            "chunk_stage_ms_p50": {name: float(np.percentile([c[name] for c in stages if name in c], 50))
                                   for name in sorted({name for c in stages for name in c})},
            "per_turn": per_turn[1:]}


def format_call_report(report: dict) -> str:
    runtime = f", the LLM on {report['llm_runtime']}" if report.get("llm_runtime") else ""
    lines = [f"facecast bench call — {report['mode']} mode{runtime}, preset {report['preset']} ({report['decoder']} "
             f"decoder) on {report['machine']}",
             f"  end of the caller's speech -> first avatar frame of the answer, {report['answered']}/"
             f"{report['turns']} turns answered: p50 {report['p50_s']:.2f} s, p95 {report['p95_s']:.2f} s"
             if report["p50_s"] is not None else "  no turn was answered",
             f"  (the server's own figure, from the VAD's end of speech: p50 {report['server_p50_ms']:.0f} ms; "
             f"warm-up turn: {report['warmup_turn']['first_frame_after_s']} s)"]
    if report["avatar_adds_p50_s"] is not None:
        lines.append(f"  the LLM's first audio -> the answer's first frame (what the avatar adds): p50 "
                     f"{report['avatar_adds_p50_s']:.2f} s, p95 {report['avatar_adds_p95_s']:.2f} s")
    if report.get("chunk_stage_ms_p50"):
        lines.append("  one chunk on the server, p50 ms: " + ", ".join(
            f"{name} {ms:.0f}" for name, ms in report["chunk_stage_ms_p50"].items()))
    for turn in report["per_turn"]:
        after = turn["first_frame_after_s"]
        lines.append(f"    {turn['question']:45s} {'no answer' if after is None else f'{after:.2f} s'}  "
                     f"{turn['server_note'] or ''}")
    return "\n".join(lines)

