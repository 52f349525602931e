"""minireuse: a small deep-learning framework with adaptive deep reuse."""
__version__ = "0.1.0"
