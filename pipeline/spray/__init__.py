"""Spectral relevance analysis (SpRAy; Lapuschkin et al. 2019, Anders et al. 2022) over a finished run: per class,
the maps' kNN graph, its Laplacian's leading eigenvectors, the eigengap's number of clusters, k-means / Ward
clusterings, a t-SNE picture and outlier scores; results in RUN/spray/ and as a ViRelAy project. It reads only what
a run wrote and never runs the model."""
