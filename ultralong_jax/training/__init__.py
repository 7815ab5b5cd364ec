"""Training: loss, optimizer, sharded train step, Orbax checkpoints, metrics, the loop."""
