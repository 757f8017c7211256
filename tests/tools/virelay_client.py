"""Run by tests/test_spray_virelay.py in a child process whose PYTHONPATH holds ViRelAy 0.6.1 (test-only; AGPL, so
the product never imports it): open a project with ViRelAy's own Workspace and print, as JSON, what it loaded.

    python tests/tools/virelay_client.py PROJECT.yaml SAMPLE_INDEX [SAMPLE_INDEX ...]
"""
import json
import sys

import numpy
from virelay.model import Workspace


def main(project_path: str, indices: list[int]) -> dict:
    workspace = Workspace()
    workspace.add_project(project_path)
    (name,) = workspace.get_project_names()
    project = workspace.get_project(name)
    methods = project.get_analysis_methods()
    out = {"name": name, "model": project.model, "dataset_size": len(project.dataset), "methods": methods,
           "samples": {}, "attributions": {}, "analyses": {}}
    for index in indices:
        sample = project.get_sample(index)
        out["samples"][index] = {"shape": list(sample.data.shape), "dtype": str(sample.data.dtype),
                                 "sum": int(numpy.asarray(sample.data, dtype=numpy.int64).sum()),
                                 "labels": [label.index for label in sample.labels]}
        attribution = project.get_attribution(index)
        heatmap = attribution.render_heatmap("black-fire-red")
        out["attributions"][index] = {"shape": list(attribution.data.shape),
                                      "data": numpy.asarray(attribution.data, dtype=numpy.float64)[..., 0].tolist(),
                                      "labels": [label.index for label in attribution.labels],
                                      "prediction_argmax": int(numpy.argmax(attribution.prediction)),
                                      "heatmap_shape": list(heatmap.shape)}
    for method in methods:
        categories = project.get_analysis_categories(method)
        clusterings = project.get_analysis_clustering_names(method)
        embeddings = project.get_analysis_embedding_names(method)
        entry = {"categories": [[c.name, c.human_readable_name] for c in categories], "clusterings": clusterings,
                 "embeddings": embeddings, "by_category": {}}
        for category in categories:
            analysis = project.get_analysis(method, category.name, "kmeans-eigengap", "tsne")
            spectral = project.get_analysis(method, category.name, "kmeans-02", "spectral")
            entry["by_category"][category.name] = {
                "index": numpy.asarray(analysis.attribution_indices).tolist(),
                "kmeans_eigengap": numpy.asarray(analysis.clustering).tolist(),
                "kmeans_02": numpy.asarray(spectral.clustering).tolist(),
                "tsne": numpy.asarray(analysis.embedding).tolist(),
                "spectral_shape": list(numpy.asarray(spectral.embedding).shape),
                "eigenvalues": numpy.asarray(spectral.eigenvalues).tolist(),
            }
        out["analyses"][method] = entry
    workspace.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], [int(i) for i in sys.argv[2:]])))
