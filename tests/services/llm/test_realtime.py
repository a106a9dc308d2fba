"""Realtime mode against a local WebSocket peer speaking the OpenAI Realtime protocol: the session is configured,
the caller's speech goes up as it arrives (resampled to 24 kHz), the reply comes back as it is generated, and a
barge-in cancels the reply, truncates it at what was played and clears the avatar; every event either side sends
validates against the openai package's typed models; bad events and an absent peer fail clearly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.llm.conversation import ClearReply, ConversationError, ReplyAudio, ReplyDone, UserSpeech
from services.llm.realtime import RealtimeConfig, RealtimeConversation
from services.net import free_port

from services.llm.realtime_peer import RealtimePeer

RATE = 16000


def speech_then_quiet(speech_s: float, quiet_s: float) -> list[np.ndarray]:
    t = np.arange(int(speech_s * RATE)) / RATE
    voice = (0.4 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    audio = np.concatenate([voice, np.zeros(int(quiet_s * RATE), np.int16)])
    return [audio[i:i + RATE // 50] for i in range(0, len(audio), RATE // 50)]     # 20 ms pieces


async def until(events, kind, timeout=10.0, collected=None):
    collected = [] if collected is None else collected
    async def run():
        async for event in events:
            collected.append(event)
            if isinstance(event, kind):
                return event
    return await asyncio.wait_for(run(), timeout)


def test_a_turn_and_a_barge_in_over_the_realtime_protocol():
    async def main():
        async with RealtimePeer(reply_s=1.0) as peer:
            conversation = RealtimeConversation(RealtimeConfig(peer.url, "test-key"))
            await conversation.start()
            events = conversation.events()
            for piece in speech_then_quiet(0.6, 0.4):
                await conversation.push_user_audio(piece, RATE)
            first = []
            done = await until(events, ReplyDone, collected=first)
            item = next(e.item_id for e in first if isinstance(e, ReplyAudio))
            conversation.played(item, 1000)                            # the avatar played all of it
            for piece in speech_then_quiet(0.4, 0.4):                  # a second question
                await conversation.push_user_audio(piece, RATE)
            second = []
            audio = await until(events, ReplyAudio, collected=second)
            await until(events, ReplyAudio, collected=second)
            conversation.played(audio.item_id, 150)                    # the avatar has played 150 ms of it
            for piece in speech_then_quiet(0.3, 0.0):                  # the caller talks over it
                await conversation.push_user_audio(piece, RATE)
            cut = await until(events, ReplyDone, collected=second)
            await conversation.aclose()
            await asyncio.sleep(0.1)
            return peer, first, done, second, cut, audio

    peer, first, done, second, cut, audio = asyncio.run(main())
    assert not peer.invalid, peer.invalid
    update = peer.received[0]
    assert update.type == "session.update"
    assert update.session.audio.input.format.rate == 24000 and update.session.audio.input.turn_detection.type == \
        "server_vad" and update.session.audio.output.voice == "alloy"
    appended = sum(len(e.audio) for e in peer.received if e.type == "input_audio_buffer.append")
    assert appended > 0
    kinds = [type(e).__name__ for e in first]
    assert kinds[:2] == ["UserSpeech", "UserSpeech"] and kinds[-1] == "ReplyDone" and not done.cancelled
    reply = np.concatenate([e.pcm for e in first if isinstance(e, ReplyAudio)])
    assert len(reply) == 24000 and all(e.sample_rate_hz == 24000 for e in first if isinstance(e, ReplyAudio))
    assert cut.cancelled
    assert any(isinstance(e, UserSpeech) and e.started for e in second)
    assert any(isinstance(e, ClearReply) for e in second), "barge-in clears the avatar's pending reply"
    assert "response.cancel" in peer.types() and peer.truncations == [(audio.item_id, 150)]


def test_beta_event_names_are_understood():
    async def main():
        async with RealtimePeer(reply_s=0.3, beta_names=True) as peer:
            conversation = RealtimeConversation(RealtimeConfig(peer.url, "k"))
            await conversation.start()
            for piece in speech_then_quiet(0.4, 0.4):
                await conversation.push_user_audio(piece, RATE)
            collected = []
            await until(conversation.events(), ReplyDone, collected=collected)
            await conversation.aclose()
            return collected

    collected = asyncio.run(main())
    assert sum(len(e.pcm) for e in collected if isinstance(e, ReplyAudio)) == int(0.3 * 24000)


def test_an_invalid_or_error_event_ends_the_conversation_naming_it():
    async def main(raw):
        async with RealtimePeer() as peer:
            peer.inject = [raw]
            conversation = RealtimeConversation(RealtimeConfig(peer.url, "k"))
            await conversation.start()
            with pytest.raises(ConversationError) as info:
                await until(conversation.events(), ReplyDone, timeout=5)
            await conversation.aclose()
            return str(info.value)

    bad = asyncio.run(main({"type": "response.output_audio.delta", "event_id": "x", "delta": "AAAA"}))
    assert "invalid 'response.output_audio.delta' event" in bad
    error = asyncio.run(main({"type": "error", "event_id": "y", "error": {"type": "invalid_request_error",
                                                                         "message": "model not found"}}))
    assert error == "the realtime LLM reported an error: invalid_request_error: model not found"


def test_an_absent_peer_or_a_missing_key_fails_clearly():
    url = f"ws://127.0.0.1:{free_port()}/v1"

    async def main():
        with pytest.raises(ConversationError) as info:
            await RealtimeConversation(RealtimeConfig(url, "k"), connect_timeout_s=3).start()
        return str(info.value)

    assert asyncio.run(main()).startswith(f"the realtime LLM at {url} did not answer")
    with pytest.raises(ConversationError, match="without a key"):
        RealtimeConfig.from_settings("wss://x/v1", env={})
    assert RealtimeConfig.from_settings(env={}) is None
