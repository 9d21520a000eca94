"""The one training loop and what it needs: the run directory and its checkpoints, the schedule, the
optimizer, the device, the batches, and building a model and its data from a config (where config objects
stop)."""
