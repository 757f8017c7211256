"""The concept audit of a finished run: prototypes per class, artifact concepts (CAVs), their retrieval and R_bias,
and their correction (P-ClArC)."""
