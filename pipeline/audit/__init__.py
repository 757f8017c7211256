"""The concept audit over a finished run explained with concepts (CRP): PCX's prototypes per class
(prototypes.py: a Gaussian mixture over the images' concept-relevance vectors, outliers and their deviating
concepts) and, beside them, artifact concepts (CAVs). Like SpRAy, it reads only what a run wrote and never runs the
model."""
