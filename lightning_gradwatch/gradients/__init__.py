"""The gradient monitors and clipping: GradientNormLogger, AdaptiveClipping and GradientNoiseScale, with their rules, charts and state."""
