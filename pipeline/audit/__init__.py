"""The concept audit of a finished run explained with concepts (CRP): PCX's prototypes per class (a Gaussian mixture
over the images' concept-relevance vectors, outliers and their deviating concepts), artifact concepts (CAVs), their
retrieval and R_bias, all readers of the run; and the correction (R-/P-ClArC), which runs the model to fit the
direction and to verify the corrected export."""
