"""The pipeline's stages, one module each, in the order app.py lists them."""
