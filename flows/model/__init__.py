"""The fleet model's life: the learner built from the settings and checkpointed, the live model
kept current with the committed version, the per-file step (features, one forward and one
update over all lines, drift checks, output), initial training and drift-triggered retraining
with its champion/challenger decision, and the MLflow pyfunc wrapper of a registered version."""
