"""The one training loop and what it needs: run directory and checkpoints, schedule, optimizer, device, batches, and building a model and its data from a config (where config objects stop)."""
