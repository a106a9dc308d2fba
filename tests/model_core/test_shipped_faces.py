"""The shipped student on faces the world never produced: the mouth region follows the speech.

The demo's speech (`assets/speech.wav`: held-out sentences in the held-out voice) streams through the shipped talk128
student for the demo's world face, the hand-drawn portrait and the photograph. Independent expectation: the world's
own mouth-opening track of those sentences (its viseme timing of the same libespeak-ng utterance), not anything the
model or the probe computes. The read-out is plain pixels: how far each frame's mouth box is from the box at rest
(its median over the silent frames), correlated with that track; the band across the eyes is the control (it moves
with the head and blinks, not with the words)."""

import json
import wave

import numpy as np
import pytest

from model_core.lipsync import pearson
from model_core.world.speech import espeak_available

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")

BOXES = {       # x0, y0, x1, y1 on the 128x128 stream, set by eye on each image: (mouth, the band across the eyes)
    "reference": ((48, 88, 76, 108), (40, 40, 88, 60)),
    "drawn": ((48, 76, 82, 100), (40, 44, 88, 64)),
    "photo": ((42, 84, 76, 104), (36, 44, 84, 64)),
}


@pytest.fixture(scope="module")
def demo_speech():
    from model_core.world.speech import Voice, speak

    demo = json.load(open("assets/demo.json"))
    with wave.open("assets/speech.wav") as source:
        pcm = np.frombuffer(source.readframes(source.getnframes()), "<i2").astype(np.float32) / 32767
        rate = source.getframerate()
    utterance = speak(demo["text"], Voice(demo["voice"]))
    assert rate == 16000 and len(utterance.pcm) == len(pcm), "assets/speech.wav is the demo.json utterance"
    return pcm, utterance


@pytest.fixture(scope="module")
def engine():
    from model_core.engine import AvatarEngine
    from model_core.shipped import TRAINED_PRESET

    return AvatarEngine.from_preset(TRAINED_PRESET, seed=0)


@pytest.mark.parametrize("face", ["reference", "drawn", "photo"])
def test_the_shipped_student_moves_the_mouth_with_the_speech_on_any_face(face, engine, demo_speech):
    import torch

    from model_core.world.visemes import mouth_track
    from services.media import image_to_tensor, load_image

    pcm, utterance = demo_speech
    stream = engine.stream_config(seed=0)
    session = engine.open_session(image_to_tensor(load_image(f"assets/{face}.png"), stream.width, stream.height), "",
                                  stream)
    chunks = engine.push_audio(session, pcm, 16000) + engine.end_input(session)
    engine.close_session(session)
    video = ((torch.cat([chunk.frames for chunk in chunks]).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    truth = mouth_track(utterance.phonemes, utterance.pcm, 16000, float(stream.fps), len(video))
    assert truth.speaking.mean() > 0.5 and (~truth.speaking).sum() >= 5       # the rest: the silence after the words
    follows = {}
    for name, (x0, y0, x1, y1) in zip(("mouth", "eyes"), BOXES[face]):
        box = video[:, y0:y1, x0:x1]
        away_from_rest = np.abs(box - np.median(box[~truth.speaking], axis=0)).mean(axis=(1, 2, 3))
        follows[name] = pearson(away_from_rest, truth.opening)
    # measured: the demo face 0.70 (eyes 0.35), the drawn face 0.76 (0.18), the photo 0.67 (0.34)
    assert follows["mouth"] > 0.55, follows
    assert follows["mouth"] > follows["eyes"] + 0.2, follows
