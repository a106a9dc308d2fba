"""A conversation session through the real ingress and workers, the LLM a local peer speaking the OpenAI Realtime
protocol: the caller's speech goes to the LLM, the avatar answers with the LLM's voice (the reply is in the video
chunks' audio), the turn events arrive in order with the turn latency, and a caller talking over the reply cuts it
(the LLM is told where); the offline cascade answers a spoken question with its real models; a mode the server
does not offer is refused, naming why."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from services.api import pb
from services.llm.conversation import PcmResampler
from services.llm.offline import CascadeModels, OfflineConfig, missing_packages
from services.serving.llm_bridge import LLMBridge

from services.llm.realtime_peer import RealtimePeer
from ..llm.test_realtime import speech_then_quiet
from .helpers import png
from .recording_transport import GrpcContext
from .test_ingress import Cluster, chunks_of, events_of, redis_url, store  # noqa: F401 (fixtures)


def conversation_request(mode=pb.ConversationOptions.REALTIME) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(reference_image=png(11), conversation=pb.ConversationOptions(mode=mode))


def realtime_cluster(store, peer) -> Cluster:
    return with_bridge(Cluster(store, realtime_url=peer.url, realtime_api_key="test-key"))


def with_bridge(cluster: Cluster) -> Cluster:
    cluster.llm = LLMBridge.func_or_class(cluster.settings)   # the bridge the ingress talks to, reachable here
    cluster.ingress.llm = cluster.transport.handle("LLMBridge", cluster.llm)
    return cluster


async def caller(messages_then_wait):
    """Messages in order; a float waits that long, a callable is called (a fault, at that point of the call)."""
    for item in messages_then_wait:
        if isinstance(item, float):
            await asyncio.sleep(item)
        elif callable(item):
            item()
        else:
            yield item


def audio(pieces):
    return [pb.SessionInput(audio=pb.AudioInput(pcm_s16le=piece.astype("<i2").tobytes(), sample_rate_hz=16000,
                                                channels=1)) for piece in pieces]


def test_the_caller_speaks_and_the_avatar_answers_with_the_llms_voice(store):
    async def main():
        async with RealtimePeer(reply_s=1.0) as peer:
            cluster = realtime_cluster(store, peer)
            context = GrpcContext()
            session = await cluster.ingress.CreateSession(conversation_request(), context)
            assert context.code is None, context.details
            script = [*audio(speech_then_quiet(0.6, 0.5)), 3.0,
                      pb.SessionInput(control=pb.Control(end_of_input=True))]
            outputs, context = await cluster.stream(session, caller(script))
            return peer, outputs, context

    peer, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    kinds = [event.type for event in events_of(outputs)]
    assert kinds.index(pb.Event.USER_SPEECH_STARTED) < kinds.index(pb.Event.USER_SPEECH_ENDED) < \
        kinds.index(pb.Event.REPLY_STARTED), kinds
    (reply_started,) = [event for event in events_of(outputs) if event.type == pb.Event.REPLY_STARTED]
    assert 0 < reply_started.turn_latency_ms < 5000
    chunks = chunks_of(outputs)
    assert chunks and chunks[-1].final and {chunk.sample_rate_hz for chunk in chunks} == {24000}
    voice = np.concatenate([np.frombuffer(chunk.audio_pcm_s16le, "<i2") for chunk in chunks]).astype(np.float64)
    # the tone's samples, wherever they fall: under load a late delta leaves a gap, which moves but does not add voice
    voiced_s = np.sum(np.abs(voice) > 100) / 24000
    assert 0.9 <= voiced_s <= 1.02, f"the avatar's voice is the LLM's 1 s reply, not {voiced_s:.2f} s"
    assert peer.types()[0] == "session.update" and "input_audio_buffer.append" in peer.types()


def test_a_caller_talking_over_the_reply_cuts_it_and_the_llm_is_told_where(store):
    async def main():
        async with RealtimePeer(reply_s=3.0, speedup=5.0) as peer:     # the reply arrives well ahead of playback
            cluster = realtime_cluster(store, peer)
            context = GrpcContext()
            session = await cluster.ingress.CreateSession(conversation_request(), context)
            script = [*audio(speech_then_quiet(0.6, 0.5)), 2.2, *audio(speech_then_quiet(0.4, 0.0)), 2.0,
                      pb.SessionInput(control=pb.Control(end_of_input=True))]
            outputs, context = await cluster.stream(session, caller(script))
            return peer, outputs, context

    peer, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    ((item, played_ms),) = peer.truncations       # the LLM had finished; the avatar had not
    assert 0 < played_ms < 3000, played_ms
    voice = np.concatenate([np.frombuffer(c.audio_pcm_s16le, "<i2") for c in chunks_of(outputs)]).astype(float)
    loud = np.sqrt(np.mean(voice[: len(voice) // 2400 * 2400].reshape(-1, 2400) ** 2, axis=1)) > 1000
    assert loud.sum() / 10 < 2.5, "the rest of the 3 s reply was not spoken"


def test_with_two_characters_the_replies_take_turns_and_one_mouth_moves_at_a_time(store):
    halves = [pb.Character(region=pb.Region(x0=0.0, y0=0.0, x1=0.5, y1=1.0)),
              pb.Character(region=pb.Region(x0=0.5, y0=0.0, x1=1.0, y1=1.0))]

    async def main():
        async with RealtimePeer(reply_s=0.8, speedup=2.0) as peer:
            cluster = realtime_cluster(store, peer)
            context = GrpcContext()
            request = conversation_request()
            request.characters.extend(halves)
            request.conversation.reply_characters.extend([1, 0])     # the right one answers first
            session = await cluster.ingress.CreateSession(request, context)
            assert context.code is None, context.details
            script = [*audio(speech_then_quiet(0.6, 0.5)), 2.5, *audio(speech_then_quiet(0.6, 0.5)), 2.5,
                      *audio(speech_then_quiet(0.6, 0.5)), 2.5, pb.SessionInput(control=pb.Control(end_of_input=True))]
            outputs, context = await cluster.stream(session, caller(script))
            return cluster, outputs, context

    cluster, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    started = [event for event in events_of(outputs) if event.type == pb.Event.REPLY_STARTED]
    assert [event.character for event in started] == [1, 0, 1], [event.message for event in started]
    # what the score model was told, latent frame by latent frame (the audio token of the frame's own last video
    # frame, 4f): at most one character speaking (between replies none: the avatar listens), 1 then 0 then 1
    dit = cluster.settings.preset_config.dit
    own = dit.temporal_compression * (dit.audio_lookahead_latent_frames + 1) - 1
    speaking = np.concatenate([call.values[0].speaking[0, :, :, own].numpy()
                               for call in cluster.transport.to("ScoreWorkerGroup", "generate")], axis=1)[:, 1:]
    speaking = speaking[:, :np.flatnonzero(speaking.any(axis=0))[-1] + 1]    # not the padding past the audio's end
    assert (speaking.sum(axis=0) <= 1).all(), speaking.astype(int)
    assert (speaking.sum(axis=0) == 0).any(), "between the replies no one speaks"
    who = speaking.argmax(axis=0)[speaking.any(axis=0)]
    turns = [int(who[0])] + [int(b) for a, b in zip(who, who[1:]) if a != b]
    assert turns == [1, 0, 1], who


def test_conversation_modes_the_server_does_not_offer_are_refused(store):
    async def main():
        cluster = Cluster(store, offline_conversation=False)
        results = []
        for mode in (pb.ConversationOptions.REALTIME, pb.ConversationOptions.OFFLINE, 7):
            context = GrpcContext()
            await cluster.ingress.CreateSession(conversation_request(mode), context)
            results.append((context.code, context.details))
        return results

    (realtime, offline, unknown) = asyncio.run(main())
    assert realtime[0] == grpc.StatusCode.FAILED_PRECONDITION and "no realtime LLM configured" in realtime[1]
    assert offline[0] == grpc.StatusCode.FAILED_PRECONDITION and "offline_conversation is off" in offline[1]
    assert unknown[0] == grpc.StatusCode.INVALID_ARGUMENT and "allowed REALTIME (1), OFFLINE (2)" in unknown[1]


def test_in_a_conversation_the_turns_decide_who_speaks_not_the_caller(store):
    async def main():
        cluster = Cluster(store)
        request = conversation_request(pb.ConversationOptions.OFFLINE)
        request.characters.extend([pb.Character(), pb.Character()])
        context = GrpcContext()
        session = await cluster.ingress.CreateSession(request, context)
        assert context.code is None, context.details
        update = GrpcContext()
        await cluster.ingress.UpdateSession(pb.UpdateSessionRequest(
            session_id=session.session_id, session_token=session.session_token,
            speaking=[pb.SpeakingState(character=1, speaking=False)]), update)
        return update

    update = asyncio.run(main())
    assert update.code == grpc.StatusCode.FAILED_PRECONDITION and "the turns decide who speaks" in update.details


@pytest.mark.skipif(bool(missing_packages()), reason=f"the cascade needs {missing_packages()}")
def test_the_offline_cascade_answers_a_spoken_question_through_the_avatar(store):
    models = CascadeModels.shared(OfflineConfig.from_settings())
    speech = PcmResampler(16000).convert(models.speak("What is the capital of France?", noise=False), 24000)
    pieces = [speech[i:i + 320] for i in range(0, len(speech), 320)] + [np.zeros(320, np.int16)] * 50

    async def main():
        cluster = with_bridge(Cluster(store))
        context = GrpcContext()
        session = await cluster.ingress.CreateSession(conversation_request(pb.ConversationOptions.OFFLINE), context)
        assert context.code is None, context.details
        script = [*[m for piece in audio(pieces) for m in (piece, 0.02)], 8.0,
                  pb.SessionInput(control=pb.Control(end_of_input=True))]
        return await cluster.stream(session, caller(script))

    outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    kinds = [event.type for event in events_of(outputs)]
    assert kinds.index(pb.Event.USER_SPEECH_STARTED) < kinds.index(pb.Event.USER_SPEECH_ENDED) < \
        kinds.index(pb.Event.REPLY_STARTED), kinds
    chunks = chunks_of(outputs)
    voice = np.concatenate([np.frombuffer(chunk.audio_pcm_s16le, "<i2") for chunk in chunks]).astype(np.float64)
    loud = np.sqrt(np.mean(voice[: len(voice) // 2400 * 2400].reshape(-1, 2400) ** 2, axis=1)) > 1000
    assert loud.sum() >= 10, "the avatar speaks the cascade's answer (at least a second of it)"


QUESTION = speech_then_quiet(0.6, 0.5)
FIRST_EXCHANGE = [{"role": "user", "text": "question 1"}, {"role": "assistant", "text": "answer 1"}]


def bridge_dies(cluster):
    """The LLMBridge replica is lost with its conversations, a fresh one takes its place (as Serve starts one)."""
    def kill() -> None:
        old, cluster.llm = cluster.llm, LLMBridge.func_or_class(cluster.settings)
        cluster.ingress.llm.target = cluster.llm
        for session_id in old.session_ids():
            asyncio.ensure_future(old.close(session_id))
    return kill


def test_when_the_llm_bridge_dies_the_conversation_is_reopened_knowing_what_was_said(store):
    """The bridge is lost after the first exchange: the call goes on (RESUMED naming LLMBridge, no error), the new
    conversation is given the first exchange as items before the caller's next words, the second question is
    answered, and the session record holds the whole history."""
    async def main():
        async with RealtimePeer(reply_s=1.0, speedup=2.0) as peer:
            cluster = realtime_cluster(store, peer)
            context = GrpcContext()
            session = await cluster.ingress.CreateSession(conversation_request(), context)
            assert context.code is None, context.details
            script = [*audio(QUESTION), 3.0, bridge_dies(cluster), 1.5, *audio(QUESTION), 3.0,
                      pb.SessionInput(control=pb.Control(end_of_input=True))]
            outputs, context = await cluster.stream(session, caller(script))
            return peer, outputs, context, store.get(session.session_id)

    peer, outputs, context, record = asyncio.run(main())
    assert context.code is None, context.details
    events = events_of(outputs)
    resumed = [event for event in events if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and "LLMBridge" in resumed[0].message and "2 messages" in resumed[0].message, \
        [event.message for event in events]
    assert [event.type for event in events].count(pb.Event.REPLY_STARTED) == 2
    assert peer.items == [[], [("user", "question 1"), ("assistant", "answer 1")]]
    assert record.conversation["history"] == FIRST_EXCHANGE + [{"role": "user", "text": "question 2"},
                                                               {"role": "assistant", "text": "answer 2"}]
    assert chunks_of(outputs)[-1].final


def test_a_caller_reattaching_through_another_ingress_finds_the_conversation_where_it_was(store):
    """The stream breaks after the first exchange; the caller re-attaches through another ingress replica, whose
    conversation starts from the session's history, and the next question is answered."""
    async def main():
        async with RealtimePeer(reply_s=1.0, speedup=2.0) as peer:
            cluster = realtime_cluster(store, peer)
            context = GrpcContext()
            session = await cluster.ingress.CreateSession(conversation_request(), context)
            first = asyncio.ensure_future(cluster.stream(session, caller([*audio(QUESTION), 60.0])))
            for _ in range(100):
                if len(store.get(session.session_id).conversation.get("history", [])) == 2:
                    break
                await asyncio.sleep(0.1)
            first.cancel()                                            # the connection is gone
            await asyncio.gather(first, return_exceptions=True)
            cluster.ingress = cluster.replica()                       # the caller comes back elsewhere
            cluster.ingress.llm = cluster.transport.handle("LLMBridge", cluster.llm)
            resume = store.get(session.session_id).chunks_emitted
            script = [*audio(QUESTION), 3.0, pb.SessionInput(control=pb.Control(end_of_input=True))]
            outputs, context = await cluster.stream(session, caller(script), resume_from_chunk=resume)
            return peer, outputs, context

    peer, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    assert peer.items[-1] == [("user", "question 1"), ("assistant", "answer 1")]
    assert pb.Event.REPLY_STARTED in [event.type for event in events_of(outputs)]
