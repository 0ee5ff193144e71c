# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
# Both set up everything first: Debian packages the datasets need, then a virtualenv in .venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# chromium: tests/test_app.py renders the web app headless.
DEBIAN_PACKAGES := fonts-noto-color-emoji unicode-data chromium
DEBIAN_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt \
  /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUT ?= demo_out
DATASET ?= shapes

.PHONY: setup debian-packages test demo app clean

setup: debian-packages $(VENV)/.installed

# apt-get only when a file is missing: CI machines usually have them already.
debian-packages:
	@for f in $(DEBIAN_FILES); do [ -f "$$f" ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $(DEBIAN_PACKAGES)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,app,tpu,bench]"  # tpu: libtpu (fit check); bench: GPT-2, the peer
	$(PY) -m pip install -q --no-deps DALL-E==0.1  # OpenAI's dVAE; its declared deps pull torchvision
	$(PY) -c "import torch, dall_e"
	$(PY) -c "import dalle_jax, jax, flax, optax, orbax.checkpoint, grain, sentencepiece, libtpu"
	$(PY) -c "import tensorboardX, gradio, gradio_client, websockets, transformers"
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: setup
	@$(PY) -m pytest -x -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	exit $$status

# The main job: tokenizer, dVAE, encoding, reranker, transformer and reranked samples on the
# shapes set, into $(OUT)/ (samples.png, reconstructions.png, loss_curves.png, metrics.json).
# STEPS_SCALE=4 make demo trains every stage four times longer (DVAE_STEPS_SCALE, if set, the
# dVAE alone); DATASET=emoji make demo uses the emoji set (32x32, longer) instead of shapes.
STEPS_SCALE ?= 1
DVAE_STEPS_SCALE ?=
demo: setup
	$(PY) experiments/demo.py --out=$(OUT) --steps_scale=$(STEPS_SCALE) --dataset=$(DATASET) \
	  $(if $(DVAE_STEPS_SCALE),--dvae_steps_scale=$(DVAE_STEPS_SCALE))

# The web app on a finished demo: `make app` (RUN=demo_out) then open http://127.0.0.1:$(PORT).
RUN ?= $(OUT)
PORT ?= 7860
app: setup
	$(PY) experiments/app.py --run=$(RUN) --port=$(PORT)

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
