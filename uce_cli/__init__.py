"""uce: Unified Concept Editing for text-to-image diffusion models, as a library and a CLI."""

__version__ = "0.1.0"
