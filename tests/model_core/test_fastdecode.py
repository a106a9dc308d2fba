"""The fast streaming decoder (model_core/fastdecode.py) and its distillation stage: a stream decoded chunk by chunk
equals the clip decoded whole, the frame counts are the full VAE's, batched streams equal single ones, the saved
decoder loads, and on a `tiny` latent cache the distillation's loss falls."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from model_core.config import get_preset
from model_core.fastdecode import FastDecoder, FastDecoderConfig
from model_core.vae import StreamingVAE, stream_decode

TINY = get_preset("tiny")


def decoder(seed: int = 0) -> FastDecoder:
    torch.manual_seed(seed)
    return FastDecoder(FastDecoderConfig(channels=(16, 12, 8, 8), blocks=(1, 1, 1))).eval()


def test_a_stream_decoded_chunk_by_chunk_equals_the_clip_decoded_whole():
    model = decoder()
    latents = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = model.decode(latents)
    assert whole.shape == (1, 3, 1 + 4 * 8, 64, 64)
    cache, pieces = model.new_decode_cache(), []
    for start, stop in ((0, 1), (1, 4), (4, 7), (7, 9)):
        frames, cache = model.decode_chunk(latents[:, :, start:stop], cache)
        assert frames.shape[2] == model.frames_for_latents(start, stop - start)
        pieces.append(frames)
    torch.testing.assert_close(torch.cat(pieces, 2), whole, atol=1e-5, rtol=1e-5)
    # the memory matters: the same chunk decoded from a fresh stream (past started) differs
    fresh = model.new_decode_cache()
    fresh.started = True
    alone, _ = model.decode_chunk(latents[:, :, 4:7], fresh)
    assert not torch.allclose(alone, whole[:, :, model.frames_for_latents(0, 4):model.frames_for_latents(0, 7)],
                              atol=1e-3)


def test_frame_counts_are_the_full_vaes():
    model, full = decoder(), StreamingVAE.from_config(TINY.vae, seed=0)
    for first, count in ((0, 1), (0, 3), (3, 3), (1, 2)):
        assert model.frames_for_latents(first, count) == full.frames_for_latents(first, count)


def test_batched_streams_equal_each_stream_alone():
    model = decoder()
    generator = torch.Generator().manual_seed(2)
    clips = [torch.randn(1, 16, 7, 8, 8, generator=generator) for _ in range(3)]
    caches = [model.new_decode_cache() for _ in clips]
    alone = [model.decode(clip) for clip in clips]
    got = [[] for _ in clips]
    for start, stop in ((0, 1), (1, 4), (4, 7)):
        for row, (frames, _) in enumerate(model.decode_chunk_batch([clip[:, :, start:stop] for clip in clips],
                                                                   caches)):
            got[row].append(frames)
    for row, frames in enumerate(got):
        torch.testing.assert_close(torch.cat(frames, 2), alone[row], atol=1e-5, rtol=1e-5)


def test_the_saved_decoder_loads_and_a_missing_one_names_the_command(tmp_path):
    model = decoder(3)
    model.save_pretrained(tmp_path / "fast", {"vae_digest": "abc"})
    loaded = FastDecoder.from_pretrained(tmp_path / "fast")
    assert loaded.config == model.config
    assert json.loads((tmp_path / "fast" / "fast-decoder.json").read_text())["vae_digest"] == "abc"
    latents = torch.randn(1, 16, 3, 8, 8)
    torch.testing.assert_close(loaded.decode(latents), model.half().float().decode(latents), atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="facecast train fast-decoder"):
        FastDecoder.from_pretrained(tmp_path / "nothing")


def test_bad_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="channels=.*blocks="):
        FastDecoderConfig(channels=(8, 8, 8))


needs_espeak = pytest.mark.skipif(not __import__("model_core.world.speech", fromlist=["x"]).espeak_available(),
                                  reason="libespeak-ng missing: run `make espeak-ng`")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A `tiny` latent cache of two world clips and the VAE it was encoded with: (vae, LatentSource)."""
    from model_core.audio import AudioConfig, AudioFrontend
    from model_core.training.latents import LatentSource, build_latent_cache
    from model_core.world.split import WorldSplit
    from model_core.world.store import WorldSource

    source = WorldSource(WorldSplit(0), "train", 2, 64)

    class Listed:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return source[index]

    vae = StreamingVAE.from_config(TINY.vae, seed=0)
    path = tmp_path_factory.mktemp("fast") / "latents"
    build_latent_cache(Listed(), vae, AudioFrontend(AudioConfig()), TINY.dit, path, progress=False)
    return vae, LatentSource(path)


SMALL = dict(channels=(16, 12, 8, 8), blocks=(1, 1, 1))


@needs_espeak
def test_the_distillation_loss_falls_and_the_export_records_its_vae(tmp_path, tiny_cache):
    from model_core.training.fastdecode_stage import FastDecoderStage, FastDecoderTrainConfig
    from model_core.training.latents import vae_digest
    from model_core.training.loop import read_log, run_stage

    vae, latents = tiny_cache
    train = FastDecoderTrainConfig(steps=40, batch_size=1, window_latents=3, learning_rate=3e-3, warmup_steps=5,
                                   latent_jitter=0.0, rollout_share=0.0, **SMALL)
    stage = FastDecoderStage(None, latents, train, vae=vae)
    run_stage(stage, tmp_path / "run", 40, checkpoint_every=20, log_every=5, progress=False,
              export_to=tmp_path / "fast")
    losses = [row["loss"] for row in read_log(tmp_path / "run")]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    exported = json.loads((tmp_path / "fast" / "fast-decoder.json").read_text())
    assert exported["vae_digest"] == vae_digest(vae)
    FastDecoder.from_pretrained(tmp_path / "fast")
    with pytest.raises(ValueError, match="another VAE"):
        other = StreamingVAE.from_config(TINY.vae, seed=1)
        FastDecoderStage(None, latents, train, vae=other)

    # the latent jitter: the same picks, each sample's channels moved by an affine map, and the target decoded from
    # the moved latents (the full decoder's frames for what the fast decoder is shown)
    plain = stage.batch(3, 0)
    moved = FastDecoderStage(None, latents, dataclasses.replace(train, latent_jitter=0.4), vae=vae).batch(3, 0)
    x, y = plain["latents"].flatten(2), moved["latents"].flatten(2)          # [B, C, F*h*w]
    scale = ((y - y.mean(-1, keepdim=True)) * (x - x.mean(-1, keepdim=True))).sum(-1) / \
        ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    offset = y.mean(-1) - scale * x.mean(-1)
    torch.testing.assert_close(y, x * scale[..., None] + offset[..., None], atol=1e-4, rtol=1e-4)
    assert offset.abs().mean() > 0.1 and (scale - 1).abs().mean() > 0.05, (offset, scale)
    z = vae.vae.post_quant_conv(vae.denormalize(moved["latents"]))
    torch.testing.assert_close(moved["target"], stream_decode(vae.vae, z, vae.new_decode_cache()), atol=1e-5, rtol=0)



@needs_espeak
def test_a_share_of_the_samples_are_the_students_own_streams(tmp_path, tiny_cache):
    """With rollout_share 1 every sample is the student's 2-step stream of a cache segment's start (its reference and
    audio), not the segment's encoded truth: another student makes other latents, a step's batch is the same on a
    resume, and the target is the full decoder's stream of those latents. Without a student the share is refused."""
    from model_core.checkpoint import save_facecast_checkpoint
    from model_core.dit import CausalAvatarDiT
    from model_core.training.fastdecode_stage import FastDecoderStage, FastDecoderTrainConfig

    vae, latents = tiny_cache
    students = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        students.append(tmp_path / f"student-{seed}.safetensors")
        save_facecast_checkpoint(CausalAvatarDiT(TINY.dit), students[-1])
    train = FastDecoderTrainConfig(batch_size=3, window_latents=3, rollout_share=1.0, listening_share=0.5, **SMALL)
    stage = FastDecoderStage(None, latents, train, vae=vae, student=students[0], stream=TINY.stream)
    batch = stage.batch(3, 0)
    truth = [latents[i].latents[g, :, :3].float() for i in range(len(latents)) for g in range(latents[i].segments)]
    for sample in batch["latents"]:
        assert all((sample - start).abs().max() > 1e-3 for start in truth), "a student's stream, not the truth"
    torch.testing.assert_close(stage.batch(3, 0)["latents"], batch["latents"], rtol=0, atol=0)
    other = FastDecoderStage(None, latents, train, vae=vae, student=students[1], stream=TINY.stream).batch(3, 0)
    assert (other["latents"] - batch["latents"]).abs().max() > 1e-3, "the samples come from the student"
    z = vae.vae.post_quant_conv(vae.denormalize(batch["latents"]))
    torch.testing.assert_close(batch["target"], stream_decode(vae.vae, z, vae.new_decode_cache()), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="rollout_share=1.0 needs the student"):
        FastDecoderStage(None, latents, train, vae=vae)
    with pytest.raises(ValueError, match="rollout_share=2 is invalid: allowed 0 to 1"):
        FastDecoderTrainConfig(rollout_share=2)


@pytest.mark.parametrize("face", [
    pytest.param("reference", marks=pytest.mark.xfail(strict=True, reason=(
        "the fast decoder draws the world's green flat faces grey (G 0.36 under the full decoder's on the demo face; "
        "on training clips too), though it learns them in 50 steps when shown only them: BENCHMARKS, 'The fast "
        "decoder's colour cast'"))),
    "drawn", "photo"])
def test_the_shipped_fast_decoder_draws_a_stream_in_the_full_decoders_colours(face):
    """The shipped talk128 student streams a face (the demo's green held-out character, a hand-drawn one, a photo)
    for two seconds; the shipped fast decoder's frames of it have the full decoder's colours: the face's mean in each
    channel within 0.1 (of [-1, 1])."""
    from model_core.engine import AvatarEngine
    from model_core.shipped import TRAINED_PRESET
    from services.media import image_to_tensor, load_image

    from .helpers import speech

    engine = AvatarEngine.from_preset(TRAINED_PRESET, seed=0)
    stream = engine.stream_config(seed=0)
    image = image_to_tensor(load_image(f"assets/{face}.png"), stream.width, stream.height)
    frames = {}
    for name in ("full", "fast"):
        session = engine.open_session(image, "", stream, decoder=name)
        chunks = engine.push_audio(session, speech(2.0, seed=1), 16000) + engine.end_input(session)
        engine.close_session(session)
        frames[name] = torch.cat([chunk.frames for chunk in chunks]).clamp(-1, 1)
    h, w = stream.height, stream.width
    box = (slice(None), slice(None), slice(h // 4, h * 7 // 8), slice(w // 4, w * 3 // 4))     # the face
    gap = frames["fast"][box].mean(dim=(0, 2, 3)) - frames["full"][box].mean(dim=(0, 2, 3))
    assert gap.abs().max() < 0.1, f"fast - full, mean R G B of the face: {gap.tolist()}"


def test_each_session_decodes_with_the_decoder_it_chose():
    """An engine with a fast decoder: a fast session's frames are the fast decoder's decode of its latents, a full
    session's the VAE's, in one engine at once; an unknown or missing decoder is refused before any work."""
    from model_core.config import ConfigError
    from model_core.engine import AvatarEngine

    from .helpers import reference_image, speech

    base = AvatarEngine.from_preset("tiny", seed=1)
    fast = decoder(4)
    engine = AvatarEngine(base.preset, base.dit, base.vae, fast_decoder=fast)
    image, audio = reference_image(seed=2), speech(1.2, seed=3)
    sessions = {name: engine.open_session(image, "", engine.stream_config(seed=5), decoder=name)
                for name in ("full", "fast")}
    chunks = {name: engine.push_audio(session, audio, 16000) + engine.end_input(session)
              for name, session in sessions.items()}
    latents = torch.stack([chunk.latents for chunk in chunks["full"]], 0)
    assert torch.equal(latents, torch.stack([chunk.latents for chunk in chunks["fast"]], 0)), "same seed, same DiT"
    clip = torch.cat([chunk.latents for chunk in chunks["full"]], 1)[None]
    for name, want in (("full", base.vae.decode_chunk(clip, base.vae.new_decode_cache())[0]),
                       ("fast", fast.decode(clip))):
        got = torch.cat([chunk.frames for chunk in chunks[name]])
        torch.testing.assert_close(got, want[0].transpose(0, 1)[:len(got)], atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="decoder='slow' is invalid; allowed: full, fast"):
        engine.open_session(image, "", decoder="slow")
    with pytest.raises(ConfigError, match="facecast train fast-decoder"):
        base.open_session(image, "", decoder="fast")
    with pytest.raises(ConfigError, match="decoder"):
        engine.stream_config(decoder="slow")
