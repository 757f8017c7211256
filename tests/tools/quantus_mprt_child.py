"""Quantus 0.6.0's MPRT, EfficientMPRT and TopKIntersection on the maps tests/test_sanity.py computed, run in
Quantus's own environment (.venv-quantus): `python quantus_mprt_child.py JOB.npz MODEL.pt OUT.json SITE`. SITE, the
project's site-packages, is appended to sys.path for torch alone (Quantus's dependencies come first). Quantus
randomises the model itself; the explain function looks each map up by the model's weights (sha256 of its state
dict), so a randomised model the test did not build is an error, not a silent mismatch."""
import hashlib
import json
import sys

import numpy as np

job_path, model_path, out_path, site = sys.argv[1:5]
sys.path.append(site)

import quantus  # noqa: E402
import skimage.metrics  # noqa: E402
import torch  # noqa: E402

job = np.load(job_path)
x, y = job["x"], job["y"]
maps = {key[3:]: job[key] for key in job.files if key.startswith("fp_")}
k = int(job["k"])


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def lookup(model, inputs, targets, **kwargs) -> np.ndarray:
    """The test's maps of this model for these inputs (found by their pixels)."""
    found = maps.get(fingerprint(model))
    if found is None:
        raise KeyError("Quantus randomised a model the test did not")
    inputs = np.asarray(inputs, dtype=np.float64).reshape(len(inputs), -1)
    rows = [int(np.argmin(np.abs(x.reshape(len(x), -1) - row).sum(axis=1))) for row in inputs]
    return found[rows][:, None]


def ssim_array(a, b, batched=False, **kwargs):
    """Quantus's own ssim as an array: MPRT 0.6.0 calls .tolist() on what a similarity returns, and its ssim returns
    a list when batched (AttributeError), so MPRT cannot take quantus.ssim as it is."""
    return np.asarray(quantus.similarity_func.ssim(a, b, batched=batched, **kwargs))


model = torch.load(model_path, weights_only=False).eval()
common = dict(disable_warnings=True, display_progressbar=False)
call = dict(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=lookup, device="cpu", batch_size=1)
result = {}
for name, order, func, absolute in (("spearman_abs", "top_down", quantus.similarity_func.correlation_spearman, True),
                                    ("spearman", "top_down", quantus.similarity_func.correlation_spearman, False),
                                    ("ssim_flat", "top_down", ssim_array, True),
                                    ("independent_spearman_abs", "independent",
                                     quantus.similarity_func.correlation_spearman, True)):
    metric = quantus.MPRT(similarity_func=func, layer_order=order, seed=42, abs=absolute, normalise=True, **common)
    result[name] = {layer: [float(v) for v in values] for layer, values in metric(**call).items()}

emprt = quantus.EfficientMPRT(seed=42, **common)
result["emprt"] = [float(v) for v in emprt(**call)]
result["emprt_layers"] = list(emprt.explanation_scores_by_layer)

# top-k intersection and the 2-D SSIM, per cascading step, on Quantus's own normalisation and order
original = maps[fingerprint(model)]
prepared = {fp: np.abs(quantus.normalise_func.normalise_by_max(m[:, None], normalise_axes=(1, 2, 3)))[:, 0]
            for fp, m in maps.items()}
order = [name for name, module in model.named_modules() if hasattr(module, "reset_parameters")][::-1]
wrapped = quantus.helpers.model.pytorch_model.PyTorchModel(model, channel_first=True)
topk, ssim_image = {}, {}
for layer, random_model in wrapped.get_random_layer_generator(order="top_down", seed=42):
    fp = fingerprint(random_model)
    a, b = prepared[fingerprint(model)], prepared[fp]
    mask = np.zeros(a.reshape(len(a), -1).shape)
    mask[np.arange(len(a))[:, None], np.argsort(-a.reshape(len(a), -1), axis=1)[:, :k]] = 1
    metric = quantus.TopKIntersection(k=k, abs=True, normalise=False, **common)
    topk[layer] = [float(v) for v in metric(model=None, x_batch=x, y_batch=y, a_batch=maps[fp][:, None],
                                            s_batch=mask.reshape(len(a), 1, *a.shape[1:]))]
    ssim_image[layer] = [float(skimage.metrics.structural_similarity(
        p, q, data_range=float(abs(max(p.max(), q.max()) - min(p.min(), q.min()))))) for p, q in zip(a, b)]
result["top_k_intersection"], result["ssim_image"] = topk, ssim_image
with open(out_path, "w") as handle:
    json.dump(result, handle)
