"""The teacher's data and stage: latents and audio windows as a session sees them, a cache that refuses another VAE,
a `tiny` teacher whose loss decreases, and many-step sampling with classifier-free guidance on the audio."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from model_core.audio import AudioConfig, AudioFrontend
from model_core.audio_stage import AudioStage
from model_core.config import get_preset
from model_core.training.latents import (LatentSource, audio_windows, build_latent_cache, character_regions,
                                         encode_clip, speaker_tracks, vae_digest)
from model_core.training.loop import read_log, run_stage
from model_core.training.teacher_stage import (LatentLipReader, TeacherStage, TeacherTrainConfig, predict_velocity,
                                               sample_batch, sigmas, sync_loss, sync_mask, teacher_sample,
                                               text_states)
from model_core.vae import StreamingVAE
from model_core.world.speech import espeak_available
from model_core.world.split import WorldSplit
from model_core.world.store import WorldSource

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")
TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def world():
    source = WorldSource(WorldSplit(0), "train", 2, 64)
    return [source[0], source[1]]


@pytest.fixture(scope="module")
def vae():
    return StreamingVAE.from_config(TINY.vae, seed=0)


@pytest.fixture(scope="module")
def latent_clips(world, vae):
    frontend = AudioFrontend(AudioConfig())
    return [encode_clip(clip, vae, frontend, TINY.dit) for clip in world]


def audible(dit):
    """A fresh DiT's audio value projection starts at zero (audio changes nothing); give it weights."""
    for layer in dit.blocks:
        torch.nn.init.normal_(layer.attn2.audio_v_proj.weight, std=0.2)
    return dit


class Listed:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_audio_windows_are_what_a_session_feeds_the_model(world):
    """Training must see each latent frame's audio exactly as `AudioStage` cuts a stream (held against the stage
    itself, pushed in uneven pieces, over the whole clip including the silence past its end)."""
    clip = world[0]
    stage = AudioStage(AudioConfig(), TINY.dit)
    session = stage.open("s", TINY.stream, 1)
    inputs = []
    for start in range(0, len(clip.audio), 3001):
        inputs += stage.push(session, clip.audio[start:start + 3001], clip.sample_rate)
    inputs += stage.end(session)
    streamed = torch.cat([item.features[0] for item in inputs], dim=1)        # [K, F, T, D]
    streamed_speaking = torch.cat([item.speaking[0] for item in inputs], dim=1)
    features = AudioFrontend(AudioConfig()).encode(clip.audio, clip.sample_rate)[None]
    speaking = torch.ones(features.shape[:2], dtype=torch.bool)
    windows, talk = audio_windows(features, speaking, 0, streamed.shape[1], 4, TINY.dit.audio_window)
    torch.testing.assert_close(windows, streamed, atol=1e-5, rtol=0)
    assert torch.equal(talk, streamed_speaking)
    # a window starting later is the same rows
    later, _ = audio_windows(features, speaking, 5, 3, 4, TINY.dit.audio_window)
    torch.testing.assert_close(later, streamed[:, 5:8], atol=1e-5, rtol=0)


def test_encoded_segments_line_up_with_their_video(latent_clips, world, vae):
    clip, encoded = world[0], latent_clips[0]
    assert encoded.segment_latents == 9 and encoded.segments >= 2
    assert all(int(s) % 4 == 0 and int(s) + 33 <= clip.num_frames for s in encoded.starts)
    assert encoded.features.shape[1] == clip.num_frames
    # a segment is what encoding its 33 frames on their own gives (a session starting there)
    start = int(encoded.starts[1])
    from model_core.training.data import frames_to_tensor
    with torch.no_grad():
        alone = vae.normalize(vae.vae.encode(frames_to_tensor(clip.frames[start:start + 33])[None]).latent_dist.mean)
    torch.testing.assert_close(encoded.latents[1].float(), alone[0], atol=2e-2, rtol=1e-2)
    # the mouth weight sits in the lower half of the face box, never above it
    rows = encoded.mouth[1].float().mean(dim=(0, 2))
    box = clip.truth.face_box[start, 0] / 64 * encoded.mouth.shape[2]
    assert rows[: int(box[1])].sum() == 0 and rows.sum() > 0
    # latent frame f's opening is the truth's over the video frames it shows: frame 0 alone, then [4f-3, 4f]
    truth = clip.truth.mouth_open[start:start + 33, 0]
    assert encoded.opening.shape == (1, encoded.segments, 9)
    assert abs(float(encoded.opening[0, 1, 0]) - truth[0]) < 1e-3
    for f in (1, 5, 8):
        assert abs(float(encoded.opening[0, 1, f]) - truth[4 * f - 3:4 * f + 1].mean()) < 1e-3


def test_a_scene_splits_its_audio_at_the_turns_and_its_frame_between_faces():
    class Scene:  # two speakers: 0 talks first, then 1
        audio = np.ones(16000, np.float32)
        sample_rate = 16000
        meta = {"turns": [{"speaker": 0, "start_s": 0.2}, {"speaker": 1, "start_s": 0.6}]}

        class truth:
            mouth_open = np.zeros((25, 2))

    tracks = speaker_tracks(Scene)
    assert tracks[0, :9600].all() and not tracks[0, 9600:].any()
    assert tracks[1, 9600:].all() and not tracks[1, :9600].any()
    boxes = np.array([[[70, 10, 110, 60], [10, 10, 50, 60]]], np.float32)  # slot 0 on the right
    regions = character_regions(boxes, 128, (4, 4)).view(2, 4, 4)
    assert regions[0, :, 2:].all() and not regions[0, :, :2].any()
    assert regions[1, :, :2].all() and not regions[1, :, 2:].any()


def test_latent_cache_resumes_and_refuses_another_vae(world, vae, tmp_path):
    frontend = AudioFrontend(AudioConfig())
    build_latent_cache(Listed(world), vae, frontend, TINY.dit, tmp_path, progress=False)
    cache = LatentSource(tmp_path)
    assert len(cache) == 2 and cache[1].segments > 0
    cache.check_vae(vae)
    other = StreamingVAE.from_config(TINY.vae, seed=1)
    with pytest.raises(ValueError, match="another VAE"):
        cache.check_vae(other)
    with pytest.raises(ValueError, match="another VAE"):
        build_latent_cache(Listed(world), other, frontend, TINY.dit, tmp_path, progress=False)
    # ... and another audio front end: its features are not what a model of that front end reads
    cache.check_frontend("logmel")
    with pytest.raises(ValueError, match="'logmel' audio front end's features, not 'whisper-ct2'"):
        cache.check_frontend("whisper-ct2")
    with pytest.raises(ValueError, match="audio front end"):
        build_latent_cache(Listed(world), vae, AudioFrontend(AudioConfig(subframes=2)), TINY.dit, tmp_path,
                           progress=False)
    # a cache of an older layout (no openings) is refused with what to do, before anything reads it
    import json
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, version=1)))
    with pytest.raises(ValueError, match="version-1 latent cache.*rebuild it"):
        LatentSource(tmp_path)


def test_the_latent_space_digest_is_the_encoders_not_the_decoders(vae):
    """A decoder trained further keeps the latent space (and every cache and DiT trained in it); a changed encoder
    or changed latent statistics name another one."""
    digest = vae_digest(vae)
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        next(changed.vae.decoder.parameters()).add_(1.0)
        changed.vae.post_quant_conv.weight.add_(1.0)
    assert vae_digest(changed) == digest
    with torch.no_grad():
        next(changed.vae.encoder.parameters()).add_(1.0)
    assert vae_digest(changed) != digest
    restated = copy.deepcopy(vae)
    restated.vae.register_to_config(latents_std=[2.0 * s for s in vae.vae.config.latents_std])
    assert vae_digest(restated) != digest


def test_teacher_loss_decreases_and_exports(latent_clips, tmp_path):
    stage = TeacherStage(TINY.dit, Listed(latent_clips),
                         TeacherTrainConfig(batch_size=4, frames=5, learning_rate=2e-3, warmup_steps=5))
    run_stage(stage, tmp_path, 60, log_every=10, progress=False, export_to=tmp_path / "teacher.safetensors")
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert losses[-1] < 0.8 * losses[0], losses
    from model_core.checkpoint import load_facecast_checkpoint

    loaded, metadata, _ = load_facecast_checkpoint(tmp_path / "teacher.safetensors")
    assert metadata["stage"] == "teacher" and metadata["train"]["frames"] == 5
    torch.testing.assert_close(loaded.proj_out.weight, stage.ema.proj_out.weight.half().float())


def test_the_rate_holds_or_falls_to_zero_at_the_runs_end(latent_clips):
    """Phase settle's rate: warm-up, then a linear fall to 0 at the run's last step (figures worked by hand); the
    default holds after the warm-up; a fall without the run's length, or outside [0, 1], is refused."""
    def rates(config, at):
        stage = TeacherStage(TINY.dit, Listed(latent_clips), config)
        seen = []
        for step in at:
            stage.loss(stage.batch(step, 0))
            seen.append(stage.optimizer().param_groups[0]["lr"])
        return seen

    settle = TeacherTrainConfig(batch_size=1, frames=5, learning_rate=1e-3, warmup_steps=10, decay_from=0.5,
                                steps=100)
    assert rates(settle, (0, 9, 50, 75, 99)) == pytest.approx([1e-4, 1e-3, 1e-3, 5e-4, 2e-5])
    held = dataclasses.replace(settle, decay_from=1.0)
    assert rates(held, (0, 9, 99)) == pytest.approx([1e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="decay_from=0.5 needs steps"):
        TeacherTrainConfig(decay_from=0.5)
    with pytest.raises(ValueError, match=r"decay_from=1.5 is invalid: a fraction in \[0, 1\]"):
        TeacherTrainConfig(decay_from=1.5, steps=10)


def test_training_further_starts_from_the_checkpoints_weights(latent_clips, tmp_path):
    """`facecast train teacher --init`: the live and EMA weights start as the checkpoint's (the fp16 export), a
    random start would not; a checkpoint of another shape or stage is refused naming what differs."""
    from model_core.checkpoint import save_facecast_checkpoint

    first = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(seed=1))
    first.export(tmp_path / "teacher.safetensors")
    exported = str(tmp_path / "teacher.safetensors")
    further = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(init=exported))
    fresh = TeacherStage(TINY.dit, Listed(latent_clips))
    for model in (further.dit, further.ema):
        torch.testing.assert_close(model.proj_out.weight, first.ema.proj_out.weight.half().float())
    assert not torch.equal(fresh.dit.proj_out.weight, further.dit.proj_out.weight)
    with pytest.raises(ValueError, match=r"shape differs from this run's: ffn_dim 64 \(this run: 96\)"):
        TeacherStage(dataclasses.replace(TINY.dit, ffn_dim=96), Listed(latent_clips), TeacherTrainConfig(init=exported))
    save_facecast_checkpoint(first.dit, tmp_path / "student.safetensors", extra={"stage": "distill"})
    with pytest.raises(ValueError, match="a distill checkpoint, not a teacher"):
        TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(init=str(tmp_path / "student.safetensors")))


def test_a_teacher_grows_into_more_blocks_and_the_audio_injection(latent_clips, tmp_path):
    """Trained further into a bigger shape, the grown teacher starts computing exactly what its checkpoint computes
    (the new blocks' outputs and the injection's at zero), and the new layers train."""
    from model_core.checkpoint import load_facecast_checkpoint

    first = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(seed=1))
    for parameter in first.ema.parameters():    # a teacher whose every layer does something
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    first.export(tmp_path / "teacher.safetensors")
    old = load_facecast_checkpoint(str(tmp_path / "teacher.safetensors"))[0].float()
    grown_shape = dataclasses.replace(TINY.dit, num_layers=3, audio_injection_dim=4)
    grown = TeacherStage(grown_shape, Listed(latent_clips),
                         TeacherTrainConfig(init=str(tmp_path / "teacher.safetensors"), learning_rate=1e-2))
    batch = grown.batch(0, 0)
    noisy = torch.randn_like(batch["x0"])
    with torch.no_grad():
        before = predict_velocity(old, noisy, batch["sigma"], batch, layout="full")
        after = predict_velocity(grown.dit, noisy, batch["sigma"], batch, layout="full")
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert grown.dit.blocks[2].ffn.net[2].weight.abs().max() == 0
    assert grown.dit.blocks[2].attn1.to_q.weight.abs().max() > 0          # the rest of a new block is random
    loss, _ = grown.loss(batch)
    grown.optimizer().zero_grad()
    loss.backward()
    grown.optimizer().step()
    assert grown.dit.blocks[2].ffn.net[2].weight.abs().max() > 0
    assert grown.dit.audio_injection.out.weight.abs().max() > 0
    with pytest.raises(ValueError, match=r"num_layers 2 \(this run: 1\).*may only grow"):
        TeacherStage(dataclasses.replace(TINY.dit, num_layers=1), Listed(latent_clips),
                     TeacherTrainConfig(init=str(tmp_path / "teacher.safetensors")))


def test_a_teacher_grows_into_another_audio_front_end_and_learns_to_hear_it(latent_clips, tmp_path):
    """A new speech encoder (another feature width): every weight but the first audio layer is the checkpoint's, that
    layer starts at zero so the grown teacher is deaf (its velocity does not depend on the new features), and it
    trains. The export records the front end its latents came from."""
    from model_core.checkpoint import AUDIO_FRONTEND_KEY, audio_backend_of, load_facecast_checkpoint
    from model_core.training.teacher_stage import NEW_AUDIO_INPUT

    first = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(seed=1))
    for parameter in first.ema.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    first.export(tmp_path / "teacher.safetensors")
    old = load_facecast_checkpoint(str(tmp_path / "teacher.safetensors"))[0].float().state_dict()
    generator = torch.Generator().manual_seed(0)
    wider = [dataclasses.replace(clip, features=torch.randn(*clip.features.shape[:-1], 24, generator=generator).half())
             for clip in latent_clips]

    class Encoded(Listed):
        manifest = {"frontend": {"backend": "whisper-ct2", "fps": 25.0, "feature_dim": 24}}

    grown = TeacherStage(dataclasses.replace(TINY.dit, audio_dim=24), Encoded(wider),
                         TeacherTrainConfig(init=str(tmp_path / "teacher.safetensors"), learning_rate=1e-2))
    state = grown.dit.state_dict()
    assert state[NEW_AUDIO_INPUT].shape[-1] == 24 and state[NEW_AUDIO_INPUT].abs().max() == 0
    for key, value in old.items():
        if key != NEW_AUDIO_INPUT:
            torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)
    batch = grown.batch(0, 0)
    noisy = torch.randn_like(batch["x0"])
    other = dict(batch, features=torch.randn_like(batch["features"]))
    with torch.no_grad():
        heard = predict_velocity(grown.dit, noisy, batch["sigma"], batch, layout="full")
        torch.testing.assert_close(predict_velocity(grown.dit, noisy, batch["sigma"], other, layout="full"), heard)
    loss, _ = grown.loss(batch)
    grown.optimizer().zero_grad()
    loss.backward()
    grown.optimizer().step()
    assert grown.dit.state_dict()[NEW_AUDIO_INPUT].abs().max() > 0
    grown.export(tmp_path / "hears.safetensors")
    metadata = load_facecast_checkpoint(str(tmp_path / "hears.safetensors"))[1]
    assert metadata[AUDIO_FRONTEND_KEY]["feature_dim"] == 24 and audio_backend_of(metadata) == "whisper-ct2"
    assert audio_backend_of(load_facecast_checkpoint(str(tmp_path / "teacher.safetensors"))[1]) == "logmel"


def test_audio_dropout_is_exactly_no_audio(latent_clips):
    """CFG's unconditional pass (regions zeroed) must equal running without the audio branch."""
    dit = audible(TeacherStage(TINY.dit, Listed(latent_clips)).dit.eval())
    batch = sample_batch(latent_clips, np.random.default_rng(0), 5, TINY.dit, batch_size=2, audio_dropout=0.0,
                         listening_dropout=0.0)
    noisy, sigma = torch.randn_like(batch["x0"]), torch.tensor([0.7, 0.3])
    silent = dict(batch, regions=torch.zeros_like(batch["regions"]))
    with torch.no_grad():
        with_audio = predict_velocity(dit, noisy, sigma, batch, layout="full")
        zeroed = predict_velocity(dit, noisy, sigma, silent, layout="full")
        cond = dit.prepare_conditions(text_states(TINY.dit, 2, "cpu"), dit.reference_tokens(batch["reference"]),
                                      torch.zeros(1))
        timesteps = torch.cat([torch.zeros(2, 1), (sigma * 1000)[:, None].expand(-1, 5)], 1)
        none = dit.forward_full(torch.cat([batch["reference"], noisy], 2), timesteps, cond, None,
                                layout="full")[:, :, 1:]
    torch.testing.assert_close(zeroed, none, atol=1e-5, rtol=0)
    assert (with_audio - none).abs().max() > 1e-3


def test_teacher_sampling_guidance_and_schedule(latent_clips):
    levels = sigmas(12, 3.0)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and all(a > b for a, b in zip(levels, levels[1:]))
    dit = audible(TeacherStage(TINY.dit, Listed(latent_clips)).dit.eval())
    batch = sample_batch(latent_clips, np.random.default_rng(0), 5, TINY.dit, batch_size=1, audio_dropout=0.0,
                         listening_dropout=0.0)
    noise = torch.randn_like(batch["x0"])
    one = teacher_sample(dit, batch, noise, steps=3, guidance=1.0)
    # guidance 1 is the conditional flow alone: three Euler steps by hand
    latents, levels = noise.clone(), sigmas(3, 3.0)
    with torch.no_grad():
        for a, b in zip(levels, levels[1:]):
            latents = latents + (b - a) * predict_velocity(dit, latents, torch.tensor([a]), batch, layout="full")
    torch.testing.assert_close(one, latents, atol=1e-5, rtol=0)
    assert not torch.allclose(teacher_sample(dit, batch, noise, steps=3, guidance=3.0), one)


def test_teacher_video_covers_a_whole_clip(latent_clips, world, vae):
    """`facecast eval --video teacher`: windows the teacher was trained on, joined at their shared frame."""
    from model_core.evaluate import TeacherSampler, reference_render

    dit = TeacherStage(TINY.dit, Listed(latent_clips)).dit
    sampler = TeacherSampler(dit, vae, AudioFrontend(AudioConfig()), steps=2, guidance=1.5)
    clip = world[1]
    reference, _ = reference_render(int(clip.truth.identity[0]), 0, 64)
    video = sampler.video(reference, clip.audio, clip.sample_rate, clip.num_frames)
    assert video.shape == (clip.num_frames, 64, 64, 3) and video.dtype == np.uint8


class Planted:
    """Single-character clips whose openings are a known linear read of the cells around a moving mouth."""

    def __init__(self, count, weight, bias, seed=0, noise=0.0):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(count):
            latents = torch.from_numpy(rng.standard_normal((2, 16, 5, 8, 8))).float()
            mouth = torch.zeros(2, 5, 8, 8)
            for g in range(2):
                for f in range(5):
                    top, left = rng.integers(0, 7, size=2)
                    mouth[g, f, top:top + 2, left:left + 2] = 1.0
            crops = LatentLipReader.crops(latents, mouth)
            opening = crops @ weight + bias + noise * torch.from_numpy(rng.standard_normal((2, 5))).float()
            self.items.append(type("Clip", (), dict(latents=latents, mouth=mouth, opening=opening[None],
                                                    regions=torch.ones(1, 4))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_lip_reader_crops_the_cells_around_the_mouth():
    latents = torch.arange(2 * 16 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 16, 1, 8, 8)
    mouth = torch.zeros(2, 1, 8, 8)
    mouth[0, 0, 5:7, 3:5] = 1.0        # centred on rows 5-6, columns 3-4: crop rows 4..7, columns 2..5
    mouth[1, 0, 7, 0] = 1.0            # in a corner: the crop is clamped inside the grid
    crops = LatentLipReader.crops(latents, mouth).view(2, 1, 16, 4, 4)
    torch.testing.assert_close(crops[0, 0], latents[0, :, 0, 4:8, 2:6])
    torch.testing.assert_close(crops[1, 0], latents[1, :, 0, 4:8, 0:4])


def test_lip_reader_recovers_a_planted_read_out(monkeypatch):
    weight = torch.randn(16 * 16, generator=torch.Generator().manual_seed(1)) * 0.1
    clips = Planted(80, weight, 0.3, noise=0.01)
    monkeypatch.setattr(LatentLipReader, "KEEP", 1.0)            # the best-reading ridge
    reader = LatentLipReader.fit(clips, max_clips=80)
    assert reader.heldout_r > 0.99
    fresh = Planted(1, weight, 0.3, seed=9)[0]
    torch.testing.assert_close(reader.read(fresh.latents, fresh.mouth), fresh.opening[0], atol=0.05, rtol=0)
    # the loss's reader: the strongest ridge that keeps KEEP of that correlation, with smaller weights
    monkeypatch.setattr(LatentLipReader, "KEEP", 0.8)
    strong = LatentLipReader.fit(clips, max_clips=80)
    assert 0.8 * reader.heldout_r <= strong.heldout_r < reader.heldout_r
    assert strong.weight.norm() < 0.5 * reader.weight.norm()


def test_sync_term_sees_the_models_clean_estimate(latent_clips):
    """The sync term reads x0 = x_t - t v: zero for the true velocity, positive when the estimate's mouth differs;
    only single-character samples that hear their audio count."""
    stage = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(batch_size=4, frames=5, sync_weight=1.0,
                                                                            sync_layers="all"))
    batch = stage.batch(0, 0)
    batch["regions"][:, 0] = 1.0
    batch["regions"][:, 1] = 0.0
    stage.objective = lambda noisy, sigma, b: b["noise"] - b["x0"]
    _, values = stage.loss(batch)
    assert values["sync"] == 0.0 and values["mse"] == 0.0
    stage.objective = lambda noisy, sigma, b: b["noise"] - b["x0"] + 0.5 * torch.randn_like(b["x0"])
    _, values = stage.loss(batch)
    assert values["sync"] > 0.0
    regions = torch.zeros(3, 2, 4)
    regions[0, 0] = 1.0                                    # one character, audio on
    regions[2] = 1.0                                       # two characters
    assert sync_mask({"regions": regions}).tolist() == [1.0, 0.0, 0.0]
    estimate = torch.randn(3, 16, 5, 8, 8, requires_grad=True)
    mouth = torch.ones(3, 5, 8, 8)
    loss = sync_loss(stage.reader, estimate, torch.zeros(3, 16, 5, 8, 8), mouth, torch.tensor([1.0, 0.0, 0.0]))
    loss.backward()
    assert estimate.grad[0].abs().sum() > 0 and estimate.grad[1:].abs().sum() == 0


def test_without_single_character_clips_the_sync_term_is_off_with_a_warning():
    scenes = Planted(3, torch.zeros(256), 0.0)
    for clip in scenes.items:
        clip.regions = torch.ones(2, 4)
    with pytest.warns(UserWarning, match="sync term is off: no single-character clips"):
        stage = TeacherStage(TINY.dit, scenes, TeacherTrainConfig(sync_weight=1.0))
    assert stage.reader is None


def test_the_sync_term_trains_only_the_audio_layers(latent_clips):
    """Every weight outside the audio layers gets exactly the velocity error's gradient; the audio layers get more."""
    stage = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(batch_size=4, frames=5, sync_weight=1.0))
    audible(stage.dit)
    batch = stage.batch(0, 0)
    batch["regions"][:, 0] = 1.0
    batch["regions"][:, 1] = 0.0
    loss, values = stage.loss(batch)
    loss.backward()
    combined = {name: p.grad.clone() for name, p in stage.dit.named_parameters() if p.grad is not None}
    stage.dit.zero_grad(set_to_none=True)
    velocity_only = copy.copy(stage)
    velocity_only.reader = None
    loss, _ = velocity_only.loss(batch)
    loss.backward()
    audio = {id(p) for p in stage.dit.audio_parameters()}
    assert len(audio) >= 4 * TINY.dit.num_layers
    moved = 0
    for name, parameter in stage.dit.named_parameters():
        if id(parameter) in audio:
            moved += not torch.allclose(combined[name], parameter.grad, atol=1e-7)
        else:
            torch.testing.assert_close(combined[name], parameter.grad, atol=1e-7, rtol=1e-5, msg=name)
    assert moved > 0 and values["sync"] > 0
    with pytest.raises(ValueError, match="sync_layers='some' is invalid; allowed: 'audio', 'all'"):
        TeacherTrainConfig(sync_layers="some")


def test_augment_voice_shifts_tilts_and_gains_each_voice_whole():
    """A spectral peak on a flat floor: the output is the peak moved by s bins on a floor raised by a gain and a tilt,
    with one (s, gain, tilt) per sample and character over its whole window, within the recipe's bounds."""
    from model_core.training.teacher_stage import VOICE_GAIN, VOICE_SHIFT_BINS, VOICE_TILT, augment_voice

    features = torch.zeros(6, 2, 3, 20, 4, 80)
    features[..., 40] = 1.0
    out = augment_voice(features.flatten(-2), np.random.default_rng(3)).unflatten(-1, (4, 80))
    ramp = torch.arange(80) / 79 - 0.5
    seen, tilts, gains = set(), [], []
    for b in range(6):
        for k in range(2):
            voice = out[b, k]
            tilt = float(voice[0, 0, 0, 79] - voice[0, 0, 0, 0])
            gain = float(voice[0, 0, 0, 0]) + tilt / 2
            shift = int(voice[0, 0, 0].sub(gain + tilt * ramp).argmax()) - 40
            expected = torch.zeros(80)
            expected[40 + shift] = 1.0
            torch.testing.assert_close(voice, (expected + gain + tilt * ramp).expand_as(voice), atol=1e-5, rtol=0)
            assert abs(shift) <= VOICE_SHIFT_BINS and abs(gain) <= VOICE_GAIN and abs(tilt) <= VOICE_TILT
            seen.add(shift), tilts.append(tilt), gains.append(gain)
    assert len(seen) > 2 and np.std(tilts) > 0.03 and np.std(gains) > 0.03
    assert torch.equal(augment_voice(features.flatten(-2), np.random.default_rng(3), 0.0), features.flatten(-2))
    with pytest.raises(ValueError, match="not a whole number of 80-mel subframes"):
        augment_voice(torch.zeros(1, 1, 1, 1, 100), np.random.default_rng(0))


def test_voice_augment_changes_only_the_audio_of_a_batch(latent_clips):
    plain = TeacherStage(TINY.dit, Listed(latent_clips)).batch(3, 0)
    voiced = TeacherStage(TINY.dit, Listed(latent_clips), TeacherTrainConfig(voice_augment=1.0)).batch(3, 0)
    for key in plain:
        if key == "features":
            assert not torch.equal(plain[key], voiced[key])
        elif torch.is_tensor(plain[key]):
            assert torch.equal(plain[key], voiced[key]), key
    with pytest.raises(ValueError, match="voice_augment=-1"):
        TeacherTrainConfig(voice_augment=-1)
