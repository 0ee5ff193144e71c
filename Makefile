# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
# Both set up everything first: Debian packages the datasets need, then a virtualenv in .venv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := fonts-noto-color-emoji unicode-data
DEBIAN_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUT ?= demo_out

.PHONY: setup debian-packages test demo clean

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
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps DALL-E==0.1  # OpenAI's dVAE; its declared deps pull torchvision
	$(PY) -c "import torch, dall_e"
	$(PY) -c "import dalle_jax, jax, flax, optax, orbax.checkpoint, grain, sentencepiece"
	touch $@

# pytest exits 5 when it collects no test: that is a failure here, never a pass.
test: setup
	@$(PY) -m pytest -x -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; \
	exit $$status

demo: setup
	$(PY) experiments/preview_data.py --dataset=shapes --resolution=64 --out=$(OUT)/shapes.png
	$(PY) experiments/preview_data.py --dataset=emoji --resolution=64 --out=$(OUT)/emoji.png

clean:
	rm -rf $(VENV) $(OUT) *.egg-info
