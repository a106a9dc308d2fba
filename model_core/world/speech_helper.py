"""The speech helper process: forks a fresh child per request so libespeak-ng always starts from a clean state.

Run by `speech.speak_fresh` as `python -m model_core.world.speech_helper`. Protocol on stdin/stdout: 8-byte
little-endian length + a pickled list of (text, Voice); the answer is length + pickled (ok, utterances or the error).
The helper itself never loads libespeak-ng and is single-threaded, so forking it is safe. It does load Piper voices
(a few seconds each, once) before forking: their onnxruntime session runs on one thread and holds no synthesis
state, so children inherit it ready to use instead of loading it per request.
"""

from __future__ import annotations

import os
import pickle
import sys


def _preload_piper(request: bytes) -> None:
    from model_core.world.speech import PIPER_VOICES, load_piper

    for name in {voice.name for _, voice in pickle.loads(request)} & set(PIPER_VOICES):
        try:
            load_piper(name)
        except Exception:  # noqa: BLE001  the child meets the same error and sends it back to the caller
            pass


def _serve_one(request: bytes) -> bytes:
    _preload_piper(request)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: synthesise with a freshly loaded library, answer, exit
        os.close(read_end)
        try:
            from model_core.world.speech import speak
            answer = (True, [speak(text, voice) for text, voice in pickle.loads(request)])
        except BaseException as error:  # everything goes back to the caller, which re-raises it
            answer = (False, error)
        data = pickle.dumps(answer)
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    return data


def main() -> None:
    import model_core.world.speech  # noqa: F401  (imported once here; libespeak-ng is loaded only by children)

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = stdin.read(8)
        if len(header) < 8:
            return
        request = stdin.read(int.from_bytes(header, "little"))
        answer = _serve_one(request)
        stdout.write(len(answer).to_bytes(8, "little") + answer)
        stdout.flush()


if __name__ == "__main__":
    main()
