# Everything runs inside .venv, which `make venv` (and every target that needs it) creates on demand
# and rebuilds only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ZENNIT := zennit==1.0.0

MODEL ?= vgg16
WEIGHTS ?= imagenet
COMPOSITE ?= epsilon_gamma_box
TOPK ?= 0.0
OUT ?= artifacts/$(MODEL)-$(COMPOSITE)-k$(TOPK)
EXPORT_ARGS ?=

# `make explain` passes on only what you set (on the command line or in the environment); the rest comes
# from configs/run.yaml.
given = $(if $(filter command line environment,$(origin $(1))),--$(2) '$($(1))')

.PHONY: venv test test-precision bench bench-lrp bench-export bench-pipeline bench-report bench-faithfulness bench-reliability export explain \
	report heatmaps train-demo shapes-data clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# zennit 1.0.0 declares Python >= 3.11.11; it runs on 3.11.7 (DEVELOPERS.md).
	$(PY) -m pip install -q --no-deps --ignore-requires-python $(ZENNIT)
	touch $(STAMP)

# The report's browser test drives Debian's Chromium (headless); installed once, as root, where missing.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The precision-sensitive tests (marked `precision`) again under oneDNN's other kernel paths, which any x86 CPU
# offers, and with oneDNN off: CI on one CPU then proves they pass on others (README, Correctness).
PRECISION_PATHS := ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=SSE41 LRP_MKLDNN=0

test-precision: $(STAMP)
	@for path in $(PRECISION_PATHS); do \
		echo "=== precision tests with $$path"; \
		env $$path $(PY) -m pytest -q -m precision $(PYTEST_ARGS) || exit 1; \
	done

bench: bench-lrp bench-export bench-pipeline bench-report bench-faithfulness bench-reliability

bench-lrp: $(STAMP)
	$(PY) -m bench.lrp_speed $(BENCH_ARGS)

bench-export: $(STAMP)
	$(PY) -m bench.export_speed

bench-pipeline: $(STAMP)
	$(PY) -m bench.pipeline_speed

bench-report: $(STAMP)
	$(PY) -m bench.report_speed

bench-faithfulness: $(STAMP)
	$(PY) -m bench.faithfulness_speed

# a few thousand tiny images, some broken, an actor SIGKILLed mid-run: nothing lost or duplicated, the cost
bench-reliability: $(STAMP)
	$(PY) -m bench.reliability_soak

# e.g. make export MODEL=vgg16 WEIGHTS=imagenet COMPOSITE=epsilon_gamma_box TOPK=0.1 OUT=artifacts/x
export: $(STAMP)
	$(PY) -m export --model $(MODEL) --weights $(WEIGHTS) --composite $(COMPOSITE) --top-k $(TOPK) \
		--out $(OUT) $(EXPORT_ARGS)

# e.g. make explain DATASET=imagenet-val MODEL=vgg19_bn COMPOSITE=epsilon_plus_flat TOPK=0.1 OUT=runs/x LIMIT=1000
explain: $(STAMP) $(if $(filter shapes,$(DATASET)),shapes-data)
	$(PY) -m pipeline explain $(call given,DATASET,dataset) $(call given,MODEL,model) \
		$(call given,WEIGHTS,weights) $(call given,COMPOSITE,composite) $(call given,TOPK,top-k) \
		$(call given,OUT,out) $(call given,LIMIT,limit) $(call given,TARGET,target) $(EXPLAIN_ARGS)

# e.g. make report RUN=runs/x (REPORT_ARGS='--per-class 2 --gallery 24'); opens from RUN/report/index.html
report: $(STAMP)
	$(PY) -m pipeline report '$(RUN)' $(REPORT_ARGS)

# e.g. make heatmaps RUN=runs/x IDS=ILSVRC2012_val_00000001,ILSVRC2012_val_00000002 -> RUN/heatmaps/*.png
heatmaps: $(STAMP)
	$(PY) -m pipeline heatmaps '$(RUN)' --ids '$(IDS)' $(HEATMAP_ARGS)

# The offline demo: the generated shapes' validation split (data/shapes/, not committed: made in a second) and
# vgg-shapes trained on a training split (seeded, a few minutes on 2 cores; the result is committed).
SHAPES_DIR := data/shapes
shapes-data: $(SHAPES_DIR)/LOC_val_solution.csv

$(SHAPES_DIR)/LOC_val_solution.csv: demo/shapes.py | $(STAMP)
	$(PY) -m demo.shapes --out $(SHAPES_DIR)

train-demo: $(STAMP)
	$(PY) -m demo.train

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
