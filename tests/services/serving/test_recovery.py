"""A worker replica replaced mid-stream (what Serve does after one dies): the ingress restores the session on the
replacement from the snapshots in Redis, resubmits from the first chunk that did not arrive, tells the client with
RESUMED, and the video equals the engine's — in process, with the real worker classes behind recording handles.
The same with real replicas killed in a real Ray cluster: tests/services/serving/test_cluster.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from model_core.engine import AvatarEngine
from services.api import pb
from services.serving.audio_encoder import AudioEncoder
from services.serving.score_group import ScoreWorkerGroup
from services.serving.vae_decoder import VAEDecoder
from tests.model_core.helpers import speech

from .helpers import engine_jpegs, pcm16, png
from .test_ingress import Cluster, audio_messages, chunks_of, events_of, redis_url, store  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def engine():
    return AvatarEngine.from_preset("tiny", seed=0)


def _replace(cluster: Cluster, deployment: str) -> None:
    """Point the ingress's handle at a fresh instance of the deployment (a replacement replica: no sessions)."""
    settings, transport = cluster.settings, cluster.transport
    fresh = {"AudioEncoder": lambda: AudioEncoder.func_or_class(settings, put=transport.put),
             "ScoreWorkerGroup": lambda: ScoreWorkerGroup.func_or_class(settings),
             "VAEDecoder": lambda: VAEDecoder.func_or_class(settings)}[deployment]()
    handle = {"AudioEncoder": cluster.ingress.audio, "ScoreWorkerGroup": cluster.ingress.score,
              "VAEDecoder": cluster.ingress.decoder}[deployment]
    handle.target = fresh


def _stream_replacing(cluster: Cluster, session, pcm, deployment: str, after_messages: int):
    messages = audio_messages(pcm)

    async def scripted():
        for index, message in enumerate(messages):
            if index == after_messages:
                _replace(cluster, deployment)
            yield message
            await asyncio.sleep(0.005)

    return cluster.stream(session, scripted())


@pytest.mark.parametrize("deployment, after_messages", [("AudioEncoder", 40), ("ScoreWorkerGroup", 40),
                                                        ("VAEDecoder", 40), ("VAEDecoder", 120)])
def test_a_replica_replaced_mid_stream_resumes_the_session_with_the_engines_frames(store, engine, deployment,
                                                                                   after_messages):
    """VAEDecoder after 120 messages (4.8 s): past its first decode-cache checkpoint (chunk 8), so the replacement
    loads the checkpoint and decodes the chunks since again; after 40, from the start."""
    image, pcm = png(11), pcm16(speech(5.0, seed=31))

    async def main():
        cluster = Cluster(store)
        session = await cluster.create(image)
        return await _stream_replacing(cluster, session, pcm, deployment, after_messages=after_messages)

    outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    chunks = chunks_of(outputs)
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks))) and chunks[-1].final
    resumed = [event for event in events_of(outputs) if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and deployment in resumed[0].message, [event.message for event in resumed]
    assert 1 <= resumed[0].next_chunk_index < len(chunks)
    assert [b"".join(chunk.frames) for chunk in chunks] and \
        [frame for chunk in chunks for frame in chunk.frames] == engine_jpegs(engine, image, pcm)


def test_without_snapshots_a_lost_session_ends_with_data_loss_naming_why(store):
    async def main():
        cluster = Cluster(store, resume_snapshots=False)
        session = await cluster.create(png(12))
        outputs, context = await _stream_replacing(cluster, session, pcm16(speech(2.0, seed=32)), "ScoreWorkerGroup",
                                                   after_messages=20)
        return outputs, context, store.get(session.session_id).state

    outputs, context, state = asyncio.run(main())
    assert context.code == grpc.StatusCode.DATA_LOSS, (context.code, context.details)
    assert "snapshots are off" in context.details
    assert state.value == "FAILED"


class NeverReplaced:
    """A deployment whose replica died and is never replaced: every call fails as a dead actor's does."""

    def __getattr__(self, name):
        def call(*args, **kwargs):
            import ray.exceptions

            raise ray.exceptions.ActorDiedError()
        return call


def test_a_worker_that_never_comes_back_ends_the_stream_unavailable_in_seconds_not_a_hang(store):
    """The score replica dies and nothing takes its place: the stream retries for `fault_recovery_s` (2 s here),
    then ends with UNAVAILABLE saying so; the client is not left waiting."""
    import time

    async def main():
        cluster = Cluster(store, fault_recovery_s=2.0)
        session = await cluster.create(png(13))
        messages = audio_messages(pcm16(speech(3.0, seed=33)))

        async def scripted():
            for index, message in enumerate(messages):
                if index == 30:
                    cluster.ingress.score.target = NeverReplaced()
                yield message
                await asyncio.sleep(0.005)

        began = time.monotonic()
        outputs, context = await cluster.stream(session, scripted())
        return outputs, context, time.monotonic() - began

    outputs, context, took = asyncio.run(main())
    assert context.code == grpc.StatusCode.UNAVAILABLE, (context.code, context.details)
    assert "no replacement took the session over within" in context.details
    assert took < 20, f"the stream took {took:.0f} s to give up"
    assert chunks_of(outputs), "the chunks before the fault were delivered"


def test_a_retried_push_is_neither_applied_twice_nor_loses_its_tickets(store):
    """A push whose answer was lost (the replica died after saving) is sent again with the same offset: the samples
    are not added twice, and the tickets it cut come back (from the replacement's restored copy too)."""
    cluster = Cluster(store)
    stream = cluster.settings.stream_defaults()
    pcm = pcm16(speech(1.2, seed=33))
    cluster.audio.open("retry", stream, 1)
    first = cluster.audio.push("retry", pcm, 16000, 0, None, 0, 0)
    again = cluster.audio.push("retry", pcm, 16000, 0, None, 0, 0)
    assert first and [t.chunk_index for t in again] == [t.chunk_index for t in first]
    assert cluster.audio.state("retry")["samples_received"] == pcm.shape[0]
    replacement = AudioEncoder.func_or_class(cluster.settings, put=cluster.transport.put)
    assert replacement.restore("retry")["restored"] is True
    restored = replacement.push("retry", pcm, 16000, 0, None, 0, 0)
    assert [t.chunk_index for t in restored] == [t.chunk_index for t in first]
    assert [t.audio_pcm_s16le for t in restored] == [t.audio_pcm_s16le for t in first]
    assert replacement.state("retry")["samples_received"] == pcm.shape[0]
    cluster.audio.close("retry")


def test_a_session_whose_workers_were_all_replaced_while_detached_resumes_on_reattach(store, engine):
    """No stream was attached when every worker replica was replaced (or the session moved to other replicas): the
    re-attach finds it nowhere, restores it on the replacements from its latest snapshots and goes on; every chunk
    either stream delivered equals the engine's, and a chunk that cannot be resent is named in a WARNING."""
    from services.media import decode_image_bytes, image_to_tensor
    from services.serving.vae_decoder import encode_jpeg

    image, pcm = png(12), pcm16(speech(3.0, seed=33))
    messages = audio_messages(pcm)
    half = len(messages) // 2

    async def main():
        cluster = Cluster(store)
        session = await cluster.create(image)
        first, _ = await cluster.stream(session, messages[:half])     # the client goes away mid-speech
        for deployment in ("AudioEncoder", "ScoreWorkerGroup", "VAEDecoder"):
            _replace(cluster, deployment)
        second, context = await asyncio.wait_for(
            cluster.stream(session, messages[half:], resume_from_chunk=len(chunks_of(first))), 120)
        return first, second, context

    first, second, context = asyncio.run(main())
    assert context.code is None, context.details
    sid = engine.open_session(image_to_tensor(decode_image_bytes(image), 64, 64), "")
    expected = [encode_jpeg(chunk.frames, 90) for chunk in engine.push_audio(sid, pcm, 16000) + engine.end_input(sid)]
    delivered = chunks_of(first) + chunks_of(second)
    indices = [chunk.chunk_index for chunk in delivered]
    assert indices == sorted(set(indices)) and delivered[-1].final and indices[-1] == len(expected) - 1
    assert len(chunks_of(first)) >= 2 and chunks_of(second)
    for chunk in delivered:
        assert list(chunk.frames) == expected[chunk.chunk_index], chunk.chunk_index
    gap = sorted(set(range(len(expected))) - set(indices))
    warnings = [event.message for event in events_of(second) if event.type == pb.Event.WARNING]
    assert not gap or any(f"chunks {gap[0]} to {gap[-1]}" in message for message in warnings), (gap, warnings)


def test_a_score_replica_the_decoder_cannot_link_with_sends_its_latents_in_the_messages(store, engine):
    """latent_transport 'collective', but the decoder refuses the link (on CPU it already holds another replica's live
    gloo link): the score replica says so in its log and sends each chunk's latents in the message; the session
    streams the engine's frames."""
    from services.serving.latent_link import LinkError

    class Refusing:
        def prepare_latent_link(self, backend):
            raise LinkError("VAEDecoder already receives latent link 'facecast-latents-x', and gloo allows one group "
                            "per process")

    image, pcm = png(14), pcm16(speech(2.0, seed=34))

    async def main():
        cluster = Cluster(store, latent_transport="collective")
        cluster.score.decoder_handle = cluster.transport.handle("VAEDecoder", Refusing())
        session = await cluster.create(image)
        outputs, context = await cluster.stream(session, audio_messages(pcm))
        return cluster, outputs, context

    cluster, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    chunks = chunks_of(outputs)
    assert chunks[-1].final and cluster.decoder.latent_stats()["arrived"] == {"message": len(chunks), "link": 0}
    assert [frame for chunk in chunks for frame in chunk.frames] == engine_jpegs(engine, image, pcm)
