"""Training: state and optimizer, the jitted steps, and the loop."""
