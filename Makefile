# Everything runs inside .venv, which `make venv` (and every target that needs it) creates on demand
# and rebuilds only when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# Quantus 0.6.0, the metrics' test reference, in its own venv (below)
QUANTUS_VENV := .venv-quantus
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ZENNIT := zennit==1.0.0

MODEL ?= vgg16
WEIGHTS ?= imagenet
COMPOSITE ?= epsilon_gamma_box
TOPK ?= 0.0
OUT ?= artifacts/$(call text,MODEL)-$(call text,COMPOSITE)-k$(call text,TOPK)
EXPORT_ARGS ?=

# Values given to make are data, never code: make expands nothing in them (`$(value ...)`, and they are not
# exported, which would expand them), the shell gets each as one single-quoted word, and the `*_ARGS` are split into
# words by bin/make_job.py (shlex), never by a shell. A folder named `Bob's $(photos)` is just a folder.
USER_VARIABLES := DATASET MODEL WEIGHTS COMPOSITE TOPK OUT LIMIT TARGET CONCEPTS RUN IDS DEVICE EXPLAIN_ARGS \
	EXPORT_ARGS REPORT_ARGS SPRAY_ARGS SANITY_ARGS N HEATMAP_ARGS VIRELAY_ARGS BENCH_ARGS PIPELINE_ARGS PYTEST_ARGS \
	LAYER CHANNELS CONCEPTS_ARGS MARKED PROTOTYPE TRUTH MASKS CAV_ARGS CONCEPT CORRECT_ARGS PROTOTYPES_ARGS
unexport $(USER_VARIABLES)
quote = '$(subst ','\'',$(1))'
# a variable's text: as given on the command line or in the environment (unexpanded), else the Makefile's default
text = $(if $(filter command line environment,$(origin $(1))),$(value $(1)),$($(1)))
# `python -m MODULE ARGS... $(NAME_ARGS)`, every word quoted, NAME_ARGS split by shlex
job = $(PY) bin/make_job.py $(2) $(call quote,$(call text,$(2))) $(1)
# `make explain` passes on only what you set (on the command line or in the environment); the rest comes
# from configs/run.yaml.
given = $(if $(filter command line environment,$(origin $(1))),--$(2) $(call quote,$(value $(1))))

EXPLAIN_PREREQUISITES = $(if $(filter shapes,$(value DATASET)),shapes-data) \
	$(if $(filter shapes-hans,$(value DATASET)),shapes-hans-data)
EXPLAIN_COMMAND = $(call job,pipeline explain,EXPLAIN_ARGS) $(call given,DATASET,dataset) $(call given,MODEL,model) \
	$(call given,WEIGHTS,weights) $(call given,COMPOSITE,composite) $(call given,TOPK,top-k) \
	$(call given,OUT,out) $(call given,LIMIT,limit) $(call given,TARGET,target) $(call given,CONCEPTS,concepts)
EXPORT_COMMAND = $(call job,export,EXPORT_ARGS) --model $(call quote,$(call text,MODEL)) \
	--weights $(call quote,$(call text,WEIGHTS)) --composite $(call quote,$(call text,COMPOSITE)) \
	--top-k $(call quote,$(call text,TOPK)) --out $(call quote,$(call text,OUT))

# `make explain` and `make export` exit with the program's own codes (0 done, 1 some images failed / an artifact
# failed its check, 2 could not start or finish), which make alone cannot do: any failed recipe makes it exit 2.
# So, as the only goal (and not a dry run), the job runs while this Makefile is read (prerequisites first, by a
# sub-make), its stderr going to make's own stderr as it comes and its stdout (the closing summary) to a temporary
# file that make then prints on its own stdout (nothing is reopened, so `> run.log 2>&1` and `>> all.log` keep
# every line, in place); status 1 then turns on make's question mode (-q), whose exit status for a target that is
# not up to date is 1; 0 and 2 are the recipe's `exit`.
JOB = $(if $(filter explain,$(MAKECMDGOALS)),EXPLAIN,EXPORT)
ifneq ($(filter explain export,$(MAKECMDGOALS)),)
ifeq ($(words $(MAKECMDGOALS)),1)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
JOB_STDOUT := $(shell mktemp)
JOB_STATUS := $(shell $(MAKE) --no-print-directory -s $(STAMP) $(if $(filter explain,$(MAKECMDGOALS)),$(EXPLAIN_PREREQUISITES)) >&2 \
	&& { $($(JOB)_COMMAND); } >'$(JOB_STDOUT)'; echo $$?)
JOB_SUMMARY := $(file <$(JOB_STDOUT))
$(if $(JOB_SUMMARY),$(info $(JOB_SUMMARY)))
$(shell rm -f '$(JOB_STDOUT)')
ifeq ($(JOB_STATUS),1)
MAKEFLAGS += -q
endif
endif
endif
endif

.PHONY: venv quantus-venv bench-metrics test lint test-precision bench bench-first-run bench-lrp bench-lrp-resnet bench-export bench-pipeline bench-topk bench-report bench-faithfulness bench-reliability bench-sanity bench-concepts sanity export explain \
	report heatmaps concepts train-demo shapes-data clean spray bench-spray train-demo-hans shapes-hans-data virelay docs \
	cav bench-cav correct prototypes bench-prototypes

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

# The wall times end the log (`wall time: ...`, never mistaken for pytest's `N passed` line), so a slowdown shows.
test: $(STAMP) $(CHROMIUM) $(QUANTUS_VENV)/.installed lint
	@start=$$SECONDS; status=0; $(call job,pytest,PYTEST_ARGS) -q || status=$$?; \
	echo "wall time: suite $$((SECONDS - start)) s"; exit $$status

# ruff's configuration is pyproject.toml's [tool.ruff]; `make test` lints first.
lint: $(STAMP)
	$(PY) -m ruff check .

# The precision-sensitive tests (marked `precision`) again under oneDNN's other kernel paths, which any x86 CPU
# offers, and with oneDNN off: CI on one CPU then proves they pass on others (docs/correctness.md).
PRECISION_PATHS := ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=SSE41 LRP_MKLDNN=0

test-precision: $(STAMP)
	@begun=$$SECONDS; for path in $(PRECISION_PATHS); do \
		echo "=== precision tests with $$path"; \
		start=$$SECONDS; status=0; env $$path $(call job,pytest,PYTEST_ARGS) -q -m precision || status=$$?; \
		echo "wall time: precision pass $$path $$((SECONDS - start)) s"; \
		[ $$status -eq 0 ] || exit 1; \
	done; echo "wall time: precision passes $$((SECONDS - begun)) s"

bench: bench-first-run bench-lrp bench-lrp-resnet bench-export bench-pipeline bench-topk bench-report bench-faithfulness bench-reliability bench-spray bench-sanity bench-concepts bench-metrics bench-cav bench-prototypes

# A new user's first run timed by phase: set-up (a fresh temporary venv + the pinned install), then `make explain`'s
# command with a fresh artifact cache (artifact build, Ray start, explain, probe, finish); BENCH_ARGS=--skip-setup
bench-first-run: $(STAMP)
	$(call job,bench.first_run,BENCH_ARGS)

bench-lrp: $(STAMP)
	$(call job,bench.lrp_speed,BENCH_ARGS)

# the graph engine on a ResNet: resnet50 224x224 against its forward and zennit (ResNetCanonizer), side by side
bench-lrp-resnet: $(STAMP)
	$(call job,bench.lrp_speed,BENCH_ARGS) --model resnet50 --out bench/results/lrp_speed_resnet50.json

bench-export: $(STAMP)
	$(PY) -m bench.export_speed

bench-pipeline: $(STAMP)  # DEVICE=cuda: on the GPU (GPU decoding, float32 and TF32); PIPELINE_ARGS=--quick: small
	$(call job,bench.pipeline_speed,PIPELINE_ARGS) $(if $(value DEVICE),--device $(call quote,$(value DEVICE)))

bench-topk: $(STAMP)  # DEVICE=cuda: the radix selection and the filter's cost on the GPU
	$(PY) -m bench.topk_speed $(if $(value DEVICE),--device $(call quote,$(value DEVICE)))

bench-report: $(STAMP)
	$(PY) -m bench.report_speed

bench-faithfulness: $(STAMP)
	$(PY) -m bench.faithfulness_speed

# a few thousand tiny images, some broken, an actor SIGKILLed mid-run: nothing lost or duplicated, the cost
bench-reliability: $(STAMP)
	$(PY) -m bench.reliability_soak

# SpRAy side by side with corelay 1.0.0 (bench-only, in its own environment: it would move no pin of ours, but it is
# not ours to ship), then 100,000 maps of one class through ours alone (~10 min on 2 cores); BENCH_ARGS=--skip-large
CORELAY_VENV := .venv-bench-corelay
$(CORELAY_VENV)/.installed:
	test -x $(CORELAY_VENV)/bin/python || $(PYTHON) -m venv $(CORELAY_VENV)
	$(CORELAY_VENV)/bin/pip install -q corelay==1.0.0 numpy==2.4.6 scipy==1.17.1 scikit-learn==1.9.1 h5py==3.16.0 \
		matplotlib==3.11.2
	touch $@

bench-spray: $(STAMP) $(CORELAY_VENV)/.installed
	$(call job,bench.spray_speed,BENCH_ARGS)

# Quantus 0.6.0, the metrics' reference (tests/test_metrics_quantus.py, bench/metrics_speed.py): in its own venv,
# never imported by the project. Its own dependencies (NumPy, SciPy, scikit-image, OpenCV, pandas, ...) come from
# the registry (~3 min, ~600 MB); torch, which Quantus needs to run a model but does not declare, is the project's
# own, found through a .pth file after Quantus's packages (one torch build on both sides of the comparison).
quantus-venv: $(QUANTUS_VENV)/.installed

$(QUANTUS_VENV)/.installed: | $(STAMP)
	test -x $(QUANTUS_VENV)/bin/python || $(PYTHON) -m venv $(QUANTUS_VENV)
	$(QUANTUS_VENV)/bin/pip install -q quantus==0.6.0 numpy==2.4.6 scipy==1.17.1
	$(PY) -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' > \
		"$$($(QUANTUS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-project-torch.pth"
	$(QUANTUS_VENV)/bin/python -c 'import quantus, torch; assert quantus.__version__ == "0.6.0"'
	touch $@

# the cascading randomisation of VGG16's 16 weight layers against (layers + 1) LRP passes (docs/sanity.md)
bench-sanity: $(STAMP)
	$(call job,bench.sanity_speed,BENCH_ARGS)

# CRP: concept relevance and K = 8 concept maps against a plain LRP pass and the zennit way (one masked backward per
# concept), VGG16 features.28 and ResNet-50 layer4, 224 px, batch 8; RelMax memory at two sizes (BENCH_ARGS=--quick)
bench-concepts: $(STAMP)
	$(call job,bench.concepts_speed,BENCH_ARGS)

# the CAV ranking of a 50,000-image synthetic run with C = 512 concepts, phase by phase (target < 1 min;
# BENCH_ARGS='--images 5000' for a quick one)
bench-cav: $(STAMP)
	$(call job,bench.cav_speed,BENCH_ARGS)

# every metric of pipeline/metrics for 256 VGG16 224 images against Quantus 0.6.0's batched calls on the same maps
bench-metrics: $(STAMP) $(QUANTUS_VENV)/.installed
	$(call job,bench.metrics_speed,BENCH_ARGS)

# PCX's prototypes: a Gaussian mixture over 100,000 synthetic concept-relevance vectors of one class (C = 512), time and
# peak memory in a fresh process (BENCH_ARGS='--images 20000 --channels 256')
bench-prototypes: $(STAMP)
	$(call job,bench.prototypes_speed,BENCH_ARGS)

# e.g. make export MODEL=vgg16 WEIGHTS=imagenet COMPOSITE=epsilon_gamma_box TOPK=0.1 OUT=artifacts/x
export: $(STAMP)
	$(if $(JOB_STATUS),@exit $(JOB_STATUS),$(EXPORT_COMMAND))

# e.g. make explain DATASET=imagenet-val MODEL=vgg19_bn COMPOSITE=epsilon_plus_flat TOPK=0.1 OUT=runs/x LIMIT=1000
# (CONCEPTS=features.28 or a comma list: concepts (CRP) at those layers, the rest from configs/run.yaml's concepts:)
explain: $(STAMP) $(EXPLAIN_PREREQUISITES)
	$(if $(JOB_STATUS),@exit $(JOB_STATUS),$(EXPLAIN_COMMAND))

# e.g. make report RUN=runs/x (REPORT_ARGS='--per-class 2 --gallery 24'); opens from RUN/report/index.html
report: $(STAMP)
	$(call job,pipeline report,REPORT_ARGS) $(call quote,$(value RUN))

# e.g. make spray RUN=runs/x (SPRAY_ARGS='--by label --variant spectral --min-images 50'): per class, the strategies
# (SpRAy clusters of the maps) -> RUN/spray/ (clusters.parquet, summary.json, a ViRelAy project); then `make report`
spray: $(STAMP)
	$(call job,pipeline spray,SPRAY_ARGS) $(call quote,$(value RUN))

# e.g. make virelay RUN=runs/x: ViRelAy 0.6.1 (AGPL; installed into its own .venv-virelay, never into the project's)
# serving RUN/spray/project.yaml on http://localhost:8000
VIRELAY_VENV := .venv-virelay
$(VIRELAY_VENV)/.installed:
	test -x $(VIRELAY_VENV)/bin/python || $(PYTHON) -m venv $(VIRELAY_VENV)
	$(VIRELAY_VENV)/bin/pip install -q virelay==0.6.1
	touch $@

virelay: $(VIRELAY_VENV)/.installed
	$(VIRELAY_VENV)/bin/python bin/make_job.py VIRELAY_ARGS $(call quote,$(value VIRELAY_ARGS)) virelay \
		$(call quote,$(value RUN)/spray/project.yaml)

# e.g. make prototypes RUN=runs/x LAYER=features.28 (LAYER optional: the run's maps layer; PROTOTYPES_ARGS='--classes
# 3,7 --max-components 4 --seed 1'): per class, PCX's prototypes of a run explained with concepts -> RUN/prototypes/
prototypes: $(STAMP)
	$(call job,pipeline prototypes,PROTOTYPES_ARGS) $(call quote,$(value RUN)) \
		$(if $(value LAYER),--layer $(call quote,$(value LAYER)))

# e.g. make heatmaps RUN=runs/x IDS=ILSVRC2012_val_00000001,ILSVRC2012_val_00000002 -> RUN/heatmaps/*.png
# e.g. make sanity RUN=runs/x N=16 (SANITY_ARGS='--modes cascading --ssim flat'): the model parameter randomisation
# test (MPRT, eMPRT) on N of the run's images -> RUN/sanity.parquet, drawn by the report (docs/sanity.md)
sanity: $(STAMP)
	$(call job,pipeline sanity,SANITY_ARGS) $(call quote,$(value RUN)) --images $(call quote,$(value N))

# e.g. make cav RUN=runs/x LAYER=features.28 MARKED=ids.csv (or PROTOTYPE=3:1; TRUTH=truth.csv, MASKS=masks.npz;
# CAV_ARGS='--name tag --channel 7 --raw'): the marked images' CAVs at LAYER, every image ranked by them, each
# channel's AUROC, retrieval against the truth, R_bias inside the masks -> RUN/cav/ (docs/audit.md)
cav: $(STAMP)
	$(call job,pipeline cav,CAV_ARGS) $(call quote,$(value RUN)) --layer $(call quote,$(value LAYER)) \
		$(if $(value MARKED),--marked $(call quote,$(value MARKED))) \
		$(if $(value PROTOTYPE),--prototype $(call quote,$(value PROTOTYPE))) \
		$(if $(value TRUTH),--truth $(call quote,$(value TRUTH))) $(if $(value MASKS),--masks $(call quote,$(value MASKS)))

heatmaps: $(STAMP)
	$(call job,pipeline heatmaps,HEATMAP_ARGS) $(call quote,$(value RUN)) --ids $(call quote,$(value IDS))

# e.g. make concepts RUN=runs/x LAYER=features.28 CHANNELS=1,2,3 (CHANNELS optional: the most relevant ones;
# CONCEPTS_ARGS='--class 3 --references 12 --float64'): each concept's reference crops -> RUN/concept-references/
concepts: $(STAMP)
	$(call job,pipeline concepts,CONCEPTS_ARGS) $(call quote,$(value RUN)) --layer $(call quote,$(value LAYER)) \
		$(if $(value CHANNELS),--channels $(call quote,$(value CHANNELS)))

# e.g. make correct RUN=runs/x CONCEPT=marked.csv LAYER=features.28 (OUT=folder; CORRECT_ARGS='--clean clean.csv',
# '--gate always' for P-ClArC): R-ClArC, the marked images' direction (CONCEPT: a CSV with an image_id column, or a
# 0/1 `marked` / `tag` column as shapes-hans' hans.csv) projected out of LAYER in the images where it is detected
# -> OUT (default artifacts/<run>-pclarc-<layer>): verified corrected artifacts and correction.json; it prints the
# `make explain` line that re-audits the corrected model
correct: $(STAMP)
	$(call job,pipeline correct,CORRECT_ARGS) $(call quote,$(value RUN)) --layer $(call quote,$(value LAYER)) \
		--marked $(call quote,$(value CONCEPT)) $(call given,OUT,out)

# The offline demo: the generated shapes' validation split (data/shapes/, not committed: made in a second) and
# vgg-shapes trained on a training split (seeded, a few minutes on 2 cores; the result is committed).
SHAPES_DIR := data/shapes
shapes-data: $(SHAPES_DIR)/LOC_val_solution.csv

$(SHAPES_DIR)/LOC_val_solution.csv: demo/shapes.py | $(STAMP)
	$(PY) -m demo.shapes --out $(SHAPES_DIR)

train-demo: $(STAMP)
	$(PY) -m demo.train

# The planted Clever Hans: shapes-hans (a third of the stars carry a tag; data/shapes-hans/, hans.csv says which) and
# vgg-shapes-hans trained on it (seed 0, ~8 min on 2 shared cores; committed, with the tag's measured effect)
SHAPES_HANS_DIR := data/shapes-hans
shapes-hans-data: $(SHAPES_HANS_DIR)/hans.csv

$(SHAPES_HANS_DIR)/hans.csv: demo/shapes.py demo/shapes_hans.py | $(STAMP)
	$(PY) -m demo.shapes_hans --out $(SHAPES_HANS_DIR)

train-demo-hans: $(STAMP)
	$(PY) -m demo.train --model vgg-shapes-hans

# docs/outputs.md is generated from pipeline/layout.py and pipeline/schema.py; tests/test_docs.py fails when it is stale
docs: $(STAMP)
	$(PY) -m pipeline.outputs_doc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
