"""The concept audit over a finished run: prototypes, artifact concepts (CAVs) and their correction."""
