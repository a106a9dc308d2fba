"""The cascade's LLM on each runtime it can run on (services/llm/smollm2.py), with the real SmolLM2 GGUF from its
wheel: the same answer on transformers and on llama.cpp, a cancelled reply stops at once, conversations sharing one
llama.cpp context take turns, and a runtime that is unknown or not installed is one clear error."""

from __future__ import annotations

import threading

import pytest

from services.llm import smollm2
from services.llm.conversation import ConversationError
from services.llm.offline import DEFAULT_INSTRUCTIONS, OfflineConfig, missing_packages

pytestmark = pytest.mark.skipif(bool(missing_packages()), reason=f"the cascade needs {missing_packages()}")

QUESTION = [{"role": "system", "content": DEFAULT_INSTRUCTIONS},
            {"role": "user", "content": "What is the capital of France?"}]
RUNTIMES = [pytest.param("transformers"),
            pytest.param("llama.cpp", marks=pytest.mark.skipif(not smollm2.llama_cpp_installed(),
                                                               reason="llama-cpp-python not built (make llama-cpp)"))]
_loaded: dict = {}


def llm(runtime: str):
    if runtime not in _loaded:
        _loaded[runtime] = smollm2.load_llm(OfflineConfig.from_settings(llm_runtime=runtime))
    return _loaded[runtime]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_answers_the_question_and_stops_when_cancelled(runtime):
    model = llm(runtime)
    assert model.runtime == runtime
    answer = "".join(model.deltas(QUESTION, threading.Event()))
    assert "Paris" in answer, answer
    cancelled, got = threading.Event(), []
    story = [QUESTION[0], {"role": "user", "content": "Tell me a long story about a ship at sea."}]
    for delta in model.deltas(story, cancelled):
        got.append(delta)
        cancelled.set()
    assert 1 <= len(got) <= 2, got


@pytest.mark.skipif(not smollm2.llama_cpp_installed(), reason="llama-cpp-python not built (make llama-cpp)")
def test_conversations_sharing_the_llama_cpp_context_take_turns():
    model, answers = llm("llama.cpp"), []

    def ask() -> None:
        answers.append("".join(model.deltas(QUESTION, threading.Event())))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 3 and len(set(answers)) == 1 and "Paris" in answers[0], answers


def test_an_unknown_or_missing_runtime_is_one_clear_error(monkeypatch):
    with pytest.raises(ConversationError, match="llm_runtime='gpt' is invalid: allowed auto, llama.cpp, transformers"):
        OfflineConfig.from_settings(llm_runtime="gpt")
    monkeypatch.setattr(smollm2, "llama_cpp_installed", lambda: False)
    with pytest.raises(ConversationError, match="needs llama-cpp-python, which is not installed: run `make llama-cpp`"):
        OfflineConfig.from_settings(env={"FACECAST_LLM_RUNTIME": "llama.cpp"})
    assert smollm2.resolve_runtime("auto") == "transformers"
