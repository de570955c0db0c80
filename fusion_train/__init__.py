"""Knowledge fusion of chat LLMs (FuseChat): represent, align, fuse, train, evaluate."""

__version__ = "0.1.0"
