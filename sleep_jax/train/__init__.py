"""Training: train state, optimizer, sharded train step, trainer loop."""
