"""Quantus 0.6.0's values on arrays saved by tests/test_metrics_quantus.py: run by .venv-quantus's Python (never
imported by the project), `python tests/tools/quantus_reference.py IN.npz SPEC.json OUT.npz [MODEL.pt]`.

IN.npz: x (N, C, H, W) float64, y (N,), a (N, 1, H, W) float64, s (N, 1, H, W), and others (other_a / other_y:
the maps of the other classes random logit will ask for). SPEC.json: a list of {"name", "metric", "init", "call",
"seed"}, optionally "x", "y", "a", "s": the names of other arrays to use for those. "metric" is a Quantus class
name, or "imputation" (quantus.functions.perturb_func.noisy_linear_imputation on x[i] with `pixels`), or "road"
(ROAD's protocol over pixel indices, see the test). The model (TorchScript) runs in float64: Quantus casts inputs
to float32 (torch.Tensor(x)), exact for the float32-valued inputs the test uses."""
import json
import sys
import time

import numpy as np
import quantus
import torch
from quantus.functions.perturb_func import noisy_linear_imputation


class Float64(torch.nn.Module):
    """The model in float64 on Quantus's float32-cast inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.double())


def explainer(other_a, other_y):
    """RandomLogit's explain_func: the maps saved for the other classes, which Quantus must have drawn too."""
    def explain(model, inputs, targets, **kwargs):
        assert np.array_equal(np.asarray(targets), other_y), "Quantus drew other classes than expected"
        return other_a
    return explain


def main(inputs, spec_file, out_file, model_file=None, precision="float64"):
    """Each spec item's values under its name, and its seconds under name + '_seconds' (bench/metrics_speed.py)."""
    data = dict(np.load(inputs))
    model = torch.jit.load(model_file).eval() if model_file else None
    if model is not None and precision == "float64":
        model = Float64(model.double()).eval()
    results = {}
    for item in json.load(open(spec_file)):
        started = time.perf_counter()
        run(item, data, model, results)
        results[item["name"] + "_seconds"] = np.float64(time.perf_counter() - started)
    np.savez(out_file, **results)


def run(item, data, model, results):
    """One spec item's Quantus values into results[item["name"]]."""
    x, y, a, s = (data[item.get(key, key)] for key in ("x", "y", "a", "s"))  # an item may name other arrays
    np.random.seed(item.get("seed", 0))
    kind = item["metric"]
    if kind == "imputation":
        results[item["name"]] = np.stack([noisy_linear_imputation(x[i], np.asarray(p), noise=item["noise"])
                                          for i, p in zip(item["images"], item["pixels"])])
        return
    if kind == "road":  # Quantus ROAD's loops (percentage, then image) over pixel indices; its imputation
        hits = []
        for pixels in item["pixels"]:  # one list of per-image pixel lists per percentage
            batch = np.stack([noisy_linear_imputation(x[i], np.asarray(p, dtype=int), noise=item["noise"])
                              for i, p in enumerate(pixels)])
            with torch.no_grad():
                predicted = model(torch.Tensor(batch)).argmax(1).numpy()
            hits.append(predicted == y[:len(batch)])
        results[item["name"]] = np.stack(hits, 1).astype(float)
        return
    init = dict(item.get("init", {}))
    metric = getattr(quantus, kind)(disable_warnings=True, **init)
    call = dict(item.get("call", {}))
    if kind == "RandomLogit":
        call["explain_func"] = explainer(data["other_a"], data["other_y"])
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu", **call)
    results[item["name"]] = np.asarray(scores, dtype=float)


if __name__ == "__main__":
    main(*sys.argv[1:])
