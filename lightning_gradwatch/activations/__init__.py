"""Activation health: DeadNeuronCallback and SaturationCallback, their shared window logic and the one probe per model."""
