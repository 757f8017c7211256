"""corelay 1.0.0's SpRAy on the benchmark's maps, in its own virtual environment (bench-only; `make bench-spray` makes
.venv-bench-corelay): the same preprocessing as ours (|R|, sum-pool 2x2, divide by the sum, flatten), its dense
Euclidean distances, SparseKNN(10), SymmetricNormalLaplacian, EigenDecomposition(32), k-means for each k and
sklearn's t-SNE, as its ViRelAy example pipeline does; k-means both on all 32 eigenvectors (the example's
choice) and on the k leading ones (ours, via corelay's `index` parameter). Standalone: imports only numpy and corelay.

    python bench/spray_corelay_child.py MAPS.npy OUT.npz K_MIN K_MAX [--no-tsne]   # prints JSON: seconds, memory
"""
import json
import resource
import sys
import time
from typing import Annotated


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(maps_file: str, out_file: str, k_min: int, k_max: int, picture: bool) -> dict:
    import numpy
    from corelay.base import Param
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.base import Processor
    from corelay.processor.clustering import KMeans
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition, TSNEEmbedding
    from corelay.processor.flow import Parallel, Sequential
    from corelay.processor.preprocessing import Pooling

    class Absolute(Processor):
        def function(self, data):
            return numpy.absolute(data)

    class Normalize(Processor):
        axes: Annotated[tuple, Param(tuple, (1, 2, 3))]

        def function(self, data):
            return data / data.sum(self.axes, keepdims=True)

    class Flatten(Processor):
        def function(self, data):
            return data.reshape(data.shape[0], -1)

    baseline = rss_mb()
    started = time.perf_counter()
    maps = numpy.load(maps_file)[:, None].astype(numpy.float32)  # (N, 1, H, W): corelay wants the whole array
    ks = list(range(k_min, k_max + 1))
    pipeline = SpectralClustering(
        preprocessing=Sequential([Absolute(), Pooling(stride=(1, 1, 2, 2)), Normalize(), Flatten()]),
        pairwise_distance=SciPyPDist(metric="euclidean"),
        affinity=SparseKNN(n_neighbors=10, symmetric=True),
        embedding=EigenDecomposition(n_eigval=32, is_output=True),
        clustering=Parallel([
            # as corelay's ViRelAy example: k-means on all 32 (row-normalised) eigenvectors
            Parallel([KMeans(n_clusters=k, kwargs={"random_state": 0}) for k in ks], broadcast=True),
            # the same method as ours, through corelay's own `index` parameter: the k leading eigenvectors (eigsh
            # returns them in increasing order of the normalised affinity's eigenvalue, so the last k columns)
            Parallel([KMeans(n_clusters=k, index=(slice(None), slice(-k, None)), kwargs={"random_state": 0})
                      for k in ks], broadcast=True),
            *([TSNEEmbedding(kwargs={"random_state": 0})] if picture else [])], broadcast=True, is_output=True),
    )
    (eigenvalues, _), (kmeans, leading, *tsne) = pipeline(maps)
    seconds = time.perf_counter() - started
    numpy.savez(out_file, eigenvalues=eigenvalues, **{f"k{k}": labels for k, labels in zip(ks, kmeans)},
                **{f"leading{k}": labels for k, labels in zip(ks, leading)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline, "added_peak_mb": peak - baseline}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--no-tsne" not in sys.argv)))
