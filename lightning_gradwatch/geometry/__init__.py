"""How gradients travel: GradientGeometry (across depth: shattering, block Jacobians) and GradientsThroughTime (across time in recurrent models)."""
