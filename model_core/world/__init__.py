"""The talking-face world: procedural characters that speak real synthesised speech, with per-frame ground truth.

    speech.py      espeak-ng through libespeak-ng: audio + phoneme timings (speech_helper.py: fresh state per clip)
    visemes.py     phonemes -> mouth opening / width / viseme per frame, with coarticulation
    sentences.py   the seeded sentence pool          identity.py   1,200+ seeded identities, three styles
    render.py      identities + per-frame state -> frames and face boxes
    clips.py       one clip: turns, listening, blinks, head motion; its Truth
    split.py       held-out identities / sentences / voice, fixed by seed
    store.py       on-the-fly, sharded cache, and real-video-folder sources
"""
