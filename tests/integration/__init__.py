"""Real servers on port 0 serving the shipped model."""
