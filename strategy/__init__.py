"""SpaceNet, the method: sparse per-task training with neuron reservation, as an Avalanche plugin."""
