"""Operating the pipeline's services: the local production stack (stack.py)."""
