"""Models: load and quantize the base, attach adapters and heads, and run forward passes."""
