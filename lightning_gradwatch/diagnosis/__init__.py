"""The run's mistakes and its report: SetupCheck (mistakes in the training code) and HealthReport (the diagnosis at the end of the run)."""
